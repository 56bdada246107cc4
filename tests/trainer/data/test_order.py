"""The fetch order is derived once (trainer.data.order): what the prefetcher fetches, step by step,
is what a streaming source is told ahead, element by element."""

from __future__ import annotations

from trainer.data import order
from trainer.data.plan import BatchPlan
from trainer.data.prefetch import Prefetcher, fetch_micro_batches
from trainer.data.sources import FetchResult, SampleSource

LENGTHS = [13, 40, 7, 25, 60, 33, 8, 19, 50, 11, 29, 44, 5, 17]


class RecordingSource(SampleSource):
    """Fetches nothing; remembers the ids asked for, in order."""

    def __init__(self):
        self.asked: list[int] = []

    def fetch(self, sample_ids):
        self.asked += [int(s) for s in sample_ids]
        return FetchResult(samples=[])

    def lengths(self, sample_ids):
        return [LENGTHS[i] for i in sample_ids]


def _plan(world_size, **kw):
    ids = list(range(len(LENGTHS)))
    return BatchPlan.build(
        sample_ids=ids, lengths=LENGTHS, seed=5, epoch=1, world_size=world_size, total_seq_len=64, **kw
    )


def test_the_prefetcher_fetches_the_scheduled_order_from_any_cursor():
    plan = _plan(4)
    for logical_ranks in ([0, 1], [2, 3]):
        for start in range(plan.num_steps + 1):
            source = RecordingSource()
            prefetch = Prefetcher(
                plan=plan, source=source, logical_ranks=logical_ranks, start_step=start, depth=2, pin=False
            )
            try:
                steps = [step for step, _ in prefetch]
            finally:
                prefetch.close()
            assert steps == list(range(start, plan.num_steps))
            assert source.asked == order.fetch_order(plan, logical_ranks, start_step=start)


def test_step_by_step_fetches_match_the_order_up_to_an_end_step():
    plan = _plan(3, reuse=2, reuse_window=4)
    source = RecordingSource()
    for step in range(1, plan.num_steps - 1):
        micros = fetch_micro_batches(plan, source, [1, 2], step)
        assert [m.logical_rank for m in micros] == [1, 2]
    assert source.asked == order.fetch_order(plan, [1, 2], start_step=1, end_step=plan.num_steps - 1)


def test_the_order_is_training_slots_rank_by_rank_then_validation():
    plan, val = (
        _plan(2),
        BatchPlan.build(
            sample_ids=[20, 21, 22],
            lengths=[30, 30, 30],
            seed=0,
            epoch=0,
            world_size=2,
            total_seq_len=64,
            shuffle=False,
        ),
    )
    expected = [sid for step in range(plan.num_steps) for r in (0, 1) for sid in plan.batches_for(r, step)]
    expected += [sid for step in range(val.num_steps) for sid in val.batches_for(1, step)]
    assert order.fetch_order(plan, [0, 1], val_plan=val, val_rank=1) == expected
    assert [slots for _, slots in order.val_steps(val, 1)] == [
        [(1, val.batches_for(1, s))] for s in range(val.num_steps)
    ]
