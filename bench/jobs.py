"""One capture, several trainings: how often the target runs per sample sent when one producer
serves several trainer jobs (``draftstream run --job NAME=FLAGS ...``), what its share window holds
and costs in memory, and what each job's training rate becomes.

::

    (a) aligned  draftstream run --num-producers 1 --job j1="--seed 0" ... --job jN="--seed 0"
                 N = 1, 2, 3 (1, 2 with --quick); the producer's default share window (2 GiB)
    (b) seeds    draftstream run --num-producers 1 --job j1="--seed 1" ... --job jN="--seed N"
                     --producer-args "--share-window-bytes W"
                 N = 2, 3 (2 with --quick); W = --window-mb
    (c) no_window  as (b) with W = 0 (nothing kept: only rows that meet in one target batch
                 are shared), N = 3; not with --quick. The control for (b)'s memory: what
                 serving N jobs of other orders costs the producer besides its window

Every job trains an Eagle-3 draft (draft vocab 256, --total-seq-len 1024, the same flags as
``bench.fanout``) for --epochs on the tiny local target of ``draftstream make-tiny-target`` (Llama,
hidden 64, 8 layers, fp32, random weights) and its conversations prepared at --seq-length 512
(``bench.runs``); one trainer rank per job, one producer (``--backend hf``, captures held in the
producer, so they can be shared), ipc:// endpoints (``run``'s default: a fresh temp dir, one
endpoint per job), every child with OMP_NUM_THREADS=1. The 1-job point is the baseline of both
series. Jobs of one seed plan the same rows in the same order (ideal: the target runs once per row
for all N jobs, 1/N forwards per sample sent); jobs of different seeds plan every row once an
epoch but in other orders (and other train/validation splits), so a capture waits in the window
until every other job asks for it, and the window's budget decides how much is shared (1/N with
a window holding every capture, 1.0 with none). The default W is a quarter of the dataset's
capture bytes (reported), small enough that the budget matters.

Regime: this is a 2-vCPU CPU machine. N trainers and a producer are N + 1 single-threaded
processes on 2 cores, so the jobs time-share the cores: samples/s per job falls with N by CPU
contention, not by the protocol. What carries over to a GPU per trainer is the target work saved
(forwards per sample), the window's memory and that every job still gets its plan.

Figures, per run (every figure of a run from that run; setup is not timed):

- forwards / sample: the producer's closing log line (``<save>/logs/producer-0.log``): target
  forwards (rows the target ran) over samples sent (pushes to a rank, each job's copy counted;
  validation rows included). Also from that line: samples shared within one target batch
  (``shared in a batch``), answered from the window (``window hits``), the window's peak bytes and
  its budget (MB = 10^6 bytes, as the log prints them, 0.1 MB resolution) and the captures evicted
  for room before every job they were kept for had them.
- samples/s per job: ``bench.fanout.steady_figures`` of each job's save folder: samples trained
  (``<save>/NAME/accounting``) in every step but the job's first, over the sum of its
  ``step_wall_s`` (``<save>/NAME/train_log.jsonl``) over the same steps; ``vs 1 job`` is the mean
  over the jobs of a run over the 1-job run's figure; ``sum`` adds the jobs of a run.
- finished: a job's accounting record trains every row of its training split (its seed's
  ``split_train_val``, the default --val-ratio) exactly --epochs times, with nothing skipped.
- producer peak RSS: ``VmHWM`` of the producer process (``bench.processes``: /proc polled every
  0.1 s; ``VmHWM`` is the kernel's own high-water mark), and its excess over the 1-job run's
  producer, to set against the window's peak and budget. Serving several jobs may cost memory
  besides the window (capture batches of more distinct rows, samples waiting for their rank), so
  a seeds run's producer is also compared with the no-window run of the same N
  (``producer_rss_over_no_window``): that difference is what the window itself costs.
  Producer CPU s: its utime + stime.
- wall: the launcher started to its exit (imports, model loads, validation, checkpoints);
  other CPU s: what the rest of the machine burnt meanwhile (flagged above 10% of the wall).

With ``--out DIR`` artifacts are kept there and ``jobs.png`` is written (forwards per sample and
samples/s per job against the number of jobs, both series); without it everything goes to a
temporary folder that is removed at the end.

    python -m bench.jobs [--epochs 2] [--num-conversations 256] [--window-mb MB] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench.fanout import TOTAL_SEQ_LEN, steady_figures, train_flags
from bench.runs import DRAFT_VOCAB, cli, prepare_inputs, pyplot, run_group, save_figure

ALIGNED_SEED = 0
MB = 1e6  # the producer logs its window in 10^6 bytes

PRODUCER_LINE = re.compile(
    r"target forwards: (?P<forwards>\d+) for (?P<samples_sent>\d+) samples sent \([\d.]+ per sample\); "
    r"shared in a batch (?P<shared_in_batch>\d+), from the window (?P<window_hits>\d+) "
    r"\(peak (?P<peak_mb>[\d.]+) MB of (?P<budget_mb>[\d.]+) MB, (?P<evicted>\d+) evicted\)"
)


def capture_figures(model: Path, data: Path) -> dict:
    """Rows, tokens and the bytes of every row's capture (what a window holding them all needs):
    the layers and dtype a producer captures by default, ``protocol.target.sample_nbytes`` per row."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    import torch

    from protocol.dataset import PreparedDataset
    from protocol.target import capture_layer_ids, checkpoint_dtype, read_text_config, sample_nbytes

    text = read_text_config(model)
    layers = capture_layer_ids(None, int(text["num_hidden_layers"]))
    dtype = getattr(torch, checkpoint_dtype(text))
    dataset = PreparedDataset(data, flag="--data")
    lengths = dataset.lengths(range(len(dataset)))
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "layers": len(layers),
        "hidden_size": int(text["hidden_size"]),
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": sum(sample_nbytes(n, len(layers), int(text["hidden_size"]), dtype) for n in lengths),
    }


