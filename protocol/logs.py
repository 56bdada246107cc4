"""One logging setup for every draftstream process: each line carries the process's role and
rank (``[trainer r1]``, ``[producer-0]``, ``[run]``), so the interleaved output of torchrun ranks,
producers and the launcher reads well. Other modules use ``logging.getLogger(__name__)``.

Ranks other than 0 log warnings and errors only (unless ``all_ranks``): the training log line is
the same on every rank after the all-reduce, so printing it once is enough.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [{who}] %(levelname)s %(name)s: %(message)s"
_QUIET_LIBRARIES = ("httpx", "urllib3", "filelock", "datasets")


def setup_logging(
    role: str, *, rank: int | None = None, level: int | str = logging.INFO, all_ranks: bool = False
) -> None:
    """Configure the root logger for this process (idempotent: replaces our previous handler).
    ``rank``: this process's rank in a group of ranks (trainers), None for a single process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_draftstream", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._draftstream = True  # type: ignore[attr-defined]
    who = role if rank is None else f"{role} r{rank}"
    handler.setFormatter(logging.Formatter(_FORMAT.format(who=who), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if (not rank or all_ranks) else logging.WARNING)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
