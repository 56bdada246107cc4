"""Plans for training on live traffic: epoch ``e`` is chunk ``e`` of a growing traffic log.

A live run has no dataset fixed in advance: ``draftstream serve`` appends served rows to a traffic
log (``protocol.trafficlog``) and the trainer trains on them as they come, in chunks of
``chunk_rows`` consecutive rows: chunk ``e`` holds rows ``[e * chunk_rows, (e + 1) * chunk_rows)``.
Its plan is built, like any epoch's (``BatchPlan``), once the log holds the whole chunk, so every
rank builds the same plan from the same rows; until then the loop waits for traffic.

Within a chunk, every ``val_every``-th row is held out for validation (recent traffic the draft has
not trained on: the chunk's ``val_accept_len`` estimates how the draft does on what is being
served now) and the other rows are trained on ``reuse`` times (``--reuse``: a bounded replay
window, ``--reuse-window`` rows wide, as in any streamed epoch). Rows the log drops (malformed,
too long) are counted per chunk and trained on by nobody.

Every row is thus trained on, held out, or dropped with a reason; the accounting files record the
trained ones per step, so a resumed run continues from its cursor and no row is lost or repeated.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

from protocol.signals import StopRequested, stop_requested
from protocol.trafficlog import TrafficLog
from trainer.data.plan import BatchPlan


class LivePlans(Sequence):
    """``plans[e]``: the ``BatchPlan`` of chunk ``e`` (waits until the log holds it); ``len`` is the
    most chunks the run may train (``--epochs``)."""

    def __init__(
        self,
        log: TrafficLog,
        *,
        chunk_rows: int,
        val_every: int,
        epochs: int,
        seed: int,
        world_size: int,
        logical_world_size: int,
        total_seq_len: int,
        reuse: int = 1,
        reuse_window: int = 64,
        poll_seconds: float = 0.5,
    ):
        if chunk_rows < 1:
            raise ValueError(f"--live-chunk-rows must be >= 1, got {chunk_rows}")
        if val_every < 0 or val_every == 1:
            raise ValueError(f"--live-val-every must be 0 (no validation) or >= 2, got {val_every}")
        self.log, self.chunk_rows, self.val_every, self.epochs = log, chunk_rows, val_every, epochs
        self._plan_kwargs = dict(seed=seed, total_seq_len=total_seq_len)
        self._train_kwargs = dict(world_size=logical_world_size, reuse=reuse, reuse_window=reuse_window)
        self.world_size = world_size
        self.poll_seconds = poll_seconds
        self._plans: dict[int, BatchPlan] = {}
        self._val: dict[int, BatchPlan | None] = {}
        self.dropped: dict[int, collections.Counter] = {}

    def __len__(self) -> int:
        return self.epochs

    def rows_of(self, epoch: int) -> range:
        return range(epoch * self.chunk_rows, (epoch + 1) * self.chunk_rows)

    def ready(self, epoch: int) -> bool:
        """Whether chunk ``epoch``'s plan can be built now (never waits)."""
        return epoch in self._plans or self.log.refresh() >= (epoch + 1) * self.chunk_rows

    def built(self, epoch: int) -> BatchPlan | None:
        return self._plans.get(epoch)

    def __getitem__(self, epoch: int) -> BatchPlan:
        if not isinstance(epoch, int) or not 0 <= epoch < self.epochs:
            raise IndexError(f"chunk {epoch} outside 0..{self.epochs - 1}")
        if epoch not in self._plans:
            while not self.ready(epoch):
                if stop_requested():
                    raise StopRequested(
                        f"waiting for traffic: chunk {epoch} needs row {(epoch + 1) * self.chunk_rows - 1}"
                    )
                time.sleep(self.poll_seconds)
            self._build(epoch)
        return self._plans[epoch]

    def val_plan(self, epoch: int) -> BatchPlan | None:
        self[epoch]
        return self._val[epoch]

    def _build(self, epoch: int) -> None:
        rows = self.rows_of(epoch)
        usable = self.log.usable(rows)
        self.dropped[epoch] = collections.Counter(self.log.dropped[i] for i in rows if i in self.log.dropped)
        held = [i for i in usable if self.val_every and (i - rows.start) % self.val_every == self.val_every - 1]
        train = [i for i in usable if i not in set(held)]
        self._plans[epoch] = BatchPlan.build(
            sample_ids=train, lengths=self.log.lengths(train), epoch=epoch, **self._plan_kwargs, **self._train_kwargs
        )
        self._val[epoch] = (
            BatchPlan.build(
                sample_ids=held,
                lengths=self.log.lengths(held),
                epoch=epoch,
                world_size=self.world_size,
                shuffle=False,
                **self._plan_kwargs,
            )
            if held
            else None
        )

    def summary(self, epoch: int) -> dict:
        """What became of chunk ``epoch``'s rows: trained, held out, dropped by reason."""
        plan, val = self[epoch], self._val.get(epoch)
        return {
            "chunk": epoch,
            "rows": [self.rows_of(epoch).start, self.rows_of(epoch).stop],
            "trained": len(set(plan.all_sample_ids())),
            "held_out": len(val.all_sample_ids()) if val is not None else 0,
            "dropped": dict(self.dropped.get(epoch, {})),
        }