def producer_figures(log: Path) -> dict:
    """The figures of the producer's closing line on its target forwards and its share window."""
    text = log.read_text(errors="replace")
    found = list(PRODUCER_LINE.finditer(text))
    if not found:
        raise RuntimeError(f"{log}: no `target forwards: ...` line; last lines:\n{text[-2000:]}")
    m = found[-1]
    figures = {k: int(m.group(k)) for k in ("forwards", "samples_sent", "shared_in_batch", "window_hits", "evicted")}
    figures["forwards_per_sample"] = figures["forwards"] / figures["samples_sent"] if figures["samples_sent"] else None
    figures["window_peak_mb"] = float(m.group("peak_mb"))
    figures["window_budget_mb"] = float(m.group("budget_mb"))
    return figures


def job_finished(save: Path, *, num_rows: int, seed: int, epochs: int) -> dict:
    """Whether the job's accounting trains every row of its training split exactly ``epochs`` times."""
    from trainer.data.sources import VAL_RATIO, split_train_val
    from trainer.training.accounting import read_accounting, trained_counts

    train_ids, _ = split_train_val(num_rows, val_ratio=VAL_RATIO, seed=seed)
    records = read_accounting(save)
    counts = trained_counts(records)
    skipped = sum(len(r.get("skipped") or []) for r in records)
    return {
        "finished": skipped == 0 and counts == dict.fromkeys(train_ids, epochs),
        "trained": sum(counts.values()),
        "planned": epochs * len(train_ids),
        "skipped": skipped,
    }


def _label(argv: list[str]) -> str | None:
    """A job's trainer is named after its save folder (``trainer-j1``); others as bench.processes does."""
    if "protocol.cli" in argv and "train" in argv and "--save-path" in argv:
        i = argv.index("--save-path")
        if i + 1 < len(argv):
            return f"trainer-{Path(argv[i + 1]).name}"
    return None


def run_point(
    model: Path,
    data: Path,
    work: Path,
    *,
    seeds: list[int],
    window_bytes: int | None,
    epochs: int,
    num_rows: int,
) -> dict:
    """One ``draftstream run`` with a job per seed (``j1``, ``j2``, ...) and one producer."""
    shutil.rmtree(work, ignore_errors=True)
    save = work / "save"
    names = [f"j{k + 1}" for k in range(len(seeds))]
    producer_args = [] if window_bytes is None else ["--producer-args", f"--share-window-bytes {window_bytes}"]
    cmd = cli(
        "run",
        "--model",
        str(model),
        "--data",
        str(data),
        "--save-path",
        str(save),
        "--num-producers",
        "1",
        *[arg for name, seed in zip(names, seeds, strict=True) for arg in ("--job", f"{name}=--seed {seed}")],
        *producer_args,
        "--",
        *train_flags(epochs),
    )
    group = run_group({"run": cmd}, work / "logs", label=_label)
    if "producer-0" not in group.peak_rss:
        raise RuntimeError(f"no producer process seen among {sorted(group.peak_rss)}")
    jobs = {}
    for name, seed in zip(names, seeds, strict=True):
        jobs[name] = {
            "seed": seed,
            **job_finished(save / name, num_rows=num_rows, seed=seed, epochs=epochs),
            **steady_figures(save / name),
        }
    rates = [j["samples_per_s"] for j in jobs.values()]
    return {
        "jobs": len(seeds),
        "seeds": seeds,
        "window_bytes_asked": window_bytes,
        **producer_figures(save / "logs" / "producer-0.log"),
        "ideal_forwards_per_sample": 1.0 / len(seeds),
        "producer_peak_rss": group.peak_rss["producer-0"],
        "producer_cpu_s": group.cpu_s.get("producer-0"),
        "samples_per_s_per_job": sum(rates) / len(rates) if None not in rates else None,
        "samples_per_s_sum": sum(rates) if None not in rates else None,
        "all_finished": all(j["finished"] for j in jobs.values()),
        "wall_s": group.wall_s,
        "other_cpu_s": group.other_cpu_s,
        "per_job": jobs,
    }


