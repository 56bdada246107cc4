"""The batch plan: which samples each rank trains on at each step of an epoch, decided up front.

A plan is a pure function of (sample ids, their lengths, seed, epoch, world size, total_seq_len):
no files, no sockets. The file trainer reads it to know which ``hs_{i}`` files to load; the
streaming trainer reads it to know which sample ids to ask producers for, and in which order. It
is the single source of truth for "every planned sample is trained on exactly once per epoch".

How a plan is made:

1. The ids are shuffled with a generator derived from (seed, epoch) (``shuffle=False`` keeps the
   given order: validation).
2. Samples are packed greedily, in that order, into *batches* of at most ``total_seq_len`` tokens.
   A sample longer than ``total_seq_len`` is truncated to it (``pack`` does the cutting) and so
   fills a batch on its own. Documents stay apart inside a batch through the attention mask.
3. Batch ``b`` goes to rank ``b % world_size`` at step ``b // world_size``. Every rank gets
   ``num_steps = ceil(num_batches / world_size)`` steps; in the last step, ranks beyond the
   remainder get an *empty* batch.

Why empty batches and not dropped or duplicated samples: dropping would break "every sample
exactly once", duplicating would train some twice. A rank with an empty batch still runs the step:
the loop feeds it a synthetic filler batch whose loss is multiplied by zero, so it joins every
FSDP collective (all-gather in forward, reduce-scatter in backward) and nobody hangs, while
contributing nothing to the gradient. At most ``world_size - 1`` such fillers per epoch.

Reuse (``reuse=K``). Streaming can train each sample K times per pass of the target: the shuffled
order is cut into windows of ``reuse_window`` samples and each window is replaced by K shuffled
copies of itself, so the K uses of a sample fall within about K windows of each other, and the
replay buffer holds it only that long. One epoch is then one pass of the target and K passes of
training: ``--epochs E --reuse K`` trains every sample E*K times while the target runs E times. A
batch never holds the same sample twice (a repeat closes the batch early).

"Rank" here is a *logical* rank: with gradient accumulation a process plays several logical ranks
per step (see ``trainer.training.loop``), so one process with ``grad_accum_steps=2`` trains exactly the
batches that two processes do. In which order a process fetches its batches is
``trainer.data.order``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Sequence


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes, Python versions and
    platforms (unlike ``hash``). Every random stream of the trainer is derived this way from the
    user's ``--seed`` and the position in the plan, so results do not depend on how many
    processes ran or where a run was interrupted."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """One epoch's plan. Build it with ``BatchPlan.build``; the fields are the plan itself."""

    seed: int
    epoch: int
    world_size: int
    total_seq_len: int
    batches: tuple[tuple[int, ...], ...]  # global batch order; batch b -> rank b % W, step b // W
    batch_tokens: tuple[int, ...]  # tokens of each batch after truncation

    @classmethod
    def build(
        cls,
        *,
        sample_ids: Sequence[int],
        lengths: Sequence[int],
        seed: int,
        epoch: int,
        world_size: int,
        total_seq_len: int,
        shuffle: bool = True,
        reuse: int = 1,
        reuse_window: int = 64,
    ) -> BatchPlan:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if total_seq_len < 1:
            raise ValueError(f"--total-seq-len must be >= 1, got {total_seq_len}")
        if len(sample_ids) != len(lengths):
            raise ValueError(f"{len(sample_ids)} sample ids but {len(lengths)} lengths")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError("sample ids must be unique")
        length_of = {}
        for sid, n in zip(sample_ids, lengths):
            if n < 1:
                raise ValueError(f"sample {sid} has length {n}; empty samples cannot be trained on")
            length_of[int(sid)] = min(int(n), total_seq_len)
        if reuse < 1 or reuse_window < 1:
            raise ValueError(f"--reuse and --reuse-window must be >= 1, got {reuse} and {reuse_window}")
        order = [int(s) for s in sample_ids]
        if shuffle:
            random.Random(derive_seed("plan", seed, epoch)).shuffle(order)
        if reuse > 1:
            rng = random.Random(derive_seed("reuse", seed, epoch))
            expanded = []
            for start in range(0, len(order), reuse_window):
                window = order[start : start + reuse_window]
                for _ in range(reuse):
                    copy = list(window)
                    rng.shuffle(copy)
                    expanded += copy
            order = expanded
        batches: list[tuple[int, ...]] = []
        batch_tokens: list[int] = []
        current: list[int] = []
        used = 0
        for sid in order:
            n = length_of[sid]
            if current and (used + n > total_seq_len or sid in current):
                batches.append(tuple(current))
                batch_tokens.append(used)
                current, used = [], 0
            current.append(sid)
            used += n
        if current:
            batches.append(tuple(current))
            batch_tokens.append(used)
        return cls(
            seed=seed,
            epoch=epoch,
            world_size=world_size,
            total_seq_len=total_seq_len,
            batches=tuple(batches),
            batch_tokens=tuple(batch_tokens),
        )

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def num_steps(self) -> int:
        """Steps every rank runs this epoch (the same on all ranks)."""
        return -(-len(self.batches) // self.world_size)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches)

    def _index(self, rank: int, step: int) -> int:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside world of {self.world_size}")
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        return step * self.world_size + rank

    def batches_for(self, rank: int, step: int) -> list[int]:
        """Sample ids that ``rank`` trains on at ``step``; empty for a filler step."""
        b = self._index(rank, step)
        return list(self.batches[b]) if b < len(self.batches) else []

    def use_counts(self) -> dict[int, int]:
        """How many times each sample is trained on in this epoch (``reuse`` for every id)."""
        counts: dict[int, int] = {}
        for sid in self.all_sample_ids():
            counts[sid] = counts.get(sid, 0) + 1
        return counts

    def uses_at(self, rank: int, step: int) -> dict[int, int]:
        """``{sample id: use index}`` for the batch of ``rank`` at ``step``: how many earlier
        batches of the epoch (in global order) hold that sample, so 0..reuse-1. Noise is drawn
        per use, not only per sample."""
        b = self._index(rank, step)
        return dict(zip(self.batches[b], self._use_table[b])) if b < len(self.batches) else {}

    @functools.cached_property
    def _use_table(self) -> list[tuple[int, ...]]:
        seen: dict[int, int] = {}
        table = []
        for batch in self.batches:
            table.append(tuple(seen.get(sid, 0) for sid in batch))
            for sid in batch:
                seen[sid] = seen.get(sid, 0) + 1
        return table

    def all_sample_ids(self) -> list[int]:
        return [sid for b in self.batches for sid in b]

    @property
    def fingerprint(self) -> str:
        """Content hash; a resumed run checks that it rebuilt the same plan."""
        payload = json.dumps([self.seed, self.epoch, self.world_size, self.total_seq_len, self.batches])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """Small JSON-able summary stored with checkpoints."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "total_seq_len": self.total_seq_len,
            "num_steps": self.num_steps,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
        }
