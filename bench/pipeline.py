"""Pipeline benchmark: the same training job done four ways in one run, to show that streaming costs
no more than its slowest stage and writes no hidden states to disk.

::

    (a) streaming        draftstream run --num-producers P -- <train flags>
                         producer(s) --ZeroMQ ipc--> trainer rank (replay buffer), no hs files
    (b) offline          draftstream produce --spill DIR  (P processes, --world-size P)
                         then draftstream train --hidden-states-path DIR <same train flags>
    (c) producer alone   P worker processes run producer.capture.HFCapture (+ the codec's encode)
                         over exactly the (epoch, row) keys (a) grants, in its grant order
                         (trainer.data.order)
    (d) trainer alone    `draftstream train` on (b)'s files, preloaded into an
                         InMemorySampleSource before training: no producer, no file reads
    (c) and (d) are ``bench.pipeline_workers``; setup and process runs are ``bench.runs``; the
    medians, ratios, tables and plot are ``bench.pipeline_report``.

Regime: this 2-vCPU CPU machine, every child with OMP_NUM_THREADS=1, one trainer rank; the tiny
local target of ``draftstream make-tiny-target`` (Llama, hidden 64, 8 layers, fp32, random
weights) and its conversations, prepared at --seq-length 512; an Eagle-3 draft (1 layer, draft
vocab 256). The default P=1 gives the trainer and the producer a core each; alone, the tiny
target captures about 4x as many samples per second as the draft trains on, so the producer has
spare capacity and the trainer is the bottleneck: the regime of the issue's stall target. The
streaming line reports what the stream really ran at (samples/s in and out, buffer fill).

Figures, per mode:

- process wall: first child started to last child ended (imports, model loads, validation and
  checkpoints included); for (b) produce + train. Split for the trainer into ``startup`` (until
  its first step is logged), ``train`` (first to last step line) and ``tail`` (last validation,
  checkpoint, exits), from the times the lines of ``train_log.jsonl`` appear (0.1 s polls).
- steady: the trainer's ``step_wall_s`` (wall from the previous step's end to this one's, from
  ``<save>/train_log.jsonl``) summed over every step but the run's first, which also waits for
  the producers to start. Validation and checkpoints fall between steps and are not counted; the
  same sum is taken in (a), (b) and (d). For (c): the capture loop alone (after model load), the
  longest of the P workers. ``compute ms`` is the median step's own time (draft forward,
  backward, optimizer), so ``step ms - compute ms`` is what waiting and the loop cost.
- stall %: ``sum(data_wait_s) / sum(step_wall_s)`` over the same steps: the share of the
  trainer's wall spent waiting on the prefetch queue for data (the loop's own telemetry).
- hidden-state bytes written: sizes of ``hs_*`` files under the mode's folders (save path, ipc
  endpoint, spill folder). Checkpoints and logs are counted apart.
- peak RSS and CPU seconds: ``VmHWM`` and utime + stime of every process of the mode (children
  and grandchildren), read from /proc every 0.1 s while it runs.
- other CPU s: what the rest of the machine burnt meanwhile (/proc/stat busy time minus ours).
  The machine may be shared; anything above ~10% of the wall is flagged, as it disturbs every
  figure here.

Ratios are against baselines measured in the same run: ``streaming / max(c, d)`` on steady
figures (target <= 1.1) and on process walls; ``streaming / offline`` on process walls. Two
single-threaded processes need two real cores to overlap; a probe measures how many they get
(the same loop alone and as two concurrent copies), and ``machine_bound_over_max_alone`` is the
ratio that perfect overlap on that capacity would give: ``max(c, d, (c + d) / cores) / max(c, d)``.
With ``--repeats N`` every mode runs N times and figures are medians. Setup (building the target
and preparing the data, in this process) is not timed; it also warms the page cache for the
children's imports. With ``--out DIR`` artifacts are kept and a PNG of the last streaming run
(samples/s in and out, buffer fill, stall per step) is written there.

    python -m bench.pipeline [--epochs 3] [--num-producers 1] [--num-conversations 128] [--repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import pipeline_workers as workers
from bench.pipeline_report import MODES, aggregate, plot_streaming, print_report, summarize
from bench.processes import GroupRun, cpu_capacity
from bench.runs import DRAFT_VOCAB, SEQ_LENGTH, cli, last_json, prepare_inputs, read_train_log
from bench.runs import run_group as _run_group

SEED = 42  # the benchmark's fixed plan seed and split
SPLIT_VAL_RATIO = 0.1  # the benchmark's fixed validation share


def run_pipeline_group(commands: dict[str, list[str]], log_dir: Path, *, watch: Path | None = None) -> GroupRun:
    """``bench.runs.run_group`` with the pipeline workers' process labels."""
    return _run_group(commands, log_dir, watch=watch, label=workers.label)


