"""protocol/allocator.py: on glibc, freed frame-sized blocks stay with the process for reuse
instead of being unmapped and faulted in afresh. Run in subprocesses: mallopt is process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only")

PROBE = r"""
import ctypes, json, sys
from protocol.allocator import keep_freed_frames

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

tuned = keep_freed_frames() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(2 << 20) for _ in range(64)]  # 128 MiB of 2 MiB frames
for b in blocks:
    ctypes.memset(b, 1, 2 << 20)  # touch every page
held = rss()
for b in blocks:
    libc.free(b)
print(json.dumps({"tuned": tuned, "released_mib": (held - rss()) / 2**20}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_freed_frames_stay_mapped_for_reuse_only_when_tuned():
    default, tuned = probe("default"), probe("tuned")
    assert not default["tuned"] and tuned["tuned"]
    assert default["released_mib"] > 100  # glibc's defaults hand 2 MiB blocks back to the OS
    assert tuned["released_mib"] < 8  # tuned: kept for the next frames


def test_tuning_is_idempotent():
    out = subprocess.run(
        [sys.executable, "-c", "from protocol.allocator import keep_freed_frames as k; print(k(), k())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["True", "True"]
