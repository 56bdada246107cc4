"""One logging setup per trainer process: every line carries the role and rank, so the interleaved
output of ``torchrun`` ranks reads well. Other modules use ``logging.getLogger(__name__)``.

Ranks other than 0 log warnings and errors only (unless ``all_ranks``): the training log line is
the same on every rank after the all-reduce, so printing it once is enough.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [{role} r{rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(*, role: str = "trainer", rank: int = 0, level: int | str = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the root logger for this process (idempotent: replaces our previous handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_draftstream", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._draftstream = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT.format(role=role, rank=rank), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    effective = level if (rank == 0 or all_ranks) else logging.WARNING
    root.setLevel(effective)
    # Libraries that are chatty at INFO.
    for name in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