# --------------------------------------------------------------------------------------------
# What the trainer logged, what landed on disk


def trainer_figures(train_log: Path, group: GroupRun) -> dict:
    """Steady-state time and stall from ``train_log.jsonl`` (see the module docstring; ``stall_pct``
    and ``steady_s`` are None when the loop does not log ``step_wall_s``/``data_wait_s``), and the
    trainer's timeline in its group: ``startup_s`` until the first step was logged (process start,
    imports, model build, and in streaming the producers' start too), ``train_span_s`` from the
    first step's line to the last's (epoch-end validation and checkpoints included), ``tail_s``
    from there to the end (the last validation and checkpoint, process exits)."""
    records, steps = read_train_log(train_log)
    if not steps:
        raise RuntimeError(f"{train_log}: no training steps logged")
    at = [t for t, r in zip(group.line_times_s, records, strict=False) if r.get("kind") == "train"]
    timeline = {}
    if len(at) == len(steps):
        timeline = {"startup_s": at[0], "train_span_s": at[-1] - at[0], "tail_s": group.wall_s - at[-1]}
    compute = [r["num_tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    figures = {
        "steps": len(steps),
        "tokens": sum(int(r["num_tokens"]) for r in steps),
        "median_compute_ms": 1e3 * statistics.median(compute) if compute else None,
        "steady_s": None,
        "stall_pct": None,
        "stall_pct_all_steps": None,
        "first_step_s": None,
        "median_step_ms": None,
        **timeline,
    }
    if all("step_wall_s" in r and "data_wait_s" in r for r in steps):
        steady = steps[1:] or steps
        wall = sum(r["step_wall_s"] for r in steady)
        wall_all = sum(r["step_wall_s"] for r in steps)
        figures.update(
            steady_s=wall,
            stall_pct=100.0 * sum(r["data_wait_s"] for r in steady) / wall if wall > 0 else 0.0,
            stall_pct_all_steps=100.0 * sum(r["data_wait_s"] for r in steps) / wall_all if wall_all > 0 else 0.0,
            first_step_s=steps[0]["step_wall_s"],
            median_step_ms=1e3 * statistics.median(r["step_wall_s"] for r in steady),
        )
    steady = steps[1:]
    for key in ("samples_in_per_s", "samples_out_per_s", "buffer_fill"):  # a streaming source's figures
        if steady and all(key in r and "step_wall_s" in r for r in steady):
            # Weighted by step time: rates come out as samples over time (per-step rates are bursty).
            wall = sum(r["step_wall_s"] for r in steady)
            figures[f"mean_{key}"] = sum(r[key] * r["step_wall_s"] for r in steady) / wall if wall > 0 else None
    return figures


def hs_bytes(*directories: Path) -> int:
    """Bytes of hidden-state files (``hs_*.safetensors``, temporaries included) under these folders."""
    return sum(f.stat().st_size for d in directories if d.exists() for f in d.rglob("hs_*") if f.is_file())


def tree_bytes(directory: Path) -> int:
    if not directory.exists():
        return 0
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())


# --------------------------------------------------------------------------------------------
# The four modes


@dataclasses.dataclass(kw_only=True)
class Job:
    model: Path
    data: Path
    epochs: int
    num_producers: int
    total_seq_len: int
    keys_file: Path  # (epoch, sample id) in the streaming run's grant order, for the producer-alone mode

    def train_flags(self) -> list[str]:
        # --log-every 1: the loop's stream figures (rates, buffer fill) are then per step.
        return [
            "--epochs",
            str(self.epochs),
            "--lr",
            "3e-3",
            "--total-seq-len",
            str(self.total_seq_len),
            "--draft-vocab-size",
            str(DRAFT_VOCAB),
            "--val-ratio",
            str(SPLIT_VAL_RATIO),
            "--seed",
            str(SEED),
            "--log-every",
            "1",
            "--no-progress",
            "--no-resume-from-checkpoint",
        ]


def _processes(*groups: GroupRun) -> dict[str, dict[str, float]]:
    return {
        name: {"peak_rss_mib": g.peak_rss[name] / 2**20, "cpu_s": g.cpu_s[name]} for g in groups for name in g.peak_rss
    }


