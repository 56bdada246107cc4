"""What the end-to-end benchmarks (``bench.pipeline``, ``bench.fanout``) share: the tiny job they
run (target, prepared data, sizes), how they start and measure child processes, how they read the
trainer's ``<save>/train_log.jsonl``, and the plot backend.

The job: the tiny local target of ``draftstream make-tiny-target`` (Llama, hidden 64, 8 layers,
fp32, random weights) and its conversations, prepared at ``--seq-length`` ``SEQ_LENGTH``; an
Eagle-3 draft with a ``DRAFT_VOCAB`` draft vocabulary. Every child runs with OMP_NUM_THREADS=1 and
the hub offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bench.processes import GroupRun, run_processes

SEQ_LENGTH = 512  # draftstream prepare --seq-length
DRAFT_VOCAB = 256


def cli(*args: str) -> list[str]:
    """A ``draftstream`` command line run with this interpreter."""
    return [sys.executable, "-m", "protocol.cli", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return env


def run_group(
    commands: dict[str, list[str]],
    log_dir: Path,
    *,
    watch: Path | None = None,
    label: Callable[[list[str]], str | None] | None = None,
) -> GroupRun:
    """``bench.processes.run_processes`` with the benchmarks' child environment."""
    return run_processes(commands, log_dir, env=child_env(), watch=watch, label=label)


def last_json(path: Path) -> dict:
    """The last JSON line a worker printed (its report)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in {path}")


def read_train_log(train_log: Path) -> tuple[list[dict], list[dict]]:
    """Every record of a ``train_log.jsonl``, and its training steps (``kind: train``)."""
    records = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    return records, [r for r in records if r.get("kind") == "train"]


def prepare_inputs(root: Path, num_conversations: int) -> tuple[Path, Path]:
    """Tiny target + prepared data with the package's own commands (not timed). They run in this
    process, through the ``draftstream`` dispatcher: one transformers import instead of two."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from protocol.cli import main as draftstream

    (root / "logs").mkdir(parents=True, exist_ok=True)
    target, prepared = root / "target", root / "prepared"
    commands = [
        ["make-tiny-target", "--out", str(target), "--num-conversations", str(num_conversations)],
        [
            "prepare",
            "--model",
            str(target / "model"),
            "--data",
            str(target / "conversations.jsonl"),
            "--output",
            str(prepared),
            "--seq-length",
            str(SEQ_LENGTH),
        ],
    ]
    with (
        open(root / "logs" / "setup.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        for command in commands:
            if draftstream(command) != 0:
                raise RuntimeError(f"bench setup: `draftstream {' '.join(command)}` failed; see {log.name}")
    return target / "model", prepared


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib (the [plot] extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
