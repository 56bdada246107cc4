"""The prepared dataset (``draftstream prepare`` output), read the one way both sides read it.

A ``datasets`` folder with ``input_ids``, ``loss_mask`` and ``seq_len`` per row; row index =
sample id. Producers and trainers check at handshake that they read the same rows, through the
folder's ``datasets`` fingerprint (``PreparedDataset.fingerprint``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


class PreparedDataset:
    """Rows of a prepared dataset (``draftstream prepare`` output, ``datasets.load_from_disk``):
    ``input_ids``, ``loss_mask`` and ``seq_len`` per row; row index = sample id."""

    def __init__(self, path: str | os.PathLike, *, flag: str = "--data-path"):
        import datasets

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{flag} {path}: no such directory")
        try:
            self._ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{flag} {path}: not a saved dataset ({e})") from e
        if isinstance(self._ds, datasets.DatasetDict):
            raise ValueError(f"{flag} {path}: holds a DatasetDict ({list(self._ds)}); give one split's directory")
        missing = {"input_ids", "loss_mask"} - set(self._ds.column_names)
        if missing:
            raise ValueError(f"{flag} {path}: dataset lacks columns {sorted(missing)}")
        self.path = path
        # datasets' own fingerprint of the saved folder: producers send theirs in the handshake.
        self.fingerprint = str(getattr(self._ds, "_fingerprint", "") or "")
        raw = self._ds.with_format(None)
        if "seq_len" in self._ds.column_names:
            self._lengths = [int(n) for n in raw["seq_len"]]
        else:
            self._lengths = [len(ids) for ids in raw["input_ids"]]
        self._ds = self._ds.with_format("torch", columns=["input_ids", "loss_mask"])

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return [self._lengths[i] for i in sample_ids]

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [T] int64, loss_mask [T] bool) of row ``index``."""
        r = self._ds[int(index)]
        return torch.as_tensor(r["input_ids"], dtype=torch.int64), torch.as_tensor(r["loss_mask"]).bool()


def open_rows(path: str | os.PathLike, *, flag: str = "--data-path", **log_kwargs):
    """The rows at ``path``: a ``protocol.trafficlog.TrafficLog`` if it is a traffic log
    (``draftstream serve --capture-dir``), else a ``PreparedDataset``. ``log_kwargs`` go to the log."""
    from protocol.trafficlog import TrafficLog, is_traffic_log

    if is_traffic_log(path):
        return TrafficLog(path, flag=flag, **log_kwargs)
    return PreparedDataset(path, flag=flag)
