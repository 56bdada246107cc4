"""The transport benchmark runs end to end on tiny sizes and ends with a parseable JSON line."""

from __future__ import annotations

import json

from bench import transport


def test_transport_bench_prints_a_table_and_a_json_line_last(capsys):
    argv = [
        "--tokens",
        "16",
        "--transports",
        "ipc",
        "tcp",
        "--repeats",
        "1",
        "--bytes-per-run-mib",
        "2",
        "--latency-messages",
        "2",
    ]
    assert transport.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bench"] == "transport"
    modes = {(r["transport"], r["mode"]) for r in summary["rows"]}
    assert modes == {(t, m) for t in ("ipc", "tcp") for m in transport.MODES}
    assert all(r["gbps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in summary["rows"])
    assert 0 < summary["min_ours_vs_raw"] and 0 < summary["min_ours_copy_vs_raw_copy"]
    assert {r["vs"] for r in summary["rows"] if r["mode"].startswith("ours")} == {"raw", "raw+copy"}
    assert any(line.rstrip().endswith("vs raw+copy") for line in lines[:-1])
