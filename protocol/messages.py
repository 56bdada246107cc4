"""Typed messages exchanged between producers and trainer ranks.

One dataclass per message kind. The kind travels as the first frame (one byte); scalar fields go
into a msgpack header; tensor fields travel as raw frames (see ``codec.py``). Each class declares
its header fields through ordinary type annotations, which the codec checks on decode, and may add
a ``check()`` for invariants that span fields (for example, a sample's tensors agreeing on T).

Control channel (ROUTER on the trainer, DEALER on producers):
    Hello -> Welcome, Grant, LeaseDone / LeaseFailed, Heartbeat, EndOfStream, Error
Data channel (PUSH from whoever holds the tensors, PULL on the trainer rank):
    Sample
Delivery reports (PUSH from vLLM's connector, PULL on the producer that submitted the row):
    Delivered

Shapes: T tokens, L captured layers, H hidden size.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import ClassVar

import torch

# 2: grants carry a token that their samples must echo; 3: a Welcome lists every rank's control endpoint
PROTOCOL_VERSION = 3


class ProtocolError(ValueError):
    """Anything malformed on the wire: the one error type receivers need to catch."""


class ProtocolVersionError(ProtocolError):
    """The peer speaks another protocol version; ``peer_version`` says which."""

    def __init__(self, peer_version: object):
        super().__init__(f"protocol version mismatch: peer speaks {peer_version!r}, we speak {PROTOCOL_VERSION}")
        self.peer_version = peer_version


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    GRANT = 3
    SAMPLE = 4
    LEASE_DONE = 5
    LEASE_FAILED = 6
    HEARTBEAT = 7
    END_OF_STREAM = 8
    ERROR = 9
    DELIVERED = 10


class Message:
    """Base of all messages. Subclasses are keyword-only dataclasses with a ``KIND``."""

    KIND: ClassVar[Kind]

    def check(self) -> None:
        """Cross-field invariants; raise ProtocolError. Field types are checked by the codec."""


MESSAGE_TYPES: dict[int, type[Message]] = {}


def _register(cls: type[Message]) -> type[Message]:
    assert cls.KIND not in MESSAGE_TYPES, cls
    MESSAGE_TYPES[int(cls.KIND)] = cls
    return cls


@_register
@dataclasses.dataclass(kw_only=True)
class Hello(Message):
    """Producer -> trainer: who I am and what my target produces. The trainer refuses mismatches."""

    KIND: ClassVar[Kind] = Kind.HELLO
    protocol_version: int = PROTOCOL_VERSION
    producer_id: str
    target_model: str
    layer_ids: list[int]
    hidden_size: int
    dtype: str
    vocab_size: int
    # datasets' fingerprint of the prepared dataset the producer reads rows from ("" = unknown):
    # a producer with another dataset would send the wrong tokens for every sample id.
    dataset_fingerprint: str = ""


@_register
@dataclasses.dataclass(kw_only=True)
class Welcome(Message):
    """Trainer -> producer: handshake answer. ``reason`` explains a refusal.

    An acceptance names where to push data (``data_endpoint``) and the control endpoints of every
    rank of the trainer (``trainer_endpoints``, index = rank): a producer given one rank's address
    finds all the others there."""

    KIND: ClassVar[Kind] = Kind.WELCOME
    accepted: bool
    reason: str = ""
    trainer_rank: int = 0
    data_endpoint: str = ""
    trainer_endpoints: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        if self.accepted and self.trainer_endpoints and not 0 <= self.trainer_rank < len(self.trainer_endpoints):
            raise ProtocolError(
                f"welcome from rank {self.trainer_rank} lists {len(self.trainer_endpoints)} trainer endpoints"
            )


@_register
@dataclasses.dataclass(kw_only=True)
class Grant(Message):
    """Trainer -> producer: a lease on some sample ids, to be delivered within ``deadline_s``.

    ``token`` is the lease's secret (random per lease): the rank accepts a sample only if it
    carries the token of a live lease on its key, so no other peer can answer a grant."""

    KIND: ClassVar[Kind] = Kind.GRANT
    lease_id: int
    epoch: int
    sample_ids: list[int]
    deadline_s: float
    token: str = ""

    def check(self) -> None:
        if not self.sample_ids:
            raise ProtocolError("grant carries no sample ids")
        if self.deadline_s <= 0:
            raise ProtocolError(f"grant deadline must be positive, got {self.deadline_s}")


@_register
@dataclasses.dataclass(kw_only=True, eq=False)
class Sample(Message):
    """One row's hidden states: ``token_ids`` [T] int64, ``loss_mask`` [T], ``hidden_states`` [T, L, H].

    ``token`` echoes the ``Grant`` this sample answers ("" outside streaming: files, benchmarks)."""

    KIND: ClassVar[Kind] = Kind.SAMPLE
    sample_id: int
    epoch: int
    lease_id: int
    token: str = ""
    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    hidden_states: torch.Tensor

    def check(self) -> None:
        if self.token_ids.dtype != torch.int64 or self.token_ids.dim() != 1:
            raise ProtocolError(
                f"token_ids must be 1-D int64, got {self.token_ids.dtype} {tuple(self.token_ids.shape)}"
            )
        if self.loss_mask.dim() != 1 or self.loss_mask.dtype not in (torch.bool, torch.uint8, torch.int64, torch.int32):
            raise ProtocolError(
                f"loss_mask must be 1-D bool/int, got {self.loss_mask.dtype} {tuple(self.loss_mask.shape)}"
            )
        if self.hidden_states.dim() != 3 or not self.hidden_states.dtype.is_floating_point:
            raise ProtocolError(
                f"hidden_states must be [T, L, H] floating point, got {self.hidden_states.dtype} "
                f"{tuple(self.hidden_states.shape)}"
            )
        num_tokens = self.token_ids.shape[0]
        if self.loss_mask.shape[0] != num_tokens or self.hidden_states.shape[0] != num_tokens:
            raise ProtocolError(
                f"sample {self.sample_id}: token_ids has T={num_tokens} but loss_mask has "
                f"{self.loss_mask.shape[0]} and hidden_states {self.hidden_states.shape[0]}"
            )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.token_ids, self.loss_mask, self.hidden_states))

    def __eq__(self, other: object) -> bool:  # tensors make the dataclass __eq__ ambiguous
        if not isinstance(other, Sample):
            return NotImplemented
        same_meta = (self.sample_id, self.epoch, self.lease_id) == (other.sample_id, other.epoch, other.lease_id)
        return same_meta and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous(), b.contiguous())
            for a, b in zip(
                (self.token_ids, self.loss_mask, self.hidden_states),
                (other.token_ids, other.loss_mask, other.hidden_states),
            )
        )


@_register
@dataclasses.dataclass(kw_only=True)
class LeaseDone(Message):
    """Producer -> trainer: every sample of the lease has been pushed on the data channel."""

    KIND: ClassVar[Kind] = Kind.LEASE_DONE
    lease_id: int
    num_samples: int


@_register
@dataclasses.dataclass(kw_only=True)
class LeaseFailed(Message):
    """Producer -> trainer: these sample ids will not come; grant them again elsewhere."""

    KIND: ClassVar[Kind] = Kind.LEASE_FAILED
    lease_id: int
    sample_ids: list[int]
    reason: str


@_register
@dataclasses.dataclass(kw_only=True)
class Heartbeat(Message):
    """Either direction: I am alive. ``stats`` carries optional rates for telemetry."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    sender: str
    time_s: float
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


