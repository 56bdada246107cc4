"""Fan-out scaling benchmark (issue 7): how the whole trainer's throughput moves with the number of
trainer ranks fed by one producer, and with the number of producers feeding one rank.

::

    (a) ranks      draftstream run --num-producers 1 --nproc-per-node R   for R in 1..R_max
    (b) producers  draftstream run --num-producers P --nproc-per-node 1   for P in 1..P_max

Every run streams over ZeroMQ on loopback (``--stream-endpoint tcp://127.0.0.1:<free port>``), on
the tiny local target of ``draftstream make-tiny-target`` (Llama, hidden 64, 8 layers, fp32,
random weights) and its conversations prepared at --seq-length 512 (``bench.runs``, shared with
``bench.pipeline``),
training an Eagle-3 draft (draft vocab 256) with --total-seq-len 1024, every child with
OMP_NUM_THREADS=1. The point R=1, P=1 is run once and shared by both curves.

Regime: this is a 2-vCPU CPU machine. R trainer ranks and P producers are R + P single-threaded
processes on 2 cores, so past 2 processes they time-share: the figures show the protocol's
fan-out overhead and CPU contention, not the scaling one would get with a GPU per rank/producer.

Figure, per run: steady samples/s = samples trained by the whole trainer (the sum over ranks, from
``<save>/accounting/rank*.jsonl``) in every step but the run's first, over the trainer's steady
time: the sum of rank 0's ``step_wall_s`` (``<save>/train_log.jsonl``; only rank 0 writes it;
ranks step together) over the same steps. The first step also waits for producers to start;
validation and checkpoints fall between steps and are not counted. The process wall (launch to
exit, imports and model loads included) and the stall share (``data_wait_s / step_wall_s``) are
reported alongside. Setup (target, prepared data) is not timed.

With ``--out DIR`` artifacts are kept there and ``fanout.png`` (samples/s against the count, both
curves) is written; without it everything goes to a temporary folder that is removed at the end.

    python -m bench.fanout [--max-ranks 2] [--max-producers 3] [--epochs 2] [--num-conversations 256] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from bench.runs import DRAFT_VOCAB, cli, prepare_inputs, pyplot, read_train_log, run_group, save_figure

TOTAL_SEQ_LEN = 1024


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_flags(epochs: int) -> list[str]:
    return [
        "--epochs",
        str(epochs),
        "--lr",
        "3e-3",
        "--total-seq-len",
        str(TOTAL_SEQ_LEN),
        "--draft-vocab-size",
        str(DRAFT_VOCAB),
        "--log-every",
        "5",
        "--no-progress",
    ]


def steady_figures(save: Path) -> dict:
    """Samples trained (all ranks) and rank 0's step wall over every step but the run's first."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from trainer.training.accounting import read_accounting

    _, steps = read_train_log(save / "train_log.jsonl")
    if len(steps) < 2:
        raise RuntimeError(f"{save}: fewer than 2 training steps logged; make the job longer")
    if not all("step_wall_s" in r for r in steps):
        raise RuntimeError(f"{save}/train_log.jsonl: steps carry no step_wall_s")
    first = min(r["global_step"] for r in steps)
    steady = [r for r in steps if r["global_step"] != first]
    wall = sum(r["step_wall_s"] for r in steady)
    accounting = read_accounting(save)
    samples = sum(len(a["sample_ids"]) for a in accounting if a["global_step"] != first)
    all_samples = sum(len(a["sample_ids"]) for a in accounting)
    wait = sum(r.get("data_wait_s", 0.0) for r in steady)
    return {
        "steps": len(steps),
        "steady_steps": len(steady),
        "steady_s": wall,
        "samples": all_samples,
        "steady_samples": samples,
        "samples_per_s": samples / wall if wall > 0 else None,
        "tokens_per_s": sum(int(r["num_tokens"]) for r in steady) / wall if wall > 0 else None,
        "stall_pct": 100.0 * wait / wall if wall > 0 else None,
        "first_step_s": steps[0]["step_wall_s"],
    }


