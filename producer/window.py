"""One capture, several trainings: the captures a producer keeps for the other trainer jobs it serves.

A producer connected to several trainer jobs (one ``--connect`` address each, for example an
Eagle-3 and a P-EAGLE run, or two learning rates) answers every job's grants. All jobs share the
target, the captured layers and the prepared dataset (each job's handshake checks them), so a
row's hidden states are the same whichever job asked: a row granted by several jobs needs one
target forward. ``StreamProducer`` captures a row once per batch however many jobs granted it, and
keeps the capture here for the live jobs that have not been sent it yet. When one of them grants
the row, the capture goes out again from here, with that job's epoch, lease and token.

The window is bounded in bytes (``--share-window-bytes``): when a new capture does not fit, the
least recently used ones go first; a capture larger than the whole window is not kept. An entry
leaves as soon as every job it was kept for has had it, or its last such job is gone. The window
decides only how much the jobs share, never what they get: a job whose row was evicted (its plan
runs far behind, or differs) has the row captured again, so every job still gets every planned
sample, as often as planned.

Stored captures are compact copies (a backend's sample may be a view into a padded batch), so
``used_bytes`` is what the window holds.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Iterable

import torch

from protocol.messages import Sample


@dataclasses.dataclass
class _Entry:
    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    hidden_states: torch.Tensor
    owed: set[Hashable]  # the jobs this capture is kept for
    nbytes: int


@dataclasses.dataclass
class WindowStats:
    kept: int = 0  # captures stored for other jobs
    hits: int = 0  # grants answered from the window
    evicted: int = 0  # captures dropped for room before every job they were kept for had them
    too_large: int = 0  # captures larger than the window, not kept
    peak_bytes: int = 0


class CaptureWindow:
    """Captures keyed by sample id, each kept for a set of jobs, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"--share-window-bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.stats = WindowStats()
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, sample_id: int, job: Hashable) -> Sample | None:
        """The capture of ``sample_id`` for ``job`` (None if the window has none). Its lease fields
        are the caller's to fill."""
        entry = self._entries.get(sample_id)
        if entry is None:
            return None
        self.stats.hits += 1
        entry.owed.discard(job)
        if entry.owed:
            self._entries.move_to_end(sample_id)
        else:
            self._drop(sample_id)
        return Sample(
            sample_id=sample_id,
            epoch=0,
            lease_id=0,
            token_ids=entry.token_ids,
            loss_mask=entry.loss_mask,
            hidden_states=entry.hidden_states,
        )

    def keep(self, sample: Sample, owed: Iterable[Hashable]) -> None:
        """Keep ``sample`` for the jobs in ``owed`` (nothing is kept for nobody)."""
        owed = set(owed)
        if not owed or self.budget_bytes == 0:
            return
        nbytes = sample.nbytes
        if nbytes > self.budget_bytes:
            self.stats.too_large += 1
            return
        if sample.sample_id in self._entries:
            self._entries[sample.sample_id].owed |= owed
            self._entries.move_to_end(sample.sample_id)
            return
        while self.used_bytes + nbytes > self.budget_bytes:
            oldest = next(iter(self._entries))
            self.stats.evicted += 1
            self._drop(oldest)
        self._entries[sample.sample_id] = _Entry(
            token_ids=sample.token_ids.clone(),
            loss_mask=sample.loss_mask.clone(),
            hidden_states=sample.hidden_states.contiguous().clone(),
            owed=owed,
            nbytes=nbytes,
        )
        self.used_bytes += nbytes
        self.stats.kept += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes)

    def forget_job(self, job: Hashable) -> None:
        """``job`` is gone (finished, or restarting): nothing more is kept for it."""
        for sample_id in [sid for sid, e in self._entries.items() if job in e.owed]:
            entry = self._entries[sample_id]
            entry.owed.discard(job)
            if not entry.owed:
                self._drop(sample_id)

    def _drop(self, sample_id: int) -> None:
        self.used_bytes -= self._entries.pop(sample_id).nbytes