def add_baseline_ratios(result: dict) -> None:
    """Per point: samples/s per job over the 1-job run's, producer RSS over the 1-job run's, and for
    the seeds runs, producer RSS over the no-window run's of the same N (None without one)."""
    single = result["series"]["aligned"][0]
    no_window = {p["jobs"]: p for p in result["series"]["no_window"]}
    for points in result["series"].values():
        for p in points:
            base = single["samples_per_s_per_job"]
            p["vs_single"] = p["samples_per_s_per_job"] / base if base and p["samples_per_s_per_job"] else None
            p["producer_rss_over_single"] = p["producer_peak_rss"] - single["producer_peak_rss"]
    for p in result["series"]["seeds"]:
        control = no_window.get(p["jobs"])
        p["producer_rss_over_no_window"] = p["producer_peak_rss"] - control["producer_peak_rss"] if control else None


def print_table(result: dict) -> None:
    r = result["regime"]
    d = r["dataset"]
    print(
        f"jobs: one producer serving N Eagle-3 jobs; {r['num_conversations']} conversations x {r['epochs']} epochs, "
        f"total-seq-len {r['total_seq_len']}, ipc, {r['cpus']} vCPUs, OMP_NUM_THREADS=1 (CPU contention)"
    )
    print(
        f"dataset captures: {d['rows']} rows, {d['tokens']} tokens, {d['layers']} layers x {d['hidden_size']} "
        f"{d['dtype']}: {d['bytes'] / MB:.2f} MB; seeds window {r['window_bytes'] / MB:.2f} MB "
        f"({r['window_bytes'] / d['bytes']:.2f} of it)"
    )
    header = (
        f"{'series':<10}{'N':>3}{'window MB':>11}{'fwd/sample':>12}{'ideal':>7}{'batch':>7}{'hits':>6}"
        f"{'peak MB':>9}{'evicted':>9}{'samples/s/job':>15}{'vs 1':>6}{'sum':>7}{'prod RSS MiB':>14}"
        f"{'+ vs 1':>8}{'prod CPU s':>12}{'wall s':>8}{'done':>6}"
    )
    print(header)
    print("-" * len(header))
    for series, points in result["series"].items():
        for p in points:
            print(
                f"{series:<10}{p['jobs']:>3}{p['window_budget_mb']:>11.1f}{p['forwards_per_sample']:>12.3f}"
                f"{p['ideal_forwards_per_sample']:>7.3f}{p['shared_in_batch']:>7}{p['window_hits']:>6}"
                f"{p['window_peak_mb']:>9.1f}{p['evicted']:>9}{_num(p['samples_per_s_per_job'], 15, 1)}"
                f"{_num(p['vs_single'], 6, 2)}{_num(p['samples_per_s_sum'], 7, 1)}"
                f"{p['producer_peak_rss'] / 2**20:>14.0f}{p['producer_rss_over_single'] / 2**20:>+8.1f}"
                f"{_num(p['producer_cpu_s'], 12, 1)}{p['wall_s']:>8.1f}"
                f"{'yes' if p['all_finished'] else 'NO':>6}"
            )
    print("per job samples/s (steady): " + "; ".join(_per_job(s, p) for s, ps in result["series"].items() for p in ps))
    for p in result["series"]["seeds"]:
        if p["producer_rss_over_no_window"] is not None:
            print(
                f"seeds N={p['jobs']}: producer peak RSS {p['producer_rss_over_no_window'] / MB:+.1f} MB over the "
                f"no-window run, window peak {p['window_peak_mb']:.1f} MB of {p['window_budget_mb']:.1f} MB"
            )
    busy = [
        f"{s} N={p['jobs']}" for s, ps in result["series"].items() for p in ps if p["other_cpu_s"] > 0.1 * p["wall_s"]
    ]
    if busy:
        print(f"WARNING: other processes used > 10% of a core during {', '.join(busy)}; rates and walls disturbed")
    print(f"plot: {result['plot']}" if result["plot"] else f"plot: none ({result['plot_note']})")


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _per_job(series: str, point: dict) -> str:
    rates = "/".join(
        "-" if j["samples_per_s"] is None else f"{j['samples_per_s']:.1f}" for j in point["per_job"].values()
    )
    return f"{series} N={point['jobs']}: {rates}"


