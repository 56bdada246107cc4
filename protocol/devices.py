"""The one ``--device`` rule every draftstream command parses: ``auto`` (CUDA when available, else
the CPU), ``cpu``, ``cuda`` (this process's local rank) or ``cuda:N``; CUDA asked for on a machine
without it is a clear error, not a late crash."""

from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if not _DEVICE.match(device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)
