"""The traffic log read as a growing dataset (protocol/trafficlog.py): ids stable as it grows, a
line being written not there yet, hostile lines kept as dropped ids with a reason."""

from __future__ import annotations

import json

import pytest

from protocol.dataset import PreparedDataset, open_rows
from protocol.trafficlog import TrafficLog, create_log_id, is_traffic_log


def _log(tmp_path):
    (tmp_path / "rows").mkdir()
    create_log_id(tmp_path)
    return tmp_path / "rows" / "traffic-00000.jsonl"


def _line(ids, mask):
    return json.dumps({"input_ids": ids, "loss_mask": mask, "request_id": "r"}) + "\n"


def test_rows_get_stable_ids_as_the_log_grows_and_a_partial_line_waits(tmp_path):
    rows = _log(tmp_path)
    rows.write_text(_line([1, 2, 3], [0, 1, 1]) + _line([4, 5], [0, 1]) + '{"input_ids": [6')
    log = open_rows(tmp_path, vocab_size=100)
    assert isinstance(log, TrafficLog) and is_traffic_log(tmp_path)
    assert len(log) == 2 and log.lengths([0, 1]) == [3, 2]
    ids, mask = log.row(1)
    assert ids.tolist() == [4, 5] and mask.tolist() == [False, True]
    with rows.open("a") as f:
        f.write(', 7], "loss_mask": [0, 1]}\n')  # the partial line completes
    (tmp_path / "rows" / "traffic-00001.jsonl").write_text(_line([8, 9, 10], [0, 0, 1]))
    assert log.refresh() == 4
    assert log.row(2)[0].tolist() == [6, 7] and log.row(3)[0].tolist() == [8, 9, 10]
    assert log.fingerprint == "traffic:" + (tmp_path / "log_id").read_text().strip()
    assert open_rows(tmp_path).fingerprint == log.fingerprint  # another reader, the same name


@pytest.mark.parametrize(
    "line",
    [
        "not json\n",
        "[1, 2]\n",
        _line([1, 2], [0]),
        _line([1, -2], [0, 1]),
        _line([1, 2], [0, 2]),
        _line([1, 200], [0, 1]),  # outside the vocabulary
        _line([1, 2], [0, 0]),  # nothing supervised
        _line([True, 2], [0, 1]),
        '{"input_ids": "ab", "loss_mask": "cd"}\n',
    ],
)
def test_hostile_lines_keep_their_id_and_are_dropped_with_a_reason(tmp_path, line):
    rows = _log(tmp_path)
    rows.write_text(_line([1, 2], [0, 1]) + line + _line([3, 4], [0, 1]))
    log = TrafficLog(tmp_path, vocab_size=100)
    assert len(log) == 3 and log.dropped == {1: "malformed"} and log.usable(range(3)) == [0, 2]
    assert log.row(2)[0].tolist() == [3, 4]
    with pytest.raises(ValueError, match="malformed"):
        log.row(1)


def test_long_rows_and_overlong_lines_are_dropped_and_a_plain_folder_is_not_a_log(tmp_path):
    rows = _log(tmp_path)
    rows.write_text(_line(list(range(10)), [1] * 10) + "x" * 5000 + "\n" + _line([1, 2], [0, 1]))
    log = TrafficLog(tmp_path, max_tokens=8, max_line_bytes=1000)
    assert log.dropped == {0: "too_long", 1: "malformed"} and log.usable(range(len(log))) == [2]
    with pytest.raises(ValueError, match="not a traffic log"):
        TrafficLog(tmp_path / "rows")
    with pytest.raises(ValueError):
        PreparedDataset(tmp_path / "rows")


def test_serve_takes_new_checkpoint_folders_as_candidates_but_not_links_latest_or_partial_ones(tmp_path):
    from producer.live.serve import candidates

    for name in ("0", "1", "latest", ".tmp-2", "logs"):
        (tmp_path / name).mkdir()
        if name != "logs":
            (tmp_path / name / "config.json").write_text("{}")
            (tmp_path / name / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint_best").symlink_to(tmp_path / "1")
    found = candidates(tmp_path, set())
    assert sorted(p.name for p in found) == ["0", "1"]
    assert [p.name for p in candidates(tmp_path, {str((tmp_path / "0").resolve())})] == ["1"]