def run_point(model: Path, data: Path, work: Path, *, producers: int, ranks: int, epochs: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    save = work / "save"
    cmd = cli(
        "run",
        "--model",
        str(model),
        "--data",
        str(data),
        "--save-path",
        str(save),
        "--num-producers",
        str(producers),
        "--nproc-per-node",
        str(ranks),
        "--stream-endpoint",
        f"tcp://127.0.0.1:{_free_port()}",
        "--",
        *train_flags(epochs),
    )
    group = run_group({"run": cmd}, work / "logs", watch=save / "train_log.jsonl")
    return {
        "producers": producers,
        "ranks": ranks,
        "wall_s": group.wall_s,
        "other_cpu_s": group.other_cpu_s,
        **steady_figures(save),
    }


def print_table(result: dict) -> None:
    r = result["regime"]
    print(
        f"fanout: {r['num_conversations']} conversations x {r['epochs']} epochs, total-seq-len {r['total_seq_len']}, "
        f"loopback tcp, {r['cpus']} vCPUs, OMP_NUM_THREADS=1 (CPU contention, not GPU scaling)"
    )
    header = (
        f"{'series':<11}{'P':>3}{'R':>3}{'samples/s':>11}{'vs 1':>7}{'tokens/s':>10}{'stall %':>9}"
        f"{'steady s':>10}{'samples':>9}{'wall s':>8}{'other CPU s':>13}"
    )
    print(header)
    print("-" * len(header))
    for series in ("ranks", "producers"):
        points = result["series"][series]
        base = points[0]["samples_per_s"]
        for p in points:
            rel = p["samples_per_s"] / base if base else float("nan")
            print(
                f"{series:<11}{p['producers']:>3}{p['ranks']:>3}{p['samples_per_s']:>11.1f}{rel:>7.2f}"
                f"{p['tokens_per_s']:>10.0f}{p['stall_pct']:>9.1f}{p['steady_s']:>10.2f}{p['steady_samples']:>9}"
                f"{p['wall_s']:>8.1f}{p['other_cpu_s']:>13.1f}"
            )
    busy = [
        f"P={p['producers']} R={p['ranks']}"
        for s in result["series"].values()
        for p in s
        if p["other_cpu_s"] > 0.1 * p["wall_s"]
    ]
    if busy:
        print(f"WARNING: other processes used > 10% of a core during {', '.join(sorted(set(busy)))}; figures disturbed")
    print(f"plot: {result['plot']}" if result["plot"] else f"plot: none ({result['plot_note']})")


def plot(result: dict, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series, key, label in (
        ("ranks", "ranks", "1 producer -> R trainer ranks"),
        ("producers", "producers", "P producers -> 1 trainer rank"),
    ):
        points = result["series"][series]
        ax.plot([p[key] for p in points], [p["samples_per_s"] for p in points], marker="o", label=label)
    counts = sorted({p[k] for s, k in (("ranks", "ranks"), ("producers", "producers")) for p in result["series"][s]})
    ax.set_xticks(counts)
    ax.set_xlabel("count (R ranks or P producers)")
    ax.set_ylabel("steady samples/s (whole trainer)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(
        f"draftstream fan-out on loopback, tiny target, {os.cpu_count()} vCPUs (contention, not GPU scaling)",
        fontsize=9,
    )
    return save_figure(fig, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-ranks", type=int, default=None, help="R = 1..this; default 2")
    parser.add_argument("--max-producers", type=int, default=None, help="P = 1..this; default 3 (2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--num-conversations", type=int, default=None, help="default 256 (48 with --quick)")
    parser.add_argument("--out", default=None, help="keep artifacts here and write fanout.png")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    max_ranks = args.max_ranks or 2
    max_producers = args.max_producers or (2 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else 2)
    num_conversations = args.num_conversations or (48 if args.quick else 256)
    if min(max_ranks, max_producers, epochs) < 1 or num_conversations < 2:
        raise SystemExit("bench fanout: counts and --epochs must be >= 1, --num-conversations >= 2")

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print("setup: tiny target, prepared data ...", file=sys.stderr, flush=True)
        model, data = prepare_inputs(root / "inputs", num_conversations)
        points: dict[tuple[int, int], dict] = {}
        wanted = [(1, r) for r in range(1, max_ranks + 1)] + [(p, 1) for p in range(2, max_producers + 1)]
        for producers, ranks in wanted:
            print(f"run: {producers} producer(s) -> {ranks} rank(s)", file=sys.stderr, flush=True)
            points[(producers, ranks)] = run_point(
                model, data, root / f"p{producers}_r{ranks}", producers=producers, ranks=ranks, epochs=epochs
            )
        result = {
            "bench": "fanout",
            "regime": {
                "num_conversations": num_conversations,
                "epochs": epochs,
                "total_seq_len": TOTAL_SEQ_LEN,
                "draft_vocab_size": DRAFT_VOCAB,
                "endpoint": "tcp://127.0.0.1",
                "cpus": os.cpu_count(),
                "omp_num_threads": 1,
                "quick": args.quick,
            },
            "series": {
                "ranks": [points[(1, r)] for r in range(1, max_ranks + 1)],
                "producers": [points[(p, 1)] for p in range(1, max_producers + 1)],
            },
        }
        png = plot(result, root / "fanout.png")
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
