"""The offline hidden-state file: ``hs_{i}.safetensors``, shared by the spill writer, the trainer's
file reader and the trainer's tee.

Exactly two tensors, matching what vLLM's hidden-state connector writes and the speculators
trainer reads: ``hidden_states`` [T, L, H] in the target's dtype and ``token_ids`` [T] int64 equal
to row ``i``'s ``input_ids`` in the prepared dataset. Layers are ordered aux..., last.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the directory),
so a file under the final name is always complete; a killed writer leaves only ``*.tmp*`` files,
which readers never look at and ``clean_partial_files`` removes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from protocol.codec import all_finite

HIDDEN_STATES = "hidden_states"
TOKEN_IDS = "token_ids"
_NAME = re.compile(r"^hs_(\d+)\.safetensors$")
_TMP_NAME = re.compile(r"^hs_(\d+)\.safetensors\.tmp")


class HiddenStateFileError(ValueError):
    """A hidden-state file that is missing, truncated, or does not hold what the format says."""


def hs_path(directory: str | os.PathLike, index: int) -> Path:
    return Path(directory) / f"hs_{index}.safetensors"


def list_hs_indices(directory: str | os.PathLike) -> list[int]:
    """Sorted row indices of the complete files in ``directory``."""
    return sorted(int(m.group(1)) for p in Path(directory).iterdir() if (m := _NAME.match(p.name)))


def clean_partial_files(directory: str | os.PathLike, *, indices: Container[int] | None = None) -> int:
    """Remove temporaries left by killed writers; returns how many. With ``indices``, only those
    of these rows, so a restarted writer leaves its live siblings' temporaries alone."""
    removed = 0
    for p in Path(directory).glob("hs_*.safetensors.tmp*"):
        if indices is not None and ((m := _TMP_NAME.match(p.name)) is None or int(m.group(1)) not in indices):
            continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hs_file(
    directory: str | os.PathLike,
    index: int,
    token_ids: torch.Tensor,
    hidden_states: torch.Tensor,
    *,
    fsync: bool = True,
) -> Path:
    """Atomically write ``hs_{index}.safetensors``; returns its path."""
    if token_ids.dim() != 1 or hidden_states.dim() != 3 or hidden_states.shape[0] != token_ids.shape[0]:
        raise ValueError(
            f"hs_{index}: need token_ids [T] and hidden_states [T, L, H], got {tuple(token_ids.shape)} "
            f"and {tuple(hidden_states.shape)}"
        )
    directory = Path(directory)
    final = hs_path(directory, index)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    tensors = {
        HIDDEN_STATES: hidden_states.detach().to("cpu").contiguous(),
        TOKEN_IDS: token_ids.detach().to("cpu", torch.int64).contiguous(),
    }
    save_file(tensors, str(tmp))
    if fsync:
        _fsync_path(tmp)
    os.replace(tmp, final)
    if fsync:
        _fsync_path(directory, directory=True)
    return final


def read_hs_file(
    path: str | os.PathLike,
    *,
    expected_token_ids: torch.Tensor | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and validate one file; returns (token_ids [T] int64, hidden_states [T, L, H])."""
    path = Path(path)
    if not path.is_file():
        raise HiddenStateFileError(f"{path}: no such hidden-state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != {HIDDEN_STATES, TOKEN_IDS}:
                raise HiddenStateFileError(
                    f"{path}: holds tensors {sorted(keys)}, expected {[HIDDEN_STATES, TOKEN_IDS]}"
                )
            hidden_states = f.get_tensor(HIDDEN_STATES)
            token_ids = f.get_tensor(TOKEN_IDS)
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated or not safetensors at all
        raise HiddenStateFileError(f"{path}: unreadable ({e})") from e
    if token_ids.dtype != torch.int64 or token_ids.dim() != 1:
        raise HiddenStateFileError(
            f"{path}: token_ids must be [T] int64, got {token_ids.dtype} {tuple(token_ids.shape)}"
        )
    if (
        hidden_states.dim() != 3
        or hidden_states.shape[0] != token_ids.shape[0]
        or not hidden_states.dtype.is_floating_point
    ):
        raise HiddenStateFileError(
            f"{path}: hidden_states must be [T, L, H] float with T={token_ids.shape[0]}, got "
            f"{hidden_states.dtype} {tuple(hidden_states.shape)}"
        )
    if expected_token_ids is not None and not torch.equal(token_ids, expected_token_ids.to(torch.int64)):
        raise HiddenStateFileError(f"{path}: token_ids differ from the prepared dataset's input_ids for this row")
    if check_finite and not all_finite(hidden_states):
        raise HiddenStateFileError(f"{path}: hidden_states contain NaN or Inf")
    return token_ids, hidden_states
