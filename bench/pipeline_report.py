"""The pipeline benchmark's report: per-mode medians over repeats, the ratios against the
baselines, the printed tables and the PNG of the streaming run.

Split from ``bench.pipeline`` (which runs the modes and assembles the result) to keep both modules
short; it only reads the figures the runs produced and starts no processes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.runs import pyplot, read_train_log, save_figure

MODES = ("streaming", "offline", "producer_alone", "trainer_alone")
TARGET_RATIO = 1.1
TARGET_STALL_PCT = 3.0


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict]) -> dict:
    """One mode's repeats: the median of every number; per process the largest peak RSS and the
    median CPU seconds."""
    out: dict = {}
    for key in runs[0]:
        if key == "processes":
            labels = sorted({label for r in runs for label in r["processes"]})
            out[key] = {
                label: {
                    "peak_rss_mib": max(r["processes"].get(label, {}).get("peak_rss_mib", 0.0) for r in runs),
                    "cpu_s": _median([r["processes"].get(label, {}).get("cpu_s") for r in runs]),
                }
                for label in labels
            }
        else:
            out[key] = _median([r.get(key) for r in runs])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(modes: dict, capacity: dict, num_producers: int) -> dict:
    """The ratios of the issue, and what this machine allows: if producer and trainer overlapped
    perfectly on the measured capacity C, streaming would take max(c, d, (c + d') / C), where d'
    is the trainer's work and c the producers' in alone-seconds (P workers ran at min(1, C/P))."""
    s, c, d = modes["streaming"], modes["producer_alone"], modes["trainer_alone"]
    slowest = max(c["steady_s"], d["steady_s"]) if d["steady_s"] is not None else None
    cores = capacity["effective_cores"]
    producer_work = c["capture_s_sum"] * min(1.0, cores / num_producers)
    bound = max(c["steady_s"], d["steady_s"], (producer_work + d["steady_s"]) / cores) if slowest else None
    return {
        "streaming_over_max_alone": _ratio(s["steady_s"], slowest),
        "streaming_over_max_alone_wall": _ratio(s["wall_s"], max(c["wall_s"], d["wall_s"])),
        "streaming_over_offline": _ratio(s["wall_s"], modes["offline"]["wall_s"]),
        "machine_bound_over_max_alone": _ratio(bound, slowest),
        "streaming_over_machine_bound": _ratio(s["steady_s"], bound),
        "stall_pct": s["stall_pct"],
        "trainer_alone_stall_pct": d["stall_pct"],
        "target_ratio": TARGET_RATIO,
        "target_stall_pct": TARGET_STALL_PCT,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(result: dict) -> None:
    r, m, s, cap = result["regime"], result["modes"], result["summary"], result["cpu_capacity"]
    print(
        f"pipeline: {r['num_conversations']} conversations x {r['epochs']} epochs, total-seq-len {r['total_seq_len']}, "
        f"{r['num_producers']} producer(s) + 1 trainer rank, {r['cpus']} vCPUs giving {cap['effective_cores']:.2f} "
        f"cores to two busy processes, OMP_NUM_THREADS=1; medians of {r['repeats']} repeat(s)"
    )
    header = (
        f"{'mode':<16}{'wall s':>8}{'startup':>9}{'train':>8}{'tail':>7}{'steady s':>10}{'stall %':>9}"
        f"{'step ms':>9}{'compute ms':>12}{'other CPU s':>13}"
    )
    print(header)
    print("-" * len(header))
    for mode in MODES:
        f = m[mode]
        print(
            f"{mode:<16}{f['wall_s']:>8.1f}{_fmt(f.get('startup_s'), '.1f'):>9}{_fmt(f.get('train_span_s'), '.1f'):>8}"
            f"{_fmt(f.get('tail_s'), '.1f'):>7}{_fmt(f.get('steady_s'), '.2f'):>10}{_fmt(f.get('stall_pct'), '.2f'):>9}"
            f"{_fmt(f.get('median_step_ms'), '.0f'):>9}{_fmt(f.get('median_compute_ms'), '.0f'):>12}"
            f"{f['other_cpu_s']:>13.1f}"
        )
    print()
    header = f"{'mode':<16}{'hs bytes':>12}{'ckpt+log bytes':>16}  {'process':<16}{'peak RSS MiB':>13}{'CPU s':>8}"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        f = m[mode]
        for i, (label, proc) in enumerate(f["processes"].items()):
            disk = f"{f['hs_bytes']:>12.0f}{f['other_bytes']:>16.0f}" if i == 0 else " " * 28
            print(
                f"{mode if i == 0 else '':<16}{disk}  {label:<16}{proc['peak_rss_mib']:>13.0f}{_fmt(proc['cpu_s'], '.1f'):>8}"
            )
    print()
    o, c, d = m["offline"], m["producer_alone"], m["trainer_alone"]
    print(
        f"offline = produce {o['produce_wall_s']:.1f} s + train {o['train_wall_s']:.1f} s ({o['hs_files']:.0f} hs files); "
        f"producer alone captured {c['rows']:.0f} rows / {c['tokens']:.0f} tokens; trainer alone preloaded "
        f"{d['preloaded_samples']:.0f} samples in {d['preload_s']:.2f} s"
    )
    ratio, wall_ratio, bound, vs_offline = (
        _fmt(s[k], ".3f")
        for k in (
            "streaming_over_max_alone",
            "streaming_over_max_alone_wall",
            "machine_bound_over_max_alone",
            "streaming_over_offline",
        )
    )
    cores = cap["effective_cores"]
    print(
        f"streaming / max(producer alone, trainer alone): steady {ratio} (target <= {TARGET_RATIO}), process wall "
        f"{wall_ratio}; perfect overlap on {cores:.2f} cores would give {bound}"
    )
    print(
        f"streaming / offline (process wall): {vs_offline}; trainer stall in streaming {_fmt(s['stall_pct'], '.2f')} % "
        f"(target <= {TARGET_STALL_PCT}; from memory {_fmt(s['trainer_alone_stall_pct'], '.2f')} %)"
    )
    st = m["streaming"]
    if st.get("mean_buffer_fill") is not None:
        print(
            f"streaming, steady steps: {st['mean_samples_in_per_s']:.0f} samples/s in, {st['mean_samples_out_per_s']:.0f} "
            f"out, buffer {100 * st['mean_buffer_fill']:.0f}% full on average (producer alone: "
            f"{c['rows'] / c['steady_s']:.0f} samples/s)"
        )
    busy = [mode for mode in MODES if m[mode]["other_cpu_s"] > 0.1 * m[mode]["wall_s"]]
    busy += [] if cap["quiet"] else ["the CPU capacity probe"]
    if busy:
        print(
            f"WARNING: the machine was not quiet: other processes used > 10% of a core during {', '.join(busy)} "
            "(column 'other CPU s'); these figures are disturbed"
        )
    if s["stall_pct"] is None:
        print("stall n/a: train_log.jsonl lines carry no step_wall_s/data_wait_s (trainer/training/loop.py telemetry)")
    print(f"plot: {result['plot']}" if result["plot"] else f"plot: none ({result['plot_note']})")


def plot_streaming(train_log: Path, out: Path) -> Path | None:
    """Samples/s in and out, buffer fill and stall per step of the streaming run, if logged."""
    _, steps = read_train_log(train_log)
    needed = ("step_wall_s", "data_wait_s", "samples_in_per_s", "samples_out_per_s", "buffer_fill")
    if not steps or not all(k in r for r in steps for k in needed):
        return None
    plt = pyplot()
    if plt is None:
        return None

    t, clock = [], 0.0
    for r in steps:
        clock += r["step_wall_s"]
        t.append(clock)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(t, [r["samples_in_per_s"] for r in steps], label="samples/s in (producers -> buffer)")
    top.plot(t, [r["samples_out_per_s"] for r in steps], label="samples/s out (trained)")
    top.set_ylabel("samples/s")
    top.legend(loc="upper right")
    bottom.plot(t, [100 * r["buffer_fill"] for r in steps], label="buffer fill %")
    bottom.plot(
        t, [100 * r["data_wait_s"] / r["step_wall_s"] if r["step_wall_s"] else 0 for r in steps], label="stall % (step)"
    )
    bottom.set_ylabel("%")
    bottom.set_xlabel("trainer time in steps, s (validation and checkpoints left out)")
    bottom.legend(loc="upper right")
    for i in range(1, len(steps)):
        if steps[i]["epoch"] != steps[i - 1]["epoch"]:
            for ax in (top, bottom):
                ax.axvline(t[i - 1], color="grey", linestyle=":", linewidth=1)
    fig.suptitle("draftstream streaming run (epoch boundaries dotted)")
    return save_figure(fig, out)
