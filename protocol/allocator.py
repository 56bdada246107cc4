"""glibc malloc settings for a process that keeps the frames it receives (``decode(copy=False)``).

ZeroMQ allocates each received frame with ``malloc`` on its IO thread. The trainer keeps those
frames as its replay buffer and frees them on another thread once a batch has been packed. With
glibc's defaults, 2 MiB frames start out mmap'ed one by one, and arena heaps that fall empty are
shrunk or unmapped. So nearly every new frame lands on fresh pages: one page fault per 4 KiB,
which costs about as much as the copy the zero-copy decode avoids.

Measured with ``draftstream bench transport --transports tcp --tokens 4096 --hold 8`` on the 2-core
dev machine, six runs each:

- defaults (``--default-malloc``): 1.4-2.6 GB/s, swinging with the order of runs;
- these settings: 2.5-3.1 GB/s.

The settings make freed frames return to malloc's free lists, to be used again:

- ``M_MMAP_THRESHOLD`` 32 MiB (the most glibc allows). Fixed rather than adaptive: frames up to
  that size come from arenas, not from a fresh mmap each.
- ``M_TOP_PAD`` 64 MiB, one arena heap's full size. A thread arena's heap is then never shrunk or
  unmapped, and the main heap grows in 64 MiB steps.
- ``M_TRIM_THRESHOLD`` 2 GiB. The main heap keeps up to that much free memory at its top.

The process keeps the most memory it ever had live (the replay buffer's budget plus what is in
flight) rather than giving it back to the OS between samples. It never holds more than that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,
    M_TOP_PAD: 64 << 20,
    M_TRIM_THRESHOLD: (2 << 30) - 1,  # mallopt takes an int
}

_applied: bool | None = None


def keep_freed_frames() -> bool:
    """Apply ``SETTINGS`` to this process's glibc malloc (once); False where there is no glibc."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
            except (OSError, AttributeError) as e:
                logger.debug("mallopt unavailable: %s", e)
        if not _applied:
            logger.info("malloc left at its defaults (not glibc): received frames may land on fresh pages")
    return _applied
