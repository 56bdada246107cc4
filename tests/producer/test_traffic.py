"""Capture controls and the bounded queue of served rows (producer/live/traffic.py), and the tally
of token ids read from vLLM answers (producer/live/front.py)."""

from __future__ import annotations

import pytest

from producer.live.front import TokenTally
from producer.live.traffic import OPT_OUT_FIELD, CaptureControls, TrafficQueue


def _accounted(queue: TrafficQueue, offered: int) -> None:
    """Every offer is queued or dropped for one reason; every queued row is taken, shed or waiting."""
    s = queue.stats()
    assert s["queued"] + s["duplicate"] + s["too_long"] == offered, s
    assert s["queued"] == s["taken"] + s["shed"] + s["waiting_rows"], s


def test_admit_pops_the_opt_out_field_and_applies_switch_and_rate():
    off = TrafficQueue(CaptureControls(rate=0.0))
    body = {"prompt": "x", OPT_OUT_FIELD: True}
    assert not off.admit(body) and OPT_OUT_FIELD not in body and off.stats()["off"] == 1

    on = TrafficQueue(CaptureControls(rate=1.0))
    body = {"prompt": "x", OPT_OUT_FIELD: False}
    assert not on.admit(body) and OPT_OUT_FIELD not in body
    assert on.admit({"prompt": "y"}) and on.admit({"prompt": "y", OPT_OUT_FIELD: True})
    assert on.stats()["opted_out"] == 1

    sampled = TrafficQueue(CaptureControls(rate=0.25, seed=3))
    admitted = sum(sampled.admit({}) for _ in range(4000))
    assert 900 <= admitted <= 1100 and sampled.stats()["sampled_out"] == 4000 - admitted


def test_rows_are_prompt_plus_generated_cut_at_max_tokens_and_deduplicated_by_prompt():
    queue = TrafficQueue(CaptureControls(max_tokens=6))
    row = queue.offer("cmpl-1#0", [1, 2, 3], [4, 5])
    assert row.token_ids == (1, 2, 3, 4, 5) and row.loss_mask == [0, 0, 0, 1, 1] and row.request_id == "cmpl-1#0"
    cut = queue.offer("cmpl-2#0", [7, 8, 9, 10], [11, 12, 13])
    assert cut.token_ids == (7, 8, 9, 10, 11, 12) and cut.loss_mask == [0, 0, 0, 0, 1, 1]
    assert queue.offer("cmpl-3#0", [1, 2, 3], [9]) is None  # same prompt as cmpl-1
    assert queue.offer("cmpl-4#0", [1, 2, 3, 4, 5, 6], [7]) is None  # the prompt alone fills the cap
    assert queue.offer("cmpl-5#0", [42], []) is None  # nothing generated
    s = queue.stats()
    assert (s["queued"], s["duplicate"], s["too_long"]) == (2, 1, 2)
    assert [r.row_id for r in queue.take(10)] == [0, 1]
    _accounted(queue, 5)


def test_a_full_queue_sheds_its_oldest_rows_and_stays_within_its_bounds():
    queue = TrafficQueue(CaptureControls(max_tokens=8, max_rows=5, max_queued_tokens=20))
    for i in range(50):
        queue.offer(f"r{i}", [1000 + i, 1, 2], [3, 4])  # 5 tokens each
        assert queue.queued_rows <= 5 and queue.queued_tokens <= 20
    assert queue.stats()["peak_tokens"] <= 20
    waiting = queue.take(100)
    assert [r.request_id for r in waiting] == ["r46", "r47", "r48", "r49"]  # the newest that fit 20 tokens
    assert queue.stats()["shed"] == 46
    _accounted(queue, 50)

    by_rows = TrafficQueue(CaptureControls(max_tokens=8, max_rows=3, max_queued_tokens=1000))
    for i in range(10):
        by_rows.offer(f"r{i}", [i], [1])
    assert [r.request_id for r in by_rows.take(10)] == ["r7", "r8", "r9"]


def test_take_waits_for_a_row_and_returns_oldest_first():
    import threading

    queue = TrafficQueue(CaptureControls())
    assert queue.take(4, timeout=0.05) == []
    timer = threading.Timer(0.1, lambda: queue.offer("late", [5], [6]))
    timer.start()
    rows = queue.take(4, timeout=10)
    timer.join()
    assert [r.request_id for r in rows] == ["late"]


@pytest.mark.parametrize("bad", [dict(rate=1.5), dict(max_tokens=1), dict(max_tokens=100, max_queued_tokens=50)])
def test_controls_refuse_impossible_settings(bad):
    with pytest.raises(ValueError):
        CaptureControls(**bad)


def test_token_tally_reads_completions_chat_and_stream_chunks_and_strips_on_request():
    completion = {
        "id": "cmpl-9",
        "choices": [
            {"index": 1, "text": "b", "prompt_token_ids": [5, 6], "token_ids": [7]},
            {"index": 0, "text": "a", "prompt_token_ids": [1, 2], "token_ids": [3, 4]},
        ],
    }
    tally = TokenTally()
    tally.read(completion, strip=True)
    assert tally.rows() == [("cmpl-9#0", [1, 2], [3, 4]), ("cmpl-9#1", [5, 6], [7])]
    assert all("token_ids" not in c and "prompt_token_ids" not in c for c in completion["choices"])

    chunks = [
        {"id": "chat-1", "prompt_token_ids": [1, 2, 3], "choices": [{"index": 0, "delta": {}, "token_ids": [4]}]},
        {"id": "chat-1", "choices": [{"index": 0, "delta": {}, "token_ids": [5, 6]}]},
        {"id": "chat-1", "choices": [{"index": 0, "delta": {}, "token_ids": []}], "usage": None},
    ]
    tally = TokenTally()
    for chunk in chunks:
        tally.read(chunk, strip=False)
    assert tally.rows() == [("chat-1#0", [1, 2, 3], [4, 5, 6])]
    assert chunks[0]["prompt_token_ids"] == [1, 2, 3]  # kept: the client asked for them

    hostile = TokenTally()
    hostile.read({"id": 7, "prompt_token_ids": "x", "choices": [None, {"index": 0, "token_ids": [-1]}]}, strip=True)
    hostile.read({"choices": [{"index": 2, "prompt_token_ids": [1], "token_ids": ["a"]}]}, strip=True)
    hostile.read({"choices": [{"index": [1], "prompt_token_ids": [1], "token_ids": [2]}, "junk"]}, strip=True)
    assert hostile.rows() == []
