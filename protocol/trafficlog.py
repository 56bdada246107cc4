"""The traffic log: rows captured from served requests (``draftstream serve --capture-dir DIR``),
read the one way a trainer and its producers read them, as a dataset that only grows.

``DIR/rows/traffic-NNNNN.jsonl`` hold one row per line, ``{"input_ids": [...], "loss_mask": [...],
"request_id": "..."}``, appended by ``serve`` and never rewritten; ``DIR/log_id`` names the log.
A row's sample id is its position over the files in name order, so every reader that has seen as
many rows agrees on every id. A line counts once it ends with a newline (a line being written is
not there yet). The log is read incrementally (``refresh``): an index of where each row starts,
24 bytes a row, and rows are read from disk when asked for, so a long-running log costs no memory.

The log comes from a file, so it is untrusted like anything that arrives: a line that is not a
JSON object with integer ``input_ids`` and a same-length 0/1 ``loss_mask`` (or whose tokens are
outside ``[0, vocab_size)``) keeps its id, with length 0 and reason "malformed"; a row longer
than ``max_tokens`` is "too_long". Readers skip both and count them (``dropped``). Lines are read
only up to ``max_line_bytes``.

``PreparedDataset``'s interface (``len``, ``lengths``, ``row``, ``fingerprint``) is kept, so the
stream source and the producers use a log wherever they use a prepared dataset.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

ROWS_DIR = "rows"
LOG_ID_FILE = "log_id"
ROW_FILE_GLOB = "traffic-*.jsonl"


def is_traffic_log(path: str | os.PathLike) -> bool:
    return (Path(path) / LOG_ID_FILE).is_file() and (Path(path) / ROWS_DIR).is_dir()


def create_log_id(directory: str | os.PathLike) -> str:
    """The log's name, written once when ``serve`` first captures into ``directory``."""
    path = Path(directory) / LOG_ID_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(8) + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()


class TrafficLog:
    """A growing, append-only set of rows; see the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        vocab_size: int | None = None,
        max_tokens: int = 1 << 20,
        max_line_bytes: int = 64 << 20,
        flag: str = "--data-path",
    ):
        self.path = Path(directory)
        if not is_traffic_log(self.path):
            raise ValueError(f"{flag} {self.path}: not a traffic log (no {LOG_ID_FILE} and {ROWS_DIR}/)")
        self.fingerprint = "traffic:" + (self.path / LOG_ID_FILE).read_text().strip()
        self.vocab_size, self.max_tokens, self.max_line_bytes = vocab_size, max_tokens, max_line_bytes
        self._where: list[tuple[int, int]] = []  # row id -> (file number, byte offset)
        self._lengths: list[int] = []  # 0 for a dropped row
        self.dropped: dict[int, str] = {}  # row id -> "malformed" / "too_long"
        self._files: list[Path] = []
        self._read_upto: list[int] = []  # bytes of each file already indexed
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> int:
        """Index rows appended since the last call; returns how many rows the log now has."""
        with self._lock:
            files = sorted((self.path / ROWS_DIR).glob(ROW_FILE_GLOB))
            known = {p: i for i, p in enumerate(self._files)}
            for path in files:
                if path not in known:
                    if self._files and path.name < self._files[-1].name:
                        continue  # a file sorting before the last one read would renumber rows: ignored
                    known[path] = len(self._files)
                    self._files.append(path)
                    self._read_upto.append(0)
            for number, path in enumerate(self._files):
                self._index(number, path)
            return len(self._lengths)

    def _index(self, number: int, path: Path) -> None:
        try:
            f = path.open("rb")
        except OSError:
            return
        with f:
            f.seek(self._read_upto[number])
            while True:
                offset = f.tell()
                line = f.readline(self.max_line_bytes + 1)
                if not line.endswith(b"\n"):
                    if len(line) > self.max_line_bytes:  # a line too long to read: skip to its end
                        while line and not line.endswith(b"\n"):
                            line = f.readline(1 << 20)
                        if line:
                            self._add(number, offset, None, "malformed")
                            self._read_upto[number] = f.tell()
                            continue
                    return  # not complete yet
                self._read_upto[number] = f.tell()
                self._add(number, offset, line, None)

    def _add(self, number: int, offset: int, line: bytes | None, reason: str | None) -> None:
        row_id = len(self._lengths)
        length = 0
        if reason is None:
            parsed = self._parse(line)
            if isinstance(parsed, str):
                reason = parsed
            else:
                length = len(parsed[0])
        self._where.append((number, offset))
        self._lengths.append(length)
        if reason is not None:
            self.dropped[row_id] = reason

    def _parse(self, line: bytes) -> tuple[list[int], list[int]] | str:
        try:
            row = json.loads(line)
        except ValueError:
            return "malformed"
        if not isinstance(row, dict):
            return "malformed"
        ids, mask = row.get("input_ids"), row.get("loss_mask")
        if not isinstance(ids, list) or not isinstance(mask, list) or not ids or len(ids) != len(mask):
            return "malformed"
        if not all(type(t) is int and t >= 0 for t in ids) or not all(m in (0, 1) for m in mask):
            return "malformed"
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            return "malformed"
        if not any(mask):
            return "malformed"
        if len(ids) > self.max_tokens:
            return "too_long"
        return ids, mask

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return [self._lengths[i] for i in sample_ids]

    def usable(self, sample_ids: Sequence[int]) -> list[int]:
        """The ids among ``sample_ids`` that are not dropped."""
        return [i for i in sample_ids if i not in self.dropped]

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [T] int64, loss_mask [T] bool) of row ``index``, refreshing once if the log
        had not reached it yet. Raises ValueError for a dropped row."""
        index = int(index)
        if index >= len(self._lengths):
            self.refresh()
        if index in self.dropped:
            raise ValueError(f"row {index} of {self.path} is {self.dropped[index]}")
        number, offset = self._where[index]
        with self._files[number].open("rb") as f:
            f.seek(offset)
            parsed = self._parse(f.readline(self.max_line_bytes + 1))
        if isinstance(parsed, str):
            raise ValueError(f"row {index} of {self.path} changed on disk ({parsed})")
        ids, mask = parsed
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool)