def run_streaming(job: Job, work: Path) -> dict:
    save, ipc = work / "save", work / "ipc"
    cmd = cli(
        "run",
        "--model",
        str(job.model),
        "--data",
        str(job.data),
        "--save-path",
        str(save),
        "--num-producers",
        str(job.num_producers),
        "--stream-endpoint",
        f"ipc://{ipc}",
        "--",
        *job.train_flags(),
    )
    group = run_pipeline_group({"run": cmd}, work / "logs", watch=save / "train_log.jsonl")
    return {
        "wall_s": group.wall_s,
        **trainer_figures(save / "train_log.jsonl", group),
        "hs_bytes": hs_bytes(save, ipc),
        "other_bytes": tree_bytes(save),
        "processes": _processes(group),
        "other_cpu_s": group.other_cpu_s,
    }


def run_offline(job: Job, work: Path) -> dict:
    spill, save = work / "hidden_states", work / "save"
    produce = {
        f"produce-{r}": cli(
            "produce",
            "--model",
            str(job.model),
            "--data",
            str(job.data),
            "--spill",
            str(spill),
            "--world-size",
            str(job.num_producers),
            "--rank",
            str(r),
        )
        for r in range(job.num_producers)
    }
    produced = run_pipeline_group(produce, work / "logs")
    train = cli(
        "train",
        "--verifier-name-or-path",
        str(job.model),
        "--data-path",
        str(job.data),
        "--hidden-states-path",
        str(spill),
        "--save-path",
        str(save),
        *job.train_flags(),
    )
    trained = run_pipeline_group({"train": train}, work / "logs", watch=save / "train_log.jsonl")
    return {
        "wall_s": produced.wall_s + trained.wall_s,
        "produce_wall_s": produced.wall_s,
        "train_wall_s": trained.wall_s,
        **trainer_figures(save / "train_log.jsonl", trained),
        "hs_bytes": hs_bytes(spill),
        "hs_files": len(list(spill.glob("hs_*.safetensors"))),
        "other_bytes": tree_bytes(save),
        "processes": _processes(produced, trained),
        "other_cpu_s": produced.other_cpu_s + trained.other_cpu_s,
    }


def run_producer_alone(job: Job, work: Path) -> dict:
    commands = {
        f"capture-{r}": workers.command(
            "capture",
            "--model",
            str(job.model),
            "--data",
            str(job.data),
            "--keys",
            str(job.keys_file),
            "--rank",
            str(r),
            "--num-workers",
            str(job.num_producers),
        )
        for r in range(job.num_producers)
    }
    group = run_pipeline_group(commands, work / "logs")
    reports = [last_json(group.logs[name]) for name in commands]
    return {
        "wall_s": group.wall_s,
        "steady_s": max(r["capture_s"] for r in reports),
        "capture_s_sum": sum(r["capture_s"] for r in reports),
        "rows": sum(r["rows"] for r in reports),
        "tokens": sum(r["tokens"] for r in reports),
        "hs_bytes": 0,
        "other_bytes": 0,
        "processes": _processes(group),
        "other_cpu_s": group.other_cpu_s,
    }


def run_trainer_alone(job: Job, work: Path, spill: Path) -> dict:
    save = work / "save"
    cmd = workers.command(
        "memtrain",
        "--verifier-name-or-path",
        str(job.model),
        "--data-path",
        str(job.data),
        "--hidden-states-path",
        str(spill),
        "--save-path",
        str(save),
        *job.train_flags(),
    )
    group = run_pipeline_group({"train": cmd}, work / "logs", watch=save / "train_log.jsonl")
    report = last_json(group.logs["train"])
    return {
        "wall_s": group.wall_s,
        **trainer_figures(save / "train_log.jsonl", group),
        "hs_bytes": 0,
        "other_bytes": tree_bytes(save),
        "preload_s": report["preload_s"],
        "preloaded_samples": report["samples"],
        "processes": _processes(group),
        "other_cpu_s": group.other_cpu_s,
    }


# --------------------------------------------------------------------------------------------
# Setup, report


def probe_capacity(*, attempts: int, quick: bool) -> dict:
    """``cpu_capacity``, tried again (up to ``attempts`` times) while other processes disturb it;
    the least disturbed attempt is kept and says whether it was quiet."""
    best = None
    for _ in range(attempts):
        probe = cpu_capacity(repeats=1, iterations=3_000_000) if quick else cpu_capacity()
        probe["quiet"] = probe["other_cpu_s"] <= 0.1 * probe["elapsed_s"]
        if best is None or probe["other_cpu_s"] < best["other_cpu_s"]:
            best = probe
        if probe["quiet"]:
            break
    return best


