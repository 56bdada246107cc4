"""The byte-budget credit ledger: never over-grants, alone or under concurrent use."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from protocol.target import sample_nbytes
from trainer.stream.credit import CreditLedger


def test_grants_only_what_fits_and_releases_on_consumption():
    ledger = CreditLedger(100)
    assert ledger.try_reserve("a", 60)
    assert not ledger.try_reserve("b", 41)
    assert ledger.try_reserve("b", 40)
    assert ledger.used_bytes == 100 and ledger.available_bytes == 0 and len(ledger) == 2
    assert ledger.release("a") == 60
    assert ledger.try_reserve("c", 60)
    assert "c" in ledger and "a" not in ledger


def test_item_larger_than_the_whole_budget_is_a_config_error_naming_the_flag():
    with pytest.raises(ValueError, match="--buffer-bytes"):
        CreditLedger(100).try_reserve("x", 101)
    with pytest.raises(ValueError, match="--buffer-bytes"):
        CreditLedger(0)


def test_double_reserve_and_double_release_are_errors():
    ledger = CreditLedger(100)
    ledger.try_reserve("a", 10)
    with pytest.raises(KeyError):
        ledger.try_reserve("a", 10)
    ledger.release("a")
    with pytest.raises(KeyError):
        ledger.release("a")


def test_reserve_waits_for_a_release_and_times_out_without_one():
    ledger = CreditLedger(100)
    ledger.try_reserve("a", 80)
    assert not ledger.reserve("b", 50, timeout=0.05)
    threading.Timer(0.1, ledger.release, args=("a",)).start()
    start = time.monotonic()
    assert ledger.reserve("b", 50, timeout=5)
    assert 0.05 < time.monotonic() - start < 4


def test_never_over_grants_under_concurrent_use():
    budget = 1000
    ledger = CreditLedger(budget)
    held_lock = threading.Lock()
    held = {"bytes": 0, "peak": 0, "grants": 0}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(400):
                key, size = (seed, i), rng.randint(1, 300)
                ok = ledger.reserve(key, size, timeout=2) if rng.random() < 0.5 else ledger.try_reserve(key, size)
                if not ok:
                    continue
                with held_lock:
                    held["bytes"] += size
                    held["peak"] = max(held["peak"], held["bytes"])
                    held["grants"] += 1
                    assert held["bytes"] <= budget
                time.sleep(rng.random() * 1e-4)
                with held_lock:
                    held["bytes"] -= size
                ledger.release(key)
        except BaseException as e:  # surfaced to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert ledger.used_bytes == 0 and len(ledger) == 0
    assert held["grants"] > 400 and budget // 2 < held["peak"] <= budget


def test_sample_nbytes_counts_hidden_states_token_ids_and_mask():
    assert sample_nbytes(8192, 4, 4096, torch.bfloat16) == 8192 * (4 * 4096 * 2 + 9)
