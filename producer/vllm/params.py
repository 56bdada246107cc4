"""The ``kv_transfer_params`` of a draftstream request to vLLM: where one row's hidden states go.

The producer (``producer.vllm.backend``) puts a ``SampleRoute`` into every request it submits; the
connector (``producer.vllm.connector``) reads it back from the finished ``Request`` and sends the
request's hidden states there. Everything travels as plain JSON under one key, ``"draftstream"``,
so the same dict passes through ``SamplingParams.extra_args`` (in-process engine) and through the
body of an OpenAI completions request (``vllm serve``) unchanged.

Destinations: ``tcp://HOST:PORT`` or ``ipc://PATH`` is a trainer rank's data endpoint (a protocol
``Sample`` is pushed there); ``file:///DIR`` spills ``DIR/hs_{sample_id}.safetensors``. The loss
mask travels as ``[start, end)`` spans of ones: an assistant turn is one span, so a long row costs
a few numbers instead of one per token. ``report`` names the producer's endpoint for delivery
reports and ``ticket`` the producer's number for this request (see ``producer.vllm.sender``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

PARAMS_KEY = "draftstream"
_SCHEMES = ("tcp", "ipc", "file")


def loss_mask_spans(loss_mask: torch.Tensor) -> list[list[int]]:
    """``[start, end)`` runs of nonzero entries of a 1-D mask, in order."""
    mask = loss_mask.reshape(-1).to(torch.bool)
    if mask.numel() == 0:
        return []
    edges = torch.diff(
        mask.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8)
    )
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return [[s, e] for s, e in zip(starts, ends)]


def spans_to_loss_mask(spans: list[list[int]], num_tokens: int) -> torch.Tensor:
    """Inverse of ``loss_mask_spans``: a uint8 mask of ``num_tokens`` (the protocol's loss-mask dtype)."""
    mask = torch.zeros(num_tokens, dtype=torch.uint8)
    for start, end in spans:
        mask[start:end] = 1
    return mask


def destination_scheme(destination: str) -> str:
    scheme, sep, rest = destination.partition("://")
    if not sep or scheme not in _SCHEMES or not rest:
        raise ValueError(f"destination must be tcp://HOST:PORT, ipc://PATH or file:///DIR, got {destination!r}")
    return scheme


def spill_directory(destination: str) -> str:
    """``file:///DIR`` -> ``/DIR`` (absolute paths only: the engine's working directory is not ours)."""
    path = destination[len("file://") :]
    if not os.path.isabs(path):
        raise ValueError(f"spill destination {destination!r} must name an absolute directory (file:///DIR)")
    return os.path.normpath(path)


@dataclasses.dataclass(kw_only=True, frozen=True)
class SampleRoute:
    """One request's sample: its identity (id, epoch, lease), its loss mask and where it goes."""

    sample_id: int
    epoch: int = 0
    lease_id: int = 0
    token: str = ""  # the grant's token, echoed in the sample so the trainer accepts it
    destination: str
    num_tokens: int  # the row's length: the connector checks the prompt against it
    loss_mask_spans: list[list[int]] = dataclasses.field(default_factory=list)
    report: str = ""  # producer endpoint for Delivered reports keyed by ticket ("" = none)
    ticket: int = 0

    def __post_init__(self) -> None:
        for name in ("sample_id", "epoch", "lease_id", "num_tokens", "ticket"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}].{name} must be a non-negative int, got {value!r}")
        scheme = destination_scheme(self.destination)
        if scheme == "file":
            spill_directory(self.destination)
        if self.report and destination_scheme(self.report) == "file":
            raise ValueError(f"report endpoint must be tcp:// or ipc://, got {self.report!r}")
        previous_end = 0
        for span in self.loss_mask_spans:
            ok = isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)
            if not ok or not previous_end <= span[0] < span[1] <= self.num_tokens:
                raise ValueError(
                    f"loss_mask_spans must be ordered, disjoint [start, end) pairs within {self.num_tokens} tokens, got {span!r}"
                )
            previous_end = span[1]
        if not isinstance(self.token, str) or len(self.token) > 128:
            raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}].token must be a short string")

    @property
    def is_spill(self) -> bool:
        return self.destination.startswith("file://")

    def loss_mask(self) -> torch.Tensor:
        return spans_to_loss_mask(self.loss_mask_spans, self.num_tokens)

    def to_params(self) -> dict[str, Any]:
        """The request's ``kv_transfer_params`` (JSON-ready)."""
        fields = dataclasses.asdict(self)
        fields["loss_mask_spans"] = [list(s) for s in self.loss_mask_spans]
        return {PARAMS_KEY: fields}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> SampleRoute | None:
        """The route in ``params``; None when the request is not ours. Raises ValueError if malformed."""
        if not params or PARAMS_KEY not in params:
            return None
        raw = params[PARAMS_KEY]
        if not isinstance(raw, dict):
            raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}] must be an object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}] has unknown fields {unknown}")
        try:
            route = cls(**raw)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}]: {e}") from None
        return dataclasses.replace(route, loss_mask_spans=[list(s) for s in route.loss_mask_spans])
