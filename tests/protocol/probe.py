"""A test-only message kind carrying one arbitrary tensor, so codec tests can cover shapes that no
production message uses (0-dim, 5-D, bool, ...). Registered only inside the ``probe_kind`` fixture."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import pytest
import torch

from protocol.messages import MESSAGE_TYPES, Message

PROBE_KIND = 250


@dataclasses.dataclass(kw_only=True, eq=False)
class Probe(Message):
    KIND: ClassVar[int] = PROBE_KIND
    label: str
    tensor: torch.Tensor


@contextlib.contextmanager
def registered_probe():
    previous = MESSAGE_TYPES.get(PROBE_KIND)
    MESSAGE_TYPES[PROBE_KIND] = Probe
    try:
        yield Probe
    finally:
        if previous is None:
            del MESSAGE_TYPES[PROBE_KIND]


@pytest.fixture
def probe_kind():
    with registered_probe() as probe:
        yield probe
