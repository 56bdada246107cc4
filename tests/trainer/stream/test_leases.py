"""Lease bookkeeping: grants in plan order, expiry and loss re-grant, and only a live lease's token
admits a sample."""

from __future__ import annotations

import random

import pytest

from trainer.stream.leases import LeaseTable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def table(seconds=10.0):
    clock = Clock()
    return LeaseTable(lease_seconds=seconds, clock=clock), clock


def test_grants_follow_plan_order_and_stay_within_one_epoch():
    leases, _ = table()
    leases.need([(0, 5), (0, 3), (1, 9)])
    first = leases.take("p0", limit=5)
    assert first.sample_ids == (5, 3) and first.epoch == 0
    second = leases.take("p1", limit=5)
    assert second.sample_ids == (9,) and second.epoch == 1
    assert leases.take("p0", limit=5) is None


def test_take_stops_where_the_buffer_budget_says_no():
    leases, _ = table()
    leases.need([(0, i) for i in range(6)])
    budget = {"left": 3}

    def fits(key):
        if budget["left"] == 0:
            return False
        budget["left"] -= 1
        return True

    assert leases.take("p", limit=10, fits=fits).sample_ids == (0, 1, 2)
    assert leases.num_pending == 3 and leases.num_outstanding == 3


def test_lost_lease_is_granted_again_ahead_of_fresh_work_in_plan_order():
    leases, clock = table(seconds=5)
    leases.need([(0, i) for i in range(8)])
    a = leases.take("slow", limit=2)  # 0, 1
    b = leases.take("dead", limit=2)  # 2, 3
    leases.on_sample(0, 0)
    clock.now = 6
    assert sorted(lease.lease_id for lease in leases.expire()) == [a.lease_id, b.lease_id]
    assert leases.num_expired == 2 and a.lease_id not in leases.leases and b.lease_id not in leases.leases
    assert leases.peek_pending(10) == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7)]
    again = leases.take("healthy", limit=3)
    assert again.sample_ids == (1, 2, 3)


def deliver(leases, lease, sample_id):
    """A producer holding ``lease`` delivers ``sample_id``: admitted and kept, or the reason not."""
    key = (lease.epoch, sample_id)
    reason = leases.admit(key, lease.lease_id, lease.token)
    if not reason:
        leases.on_sample(*key)
    return reason


def test_only_the_live_lease_holding_a_key_with_its_token_admits_a_sample():
    leases, clock = table(seconds=1)
    leases.need([(0, 1), (0, 2), (0, 3)])
    slow = leases.take("slow", limit=2)
    assert leases.admit((0, 1), slow.lease_id, "0" * 32) == "bad token"
    assert leases.admit((0, 1), slow.lease_id, "") == "bad token"
    assert leases.admit((0, 1), slow.lease_id + 1, slow.token) == "not its lease"
    assert leases.admit((0, 3), slow.lease_id, slow.token) == "not granted"  # needed, but nobody holds it
    assert leases.admit((0, 99), slow.lease_id, slow.token) == "not needed"
    assert leases.admit((7, 1), slow.lease_id, slow.token) == "not needed"
    clock.now = 2
    leases.expire()
    fast = leases.take("fast", limit=2)
    assert fast.token != slow.token and len(fast.token) == 32
    assert deliver(leases, slow, 1) == "not its lease"  # the expired lease is void
    assert deliver(leases, fast, 1) == ""
    assert deliver(leases, fast, 1) == "duplicate"


def test_a_sample_on_an_expired_lease_is_dropped_and_the_key_granted_again():
    leases, clock = table(seconds=1)
    leases.need([(0, 1)])
    slow = leases.take("slow", limit=1)
    clock.now = 2
    assert [lease.lease_id for lease in leases.expire()] == [slow.lease_id]
    assert deliver(leases, slow, 1) == "not granted"
    assert leases.take("other", limit=1).sample_ids == (1,)


def test_producer_lost_and_failed_leases_return_their_keys():
    leases, _ = table()
    leases.need([(0, i) for i in range(6)])
    a = leases.take("p0", limit=2)
    leases.take("p1", limit=2)
    assert leases.outstanding_for("p1") == 2
    assert leases.producer_lost("p1") == [(0, 2), (0, 3)]
    assert leases.fail(a.lease_id, [1], producer="p1") is None  # only the holder may fail it
    assert leases.fail(a.lease_id, [1], producer="p0") == [(0, 1)]
    assert leases.fail(12345) == []
    assert leases.peek_pending(3) == [(0, 1), (0, 2), (0, 3)]


def test_a_key_cannot_be_needed_twice_until_forgotten():
    leases, _ = table()
    leases.need([(0, 1)])
    with pytest.raises(ValueError, match="already needed"):
        leases.need([(0, 1)])
    assert deliver(leases, leases.take("p", 1), 1) == ""
    leases.forget([(0, 1)])
    leases.need([(0, 1)])  # the next use of the same sample (e.g. replay) is a new need


def test_random_failures_never_lose_or_duplicate_a_sample():
    rng = random.Random(0)
    leases, clock = table(seconds=3)
    keys = [(e, i) for e in range(2) for i in range(200)]
    leases.need(keys)
    kept: list[tuple[int, int]] = []
    inflight: dict[str, list] = {f"p{i}": [] for i in range(4)}  # (lease, sample id) still to send
    while len(kept) < len(keys):
        clock.now += 1
        leases.expire()
        for producer, queue in inflight.items():
            if not queue and (lease := leases.take(producer, limit=rng.randint(1, 6))):
                queue.extend((lease, s) for s in lease.sample_ids)
            if queue:
                if rng.random() < 0.1:
                    queue.clear()
                    leases.producer_lost(producer)  # crash
                elif rng.random() < 0.7:
                    lease, sample_id = queue.pop(0)
                    if not deliver(leases, lease, sample_id):
                        kept.append((lease.epoch, sample_id))
    assert sorted(kept) == sorted(keys)
    assert leases.num_outstanding == 0 and leases.num_pending == 0


def test_a_sample_that_arrives_before_it_was_granted_is_dropped_and_granted_normally():
    leases, _ = table()
    leases.need([(0, i) for i in range(4)])
    assert leases.admit((0, 2), 1, "") == "not granted"  # e.g. on a restarted trainer's old lease
    lease = leases.take("p", limit=10)
    assert lease.sample_ids == (0, 1, 2, 3)
    assert deliver(leases, lease, 2) == ""


def test_a_key_returned_twice_is_granted_once():
    leases, _ = table()
    leases.need([(0, i) for i in range(4)])
    for _ in range(2):
        leases.fail(leases.take("x", limit=1).lease_id)
    assert leases.peek_pending(10) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert leases.take("y", limit=8).sample_ids == (0, 1, 2, 3)