def grant_order(data: Path, *, epochs: int, total_seq_len: int) -> list[tuple[int, int]]:
    """(epoch, sample id) in the order a 1-rank streaming trainer schedules them: each epoch's
    training plan, then the validation plan (validation runs, and is streamed, every epoch)."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from protocol.dataset import PreparedDataset
    from trainer.data.order import fetch_order
    from trainer.data.plan import BatchPlan
    from trainer.data.sources import split_train_val

    dataset = PreparedDataset(data)
    train_ids, val_ids = split_train_val(len(dataset), val_ratio=SPLIT_VAL_RATIO, seed=SEED)
    val = BatchPlan.build(
        sample_ids=val_ids,
        lengths=dataset.lengths(val_ids),
        seed=SEED,
        epoch=0,
        world_size=1,
        total_seq_len=total_seq_len,
        shuffle=False,
    )
    keys = []
    for epoch in range(epochs):
        plan = BatchPlan.build(
            sample_ids=train_ids,
            lengths=dataset.lengths(train_ids),
            seed=SEED,
            epoch=epoch,
            world_size=1,
            total_seq_len=total_seq_len,
        )
        keys += [(epoch, sid) for sid in fetch_order(plan, [0], val_plan=val)]
    return keys


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream bench pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--num-producers", type=int, default=1, help="producer processes in (a), (b) and (c)")
    parser.add_argument("--num-conversations", type=int, default=None, help="default 128 (24 with --quick)")
    parser.add_argument(
        "--total-seq-len", type=int, default=None, help="tokens per batch; default 1024 (512 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of every mode (medians); default 2 (1 with --quick)"
    )
    parser.add_argument("--out", default=None, help="keep artifacts here and write the plot")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    epochs = args.epochs or (1 if args.quick else 3)
    num_conversations = args.num_conversations or (24 if args.quick else 128)
    total_seq_len = args.total_seq_len or (512 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 2)
    if min(epochs, args.num_producers, repeats) < 1 or num_conversations < 2:
        raise SystemExit(
            "bench pipeline: --epochs, --num-producers and --repeats must be >= 1, --num-conversations >= 2"
        )

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print("setup: tiny target, prepared data, CPU capacity probe ...", file=sys.stderr, flush=True)
        model, data = prepare_inputs(root / "inputs", num_conversations)
        keys_file = root / "inputs" / "grant_order.json"
        keys_file.write_text(json.dumps(grant_order(data, epochs=epochs, total_seq_len=total_seq_len)))
        capacity = probe_capacity(attempts=1 if args.quick else 3, quick=args.quick)
        job = Job(
            model=model,
            data=data,
            epochs=epochs,
            num_producers=args.num_producers,
            total_seq_len=total_seq_len,
            keys_file=keys_file,
        )
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for k in range(repeats):
            work = root / f"r{k}"
            for mode in MODES:
                shutil.rmtree(work / mode, ignore_errors=True)
            print(
                f"repeat {k + 1}/{repeats}: streaming, offline, producer alone, trainer alone",
                file=sys.stderr,
                flush=True,
            )
            runs["streaming"].append(run_streaming(job, work / "streaming"))
            runs["offline"].append(run_offline(job, work / "offline"))
            runs["producer_alone"].append(run_producer_alone(job, work / "producer_alone"))
            runs["trainer_alone"].append(
                run_trainer_alone(job, work / "trainer_alone", work / "offline" / "hidden_states")
            )
        modes = {mode: aggregate(values) for mode, values in runs.items()}
        plot, plot_note = None, "pass --out DIR to get one"
        if args.out:
            plot = plot_streaming(work / "streaming" / "save" / "train_log.jsonl", root / "pipeline_streaming.png")
            plot_note = "" if plot else "matplotlib missing, or train_log.jsonl lacks samples_in_per_s/buffer_fill/..."
        result = {
            "bench": "pipeline",
            "regime": {
                "num_conversations": num_conversations,
                "epochs": epochs,
                "num_producers": args.num_producers,
                "nproc_per_node": 1,
                "total_seq_len": total_seq_len,
                "seq_length": SEQ_LENGTH,
                "draft_vocab_size": DRAFT_VOCAB,
                "repeats": repeats,
                "cpus": os.cpu_count(),
                "omp_num_threads": 1,
                "quick": args.quick,
            },
            "cpu_capacity": capacity,
            "modes": modes,
            "summary": summarize(modes, capacity, args.num_producers),
            "per_repeat": {
                mode: [{k: r.get(k) for k in ("wall_s", "steady_s", "stall_pct", "other_cpu_s")} for r in values]
                for mode, values in runs.items()
            },
            "plot": str(plot) if plot else None,
            "plot_note": plot_note,
        }
        print_report(result)
        print(json.dumps(result))
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
