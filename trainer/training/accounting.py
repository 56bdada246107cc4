"""Sample-id accounting: the record that proves every planned sample was trained on exactly as
often as the plan says, across restarts.

After every optimizer step each process appends one JSON line per logical rank it played to
``<save>/accounting/rank<r>.jsonl``::

    {"epoch": 0, "step": 3, "global_step": 4, "logical_rank": 1, "sample_ids": [17, 4], "skipped": []}

``sample_ids`` are the samples whose gradients went into that step; ``skipped`` the planned ones
the source could not deliver (``--on-missing skip|warn``). Lines are flushed every step. When a run
resumes from a checkpoint at global step g, lines with ``global_step > g`` (work done after the
checkpoint and lost with the process) are dropped, so the record lists exactly the samples whose
gradients are in the current weights. ``read_accounting`` reads every rank's file back.
"""

from __future__ import annotations

import json
from pathlib import Path

ACCOUNTING_DIR = "accounting"


class AccountingLog:
    """Append-only JSON lines of trained sample ids for one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def record(
        self, *, epoch: int, step: int, global_step: int, logical_rank: int, sample_ids: list[int], skipped: list[int]
    ) -> None:
        line = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "logical_rank": logical_rank,
            "sample_ids": list(sample_ids),
            "skipped": list(skipped),
        }
        self._file.write(json.dumps(line) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """After the file was rewritten by ``truncate_records``."""
        self.close()
        self._file = self.path.open("a")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def truncate_records(path: Path, global_step: int) -> int:
    """Rewrite a JSON-lines file keeping lines with ``global_step <= global_step`` (and dropping a
    line cut short by a hard kill); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(rec.get("global_step", 0)) <= global_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(path)
    return dropped


def truncate_accounting(save_path: str | Path, global_step: int) -> int:
    """Drop every rank's records past ``global_step``; returns how many."""
    return sum(truncate_records(p, global_step) for p in sorted((Path(save_path) / ACCOUNTING_DIR).glob("rank*.jsonl")))


def read_accounting(save_path: str | Path) -> list[dict]:
    """Every accounting record under ``<save>/accounting``, sorted by (global_step, logical_rank)."""
    records = []
    for path in sorted((Path(save_path) / ACCOUNTING_DIR).glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: (r["global_step"], r["logical_rank"]))


def trained_counts(records: list[dict]) -> dict[int, int]:
    """How many times each sample id was trained on, over ``records``."""
    counts: dict[int, int] = {}
    for rec in records:
        for sid in rec["sample_ids"]:
            counts[sid] = counts.get(sid, 0) + 1
    return counts
