"""``produce --backend vllm --spill DIR --validate`` run twice: the second run resumes. It finds every
row on disk, captures nothing (and starts no engine), leaves the files untouched, and validates them.
The first run is the one ``test_capture.py`` compares with the HF backend (the session's Llama fp32 spill).
"""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

from protocol.hsfile import list_hs_indices  # noqa: E402
from tests.vllm.engine.conftest import NUM_ROWS, run_cli  # noqa: E402


def snapshot(directory) -> dict[str, tuple[int, int, str]]:
    """Every file of ``directory``: (inode, mtime_ns, sha256)."""
    out = {}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        out[path.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def test_a_second_run_resumes_without_touching_the_files_and_validates(vllm_spills):
    first = vllm_spills("llama", "float32")
    assert first.engine_starts == 1
    assert f"rows for this rank     {NUM_ROWS}" in first.stdout
    assert f"captured               {NUM_ROWS}" in first.stdout and f"written                {NUM_ROWS}" in first.stdout
    assert f"validated              {NUM_ROWS} ok, 0 missing, 0 bad" in first.stdout
    assert list_hs_indices(first.directory) == list(range(NUM_ROWS))
    before = snapshot(first.directory)
    assert len(before) == NUM_ROWS  # no temporaries left behind

    again = run_cli(first.command, "produce --backend vllm --spill, run again (resume)")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"already on disk        {NUM_ROWS}  (partial temporaries removed: 0)" in again.stdout
    assert "captured               0 " in again.stdout and "written                0" in again.stdout
    assert f"validated              {NUM_ROWS} ok, 0 missing, 0 bad" in again.stdout
    assert again.engine_starts == 0  # nothing left to capture: no engine
    assert snapshot(first.directory) == before
