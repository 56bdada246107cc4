"""The batch plan: deterministic, every sample exactly once per epoch, equal steps on every rank,
token budget respected."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.data import order
from trainer.data.plan import BatchPlan, derive_seed


def _plan(lengths, *, seed=0, epoch=0, world_size=2, total_seq_len=100, shuffle=True, ids=None):
    ids = list(range(len(lengths))) if ids is None else ids
    return BatchPlan.build(
        sample_ids=ids,
        lengths=lengths,
        seed=seed,
        epoch=epoch,
        world_size=world_size,
        total_seq_len=total_seq_len,
        shuffle=shuffle,
    )


LENGTHS = [17, 80, 33, 5, 120, 64, 64, 1, 99, 50, 12, 40, 71, 8, 100, 30]


def test_plan_is_deterministic_for_seed_and_epoch():
    assert _plan(LENGTHS, seed=3, epoch=1) == _plan(LENGTHS, seed=3, epoch=1)
    assert _plan(LENGTHS, seed=3, epoch=1).fingerprint == _plan(LENGTHS, seed=3, epoch=1).fingerprint


def test_plan_order_changes_with_epoch_and_seed():
    base = _plan(LENGTHS, seed=3, epoch=1).all_sample_ids()
    assert _plan(LENGTHS, seed=3, epoch=2).all_sample_ids() != base
    assert _plan(LENGTHS, seed=4, epoch=1).all_sample_ids() != base


def test_unshuffled_plan_keeps_the_given_order():
    assert _plan(LENGTHS, shuffle=False).all_sample_ids() == list(range(len(LENGTHS)))


def test_every_sample_appears_exactly_once_per_epoch():
    plan = _plan(LENGTHS, world_size=3)
    seen = collections.Counter(sid for r in range(3) for sid in order.sample_ids(order.train_steps(plan, [r])))
    assert seen == collections.Counter(range(len(LENGTHS)))


def test_every_rank_gets_the_same_number_of_steps():
    plan = _plan(LENGTHS, world_size=3)
    per_rank = [len(list(order.train_steps(plan, [r]))) for r in range(3)]
    assert per_rank == [plan.num_steps] * 3
    assert plan.num_steps == -(-plan.num_batches // 3)


def test_only_the_last_step_has_empty_slots():
    plan = _plan(LENGTHS, world_size=4)
    empties = [(r, s) for s in range(plan.num_steps) for r in range(4) if not plan.batches_for(r, s)]
    assert len(empties) == plan.num_steps * 4 - plan.num_batches
    assert all(s == plan.num_steps - 1 for _, s in empties)


def test_batches_respect_the_token_budget_with_truncation():
    plan = _plan(LENGTHS, total_seq_len=100)
    for b, tokens in zip(plan.batches, plan.batch_tokens):
        assert tokens == sum(min(LENGTHS[i], 100) for i in b)
        assert tokens <= 100


def test_an_over_long_sample_fills_a_batch_alone():
    plan = _plan([30, 500, 30], total_seq_len=100, shuffle=False, world_size=1)
    assert plan.batches == ((0,), (1,), (2,))
    assert plan.batch_tokens == (30, 100, 30)


def test_cursor_iteration_resumes_where_it_stopped():
    plan = _plan(LENGTHS, world_size=2, total_seq_len=90)
    full = order.sample_ids(order.train_steps(plan, [1]))
    head = [sid for step in range(3) for sid in plan.batches_for(1, step)]
    assert head + order.sample_ids(order.train_steps(plan, [1], start_step=3)) == full
    assert [s for s, _ in order.train_steps(plan, [0], start_step=2)] == list(range(2, plan.num_steps))


def test_logical_ranks_of_a_bigger_world_cover_the_same_batches():
    """One process with 2 accumulation steps plays logical ranks 0 and 1 of a world-2 plan."""
    plan = _plan(LENGTHS, world_size=2)
    global_order = [sid for s in range(plan.num_steps) for r in range(2) for sid in plan.batches_for(r, s)]
    assert global_order == plan.all_sample_ids()


def test_sample_ids_need_not_be_contiguous():
    ids = [10, 3, 77, 5]
    plan = _plan([10, 20, 30, 40], ids=ids, world_size=1)
    assert sorted(plan.all_sample_ids()) == sorted(ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[1, 0]), "empty samples"),
        (dict(lengths=[1, 2], ids=[1, 1]), "unique"),
        (dict(lengths=[1], world_size=0), "world_size"),
        (dict(lengths=[1], total_seq_len=0), "--total-seq-len"),
    ],
)
def test_bad_inputs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _plan(**kwargs)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed("plan", 1, 2) == derive_seed("plan", 1, 2)
    assert derive_seed("plan", 1, 2) != derive_seed("plan", 2, 1)
    assert 0 <= derive_seed("x") < 2**63


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60),
    world_size=st.integers(1, 5),
    total_seq_len=st.integers(1, 256),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_plan_invariants_hold_for_any_input(lengths, world_size, total_seq_len, seed, epoch):
    plan = _plan(lengths, world_size=world_size, total_seq_len=total_seq_len, seed=seed, epoch=epoch)
    seen = collections.Counter(sid for r in range(world_size) for sid in order.sample_ids(order.train_steps(plan, [r])))
    assert seen == collections.Counter(range(len(lengths)))
    assert all(len(list(order.train_steps(plan, [r]))) == plan.num_steps for r in range(world_size))
    assert all(0 < t <= total_seq_len for t in plan.batch_tokens)
    # Greedy packing: a batch closes only when the next sample would not fit.
    for b, nxt in zip(plan.batches, plan.batches[1:]):
        used = sum(min(lengths[i], total_seq_len) for i in b)
        assert used + min(lengths[nxt[0]], total_seq_len) > total_seq_len


def test_reuse_trains_every_sample_k_times_within_its_window_and_never_twice_in_a_batch():
    ids = list(range(40))
    plan = BatchPlan.build(
        sample_ids=ids,
        lengths=[10 + i % 7 for i in ids],
        seed=3,
        epoch=1,
        world_size=2,
        total_seq_len=64,
        reuse=3,
        reuse_window=8,
    )
    assert plan.use_counts() == {i: 3 for i in ids}
    assert all(len(set(batch)) == len(batch) for batch in plan.batches)
    order = plan.all_sample_ids()
    for sid in ids:
        positions = [i for i, s in enumerate(order) if s == sid]
        assert positions[-1] - positions[0] < 3 * 8  # all uses inside the window's K copies
    again = BatchPlan.build(
        sample_ids=ids,
        lengths=[10 + i % 7 for i in ids],
        seed=3,
        epoch=1,
        world_size=2,
        total_seq_len=64,
        reuse=3,
        reuse_window=8,
    )
    assert again.fingerprint == plan.fingerprint
    # Each use of a sample has its own index, counted in global batch order (what noise is seeded by).
    seen = {}
    for step in range(plan.num_steps):
        for rank in range(2):
            uses = plan.uses_at(rank, step)
            assert list(uses) == plan.batches_for(rank, step)
            for sid, use in uses.items():
                assert use == seen.get(sid, 0)
                seen[sid] = use + 1
    assert seen == {i: 3 for i in ids}
