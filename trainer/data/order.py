"""The fetch order: which sample ids a process asks its source for, step by step, derived once.

A process trains, at every step of an epoch, one batch of the plan per *logical rank* it plays
(``trainer.training.loop``: process ``r`` plays ``r*A .. r*A+A-1`` under gradient accumulation),
in that order; validation then walks the validation plan with the process's rank. Everything that
needs this order takes it from here:

- the prefetcher (``trainer.data.prefetch``) fetches ``train_steps`` slot by slot;
- ``Trainer.validate`` fetches ``val_steps``;
- ``Trainer`` tells a streaming source ahead what it will fetch: ``fetch_order``, the same slots
  flattened (a streaming source refuses a fetch that leaves that order: "fetch order diverged");
- ``bench.pipeline`` replays the order a 1-rank trainer grants, for its producer-alone mode.

A *slot* is ``(logical rank, sample ids)``; an empty id list is a filler slot (see
``trainer.data.plan``), still fetched (an empty fetch) so every rank runs the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from trainer.data.plan import BatchPlan

Slot = tuple[int, list[int]]  # (logical rank, sample ids of its batch; [] = filler)


def step_slots(plan: BatchPlan, logical_ranks: Sequence[int], step: int) -> list[Slot]:
    """The slots of ``step``: one per logical rank, in the order the process trains them."""
    return [(lr, plan.batches_for(lr, step)) for lr in logical_ranks]


def train_steps(
    plan: BatchPlan, logical_ranks: Sequence[int], start_step: int = 0, end_step: int | None = None
) -> Iterator[tuple[int, list[Slot]]]:
    """``(step, slots)`` from the cursor ``start_step`` up to ``end_step`` (default: the epoch's end)."""
    end = plan.num_steps if end_step is None else end_step
    for step in range(start_step, end):
        yield step, step_slots(plan, logical_ranks, step)


def val_steps(plan: BatchPlan, rank: int) -> Iterator[tuple[int, list[Slot]]]:
    """Validation's ``(step, slots)``: the validation plan's batches of this process's rank (no
    gradient accumulation: the validation plan is built for the process world)."""
    return train_steps(plan, [rank])


def sample_ids(steps: Iterable[tuple[int, list[Slot]]]) -> list[int]:
    """The slots' sample ids, flattened in fetch order."""
    return [sid for _, slots in steps for _, ids in slots for sid in ids]


def fetch_order(
    plan: BatchPlan,
    logical_ranks: Sequence[int],
    *,
    start_step: int = 0,
    end_step: int | None = None,
    val_plan: BatchPlan | None = None,
    val_rank: int = 0,
) -> list[int]:
    """Every sample id one process fetches in an epoch, in order: training from ``start_step`` to
    ``end_step``, then (with ``val_plan``) validation, which fetches from the same source."""
    ids = sample_ids(train_steps(plan, logical_ranks, start_step, end_step))
    if val_plan is not None:
        ids += sample_ids(val_steps(val_plan, val_rank))
    return ids


def steps_to_train(
    plans: Sequence[BatchPlan], epoch: int, *, cursor: tuple[int, int], global_step: int, max_steps: int | None
) -> tuple[int, int] | None:
    """The steps ``[start, end)`` of ``epoch`` that a run at ``cursor`` (epoch, step in it), having
    taken ``global_step`` steps, will still train under ``--max-steps``; None if it ends before
    ``epoch``. A later epoch is entered only if steps are left for it, so a schedule is exact."""
    cursor_epoch, cursor_step = cursor
    start = cursor_step if epoch == cursor_epoch else 0
    end = plans[epoch].num_steps
    if max_steps is None:
        return start, end
    steps_before = sum(plans[e].num_steps for e in range(cursor_epoch, epoch)) - (
        cursor_step if epoch > cursor_epoch else 0
    )
    budget = max_steps - global_step - steps_before
    if epoch > cursor_epoch and budget <= 0:
        return None
    return start, min(end, start + max(0, budget))
