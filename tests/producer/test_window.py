"""The share window: captures kept for the other trainer jobs, within a byte budget."""

from __future__ import annotations

import pytest
import torch

from producer.window import CaptureWindow
from protocol.messages import Sample


def sample(sample_id: int, tokens: int = 4, hidden: int = 8) -> Sample:
    return Sample(
        sample_id=sample_id,
        epoch=3,
        lease_id=9,
        token_ids=torch.arange(tokens, dtype=torch.int64),
        loss_mask=torch.ones(tokens, dtype=torch.uint8),
        hidden_states=torch.full((tokens, 2, hidden), float(sample_id)),
    )


SIZE = sample(0).nbytes


def test_a_capture_is_kept_for_each_job_owed_and_leaves_when_all_had_it():
    window = CaptureWindow(10 * SIZE)
    window.keep(sample(1), {"b", "c"})
    got = window.take(1, "b")
    assert got is not None and got.sample_id == 1 and torch.equal(got.hidden_states, sample(1).hidden_states)
    assert len(window) == 1 and window.used_bytes == SIZE
    assert window.take(1, "c") is not None
    assert len(window) == 0 and window.used_bytes == 0 and window.take(1, "b") is None
    assert window.stats.kept == 1 and window.stats.hits == 2 and window.stats.peak_bytes == SIZE


def test_nothing_is_kept_for_nobody_or_in_a_window_of_zero_bytes():
    window = CaptureWindow(10 * SIZE)
    window.keep(sample(1), set())
    assert len(window) == 0
    off = CaptureWindow(0)
    off.keep(sample(1), {"b"})
    assert len(off) == 0 and off.take(1, "b") is None


def test_the_budget_holds_the_oldest_captures_go_first_and_a_too_large_one_is_not_kept():
    window = CaptureWindow(3 * SIZE)
    for i in range(5):
        window.keep(sample(i), {"b"})
        assert window.used_bytes <= 3 * SIZE
    assert [window.take(i, "b") is not None for i in range(5)] == [False, False, True, True, True]
    assert window.stats.evicted == 2 and window.stats.peak_bytes == 3 * SIZE
    window.keep(sample(7, tokens=40), {"b"})
    assert window.stats.too_large == 1 and len(window) == 0


def test_a_kept_capture_is_a_compact_copy_not_a_view_of_the_batch():
    batch = torch.zeros(2, 16, 2, 8)
    row = Sample(
        sample_id=1,
        epoch=0,
        lease_id=0,
        token_ids=torch.arange(4),
        loss_mask=torch.ones(4, dtype=torch.uint8),
        hidden_states=batch[0, :4],
    )
    window = CaptureWindow(10 * SIZE)
    window.keep(row, {"b"})
    batch.fill_(5.0)  # the backend reuses its batch buffer
    kept = window.take(1, "b")
    assert kept.hidden_states.is_contiguous() and kept.hidden_states.untyped_storage().nbytes() == 4 * 2 * 8 * 4
    assert torch.count_nonzero(kept.hidden_states) == 0


def test_a_job_that_is_gone_is_owed_nothing():
    window = CaptureWindow(10 * SIZE)
    window.keep(sample(1), {"b"})
    window.keep(sample(2), {"b", "c"})
    window.forget_job("b")
    assert len(window) == 1 and window.take(2, "c") is not None and len(window) == 0


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="--share-window-bytes"):
        CaptureWindow(-1)