def plot(result: dict, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    aligned, seeds = result["series"]["aligned"], result["series"]["seeds"]
    window_mb = result["regime"]["window_bytes"] / MB
    lines = (
        ("aligned", aligned, "same seed, default window"),
        ("seeds", aligned[:1] + seeds, f"different seeds, window {window_mb:.1f} MB"),
    )
    counts = sorted({p["jobs"] for p in aligned + seeds})
    for _, points, label in lines:
        left.plot([p["jobs"] for p in points], [p["forwards_per_sample"] for p in points], marker="o", label=label)
    left.plot(counts, [1.0 / n for n in counts], linestyle="--", color="gray", label="ideal 1/N")
    left.axhline(1.0, linestyle=":", color="gray", label="no sharing")
    left.set_ylabel("target forwards per sample sent")
    left.set_ylim(0, 1.1)
    for _, points, label in lines:
        right.plot([p["jobs"] for p in points], [p["samples_per_s_per_job"] for p in points], marker="o", label=label)
    right.set_ylabel("steady samples/s per job")
    right.set_ylim(bottom=0)
    for p in result["series"]["no_window"]:
        left.plot([p["jobs"]], [p["forwards_per_sample"]], marker="x", linestyle="", color="black")
        left.annotate(
            "no window",
            (p["jobs"], p["forwards_per_sample"]),
            fontsize=7,
            xytext=(-40, -12),
            textcoords="offset points",
        )
    for ax in (left, right):
        ax.set_xticks(counts)
        ax.set_xlabel("trainer jobs N (one producer)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"draftstream: one capture, several trainings; tiny target, {os.cpu_count()} vCPUs (CPU contention)",
        fontsize=9,
    )
    return save_figure(fig, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream bench jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--num-conversations", type=int, default=None, help="default 256 (32 with --quick)")
    parser.add_argument(
        "--window-mb",
        type=float,
        default=None,
        help="share window of the different-seed runs, in MB (10^6 bytes); default a quarter of the dataset's captures",
    )
    parser.add_argument("--out", default=None, help="keep artifacts here and write jobs.png")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and the points 1, 2 jobs aligned, 2 jobs of different seeds"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    epochs = args.epochs or (1 if args.quick else 2)
    num_conversations = args.num_conversations or (32 if args.quick else 256)
    aligned_counts, seed_counts, no_window_counts = ([1, 2], [2], []) if args.quick else ([1, 2, 3], [2, 3], [3])
    if epochs < 1 or num_conversations < 2:
        raise SystemExit("bench jobs: --epochs must be >= 1, --num-conversations >= 2")
    if args.window_mb is not None and args.window_mb < 0:
        raise SystemExit("bench jobs: --window-mb must be >= 0")

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print("setup: tiny target, prepared data ...", file=sys.stderr, flush=True)
        model, data = prepare_inputs(root / "inputs", num_conversations)
        dataset = capture_figures(model, data)
        window = round(args.window_mb * MB) if args.window_mb is not None else dataset["bytes"] // 4
        common = {"epochs": epochs, "num_rows": dataset["rows"]}
        series: dict[str, list[dict]] = {"aligned": [], "seeds": [], "no_window": []}
        for n in aligned_counts:
            print(f"run: {n} job{'s' * (n > 1)}, seed {ALIGNED_SEED}, default window", file=sys.stderr, flush=True)
            series["aligned"].append(
                run_point(model, data, root / f"aligned{n}", seeds=[ALIGNED_SEED] * n, window_bytes=None, **common)
            )
        for n in seed_counts:
            print(f"run: {n} jobs, seeds 1..{n}, window {window / MB:.2f} MB", file=sys.stderr, flush=True)
            series["seeds"].append(
                run_point(model, data, root / f"seeds{n}", seeds=list(range(1, n + 1)), window_bytes=window, **common)
            )
        for n in no_window_counts:
            print(f"run: {n} jobs, seeds 1..{n}, no window", file=sys.stderr, flush=True)
            series["no_window"].append(
                run_point(model, data, root / f"nowindow{n}", seeds=list(range(1, n + 1)), window_bytes=0, **common)
            )
        result = {
            "bench": "jobs",
            "regime": {
                "num_conversations": num_conversations,
                "epochs": epochs,
                "total_seq_len": TOTAL_SEQ_LEN,
                "draft_vocab_size": DRAFT_VOCAB,
                "speculator_type": "eagle3",
                "producers": 1,
                "ranks_per_job": 1,
                "endpoint": "ipc",
                "window_bytes": window,
                "dataset": dataset,
                "cpus": os.cpu_count(),
                "omp_num_threads": 1,
                "quick": args.quick,
            },
            "series": series,
        }
        add_baseline_ratios(result)
        png = plot(result, root / "jobs.png")
        result["plot"] = str(png) if png and args.out else None
        result["plot_note"] = "" if png else "matplotlib missing"
        if png and not args.out:
            result["plot_note"] = "pass --out DIR to keep it"
        print_table(result)
        print(json.dumps(result))
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
