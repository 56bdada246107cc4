"""protocol/logs.py: peer text made safe for one log line, and logs a peer cannot flood."""

from __future__ import annotations

import logging

import pytest

from protocol.logs import RateLimitedLog, peer_text


@pytest.mark.parametrize(
    "value, text",
    [
        ("producer-0", "producer-0"),
        ("two\nlines\r", "two\\nlines\\r"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("line\u2028sep\x00", "line\\u2028sep\\x00"),
        ("back\\n", "back\\\\n"),  # a literal backslash cannot pass for an escape
        ("naïve 模型", "naïve 模型"),
        (b"id\xff\xfe\n", "id\\xff\\xfe\\n"),
        (bytearray(b"ok"), "ok"),
        (("peer", 3), "('peer', 3)"),
        (None, "None"),
    ],
)
def test_peer_text_escapes_what_could_break_or_forge_a_line(value, text):
    assert peer_text(value) == text


def test_peer_text_is_capped_and_says_how_much_was_cut():
    assert peer_text("x" * 500) == "x" * 200 + "...(300 more chars)"
    assert peer_text("\n" * 500, limit=10) == "\\n" * 5 + "...(495 more chars)"
    assert peer_text(b"y" * (1 << 20), limit=4) == "yyyy...(1048572 more chars)"
    assert peer_text(list(range(10**5))).startswith("[0, 1, 2")  # long containers: reprlib's summary
    assert len(peer_text(list(range(10**5)))) < 200


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.DEBUG, logger="test.peers")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "test.peers"]


def make_log(clock, **kwargs) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger("test.peers"), clock=clock, **kwargs)


def test_a_key_gets_its_burst_then_one_line_saying_what_was_suppressed(clock, lines):
    log = make_log(clock, burst=2, interval_s=10)
    results = [log.warning(("peer", "bad header"), "refused %s", i) for i in range(7)]
    assert results == [True, True, False, False, False, False, False]
    assert lines() == ["refused 0", "refused 1"]
    clock.now += 10
    assert log.warning(("peer", "bad header"), "refused %s", 7)
    assert lines()[2:] == ["5 similar lines suppressed in 10s (('peer', 'bad header'))", "refused 7"]


def test_keys_are_limited_independently(clock, lines):
    log = make_log(clock, burst=1, interval_s=10)
    assert log.info("a", "a1") and log.info("b", "b1")
    assert not log.info("a", "a2") and not log.error("b", "b2")
    assert lines() == ["a1", "b1"]


def test_flush_reports_windows_that_closed_without_a_later_line(clock, lines):
    log = make_log(clock, burst=1, interval_s=10)
    for _ in range(4):
        log.warning("k", "line")
    log.flush()
    assert lines() == ["line"]  # the window is still open
    clock.now += 11
    log.flush()
    assert lines() == ["line", "3 similar lines suppressed in 11s (k)"]
    log.flush()
    assert len(lines()) == 2


def test_many_distinct_keys_hit_the_global_cap(clock, lines):
    log = make_log(clock, burst=5, interval_s=60, global_burst=20, global_interval_s=10)
    written = sum(log.warning(("peer", i), "refused peer %d", i) for i in range(1000))
    assert written == 20 and len(lines()) == 20
    clock.now += 10
    assert log.warning(("peer", 1000), "refused peer %d", 1000)
    assert lines()[20:] == [
        "980 log lines suppressed in 10s (over 20 lines per 10s, or their keys forgotten)",
        "refused peer 1000",
    ]


def test_tracked_keys_are_bounded_and_the_global_cap_holds_when_keys_cycle(clock, lines):
    """More keys than are tracked evade the per-key limit (each is forgotten before it returns):
    memory stays bounded, and the global cap still bounds the lines."""
    log = make_log(clock, burst=1, interval_s=60, max_keys=8, global_burst=50, global_interval_s=10)
    for i in range(100_000):
        log.warning(f"peer-{i % 50}", "refused")
    assert len(log._keys) == 8 and len(lines()) == 50
    clock.now += 10
    log.flush()
    assert lines()[-1].startswith("99950 log lines suppressed in 10s")


def test_counts_of_forgotten_keys_go_into_the_global_summary(clock, lines):
    log = make_log(clock, burst=1, interval_s=60, max_keys=2, global_burst=100, global_interval_s=10)
    for _ in range(5):
        log.warning("a", "refused a")
    log.warning("b", "refused b")
    log.warning("c", "refused c")  # "a" forgotten, with its 4 suppressed lines
    assert list(log._keys) == ["b", "c"]
    clock.now += 10
    log.flush()
    assert lines() == [
        "refused a",
        "refused b",
        "refused c",
        "4 log lines suppressed in 10s (over 100 lines per 10s, or their keys forgotten)",
    ]


def test_summaries_count_against_the_global_cap(clock, lines):
    log = make_log(clock, burst=1, interval_s=10, global_burst=3, global_interval_s=10)
    for key in "abcdef":
        log.warning(key, "first")
        log.warning(key, "again")
    clock.now += 10
    log.flush()
    assert len(lines()) <= 3 + 1 + 3  # first window, its global summary, the capped summaries


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), burst=0)