@_register
@dataclasses.dataclass(kw_only=True)
class EndOfStream(Message):
    """Trainer -> producer: the run is over, exit cleanly. Producer -> trainer: I am leaving."""

    KIND: ClassVar[Kind] = Kind.END_OF_STREAM
    reason: str = ""


@_register
@dataclasses.dataclass(kw_only=True)
class Error(Message):
    """Either direction: something went wrong that the peer should log and act on."""

    KIND: ClassVar[Kind] = Kind.ERROR
    code: str
    message: str


@_register
@dataclasses.dataclass(kw_only=True)
class Delivered(Message):
    """vLLM connector -> producer: the sample of ``ticket`` (the producer's number for one
    submitted row) was delivered (``ok``) to its destination, or not, and ``reason`` says why."""

    KIND: ClassVar[Kind] = Kind.DELIVERED
    ticket: int
    sample_id: int
    ok: bool
    reason: str = ""

    def check(self) -> None:
        if self.ok and self.reason:
            raise ProtocolError(f"delivery of ticket {self.ticket} is ok but carries a reason: {self.reason!r:.100}")


# ---- field schema, resolved once per class for the codec -------------------------------------

TENSOR = "tensor"


def _field_spec(annotation: object) -> object:
    if annotation is torch.Tensor:
        return TENSOR
    if annotation in (int, float, str, bool):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and args[0] in (int, str, float):
        return (list, args[0])
    if origin is dict and args == (str, float):
        return (dict, str, float)
    raise TypeError(f"unsupported message field type {annotation!r}")


def schema(cls: type[Message]) -> dict[str, object]:
    """``{field name: spec}`` where spec is a type, ``(list, T)``, ``(dict, str, float)`` or TENSOR."""
    cached = cls.__dict__.get("_schema")
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {f.name: _field_spec(hints[f.name]) for f in dataclasses.fields(cls)}
        cls._schema = cached  # type: ignore[attr-defined]
    return cached
