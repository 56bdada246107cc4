"""Hugging Face capture backend: run the target with ``transformers`` and record hidden states
exactly as vLLM's ``extract_hidden_states`` does.

Id ``k`` is the residual stream entering decoder layer ``k`` (a forward pre-hook on layer ``k``;
id 0 is the embedding output), id ``N`` is layer ``N-1``'s output (a forward hook), i.e. before the
final norm. ``output_hidden_states`` is not used: its last entry is taken after the final norm.
Only the decoder runs (no lm_head): capture needs no logits.

Rows are packed greedily, in order, into batches of at most ``max_batch_tokens`` padded tokens
(``producer.backend.plan_batches``).
Padding goes on the right with an attention mask: a real token never attends to a later position,
so padding cannot leak into a row, and each row's tensors equal a capture of that row alone
(within dtype tolerance). On CUDA, each batch's rows are copied into pinned host memory on a
side stream while the next batch's forward runs; on CPU a row's tensor is a view of the batch.

Shapes: B rows per batch, S padded length, T tokens of one row, L captured layers, H hidden size,
N packed real tokens of a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from producer.backend import DTYPE_CHOICES, CaptureRow, plan_batches
from protocol.codec import DTYPE_NAMES
from protocol.devices import resolve_device
from protocol.layer_capture import ResidualCapture
from protocol.messages import Sample
from protocol.target import TargetSpec, capture_layer_ids


@dataclasses.dataclass(kw_only=True)
class CaptureConfig:
    """How to load the target and batch rows. ``layer_ids=None`` means ``[2, N//2, N-3, N]``
    (``protocol.target.capture_layer_ids``)."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    layer_ids: list[int] | None = None
    max_batch_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        resolve_device(self.device)  # validates the flag
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclasses.dataclass
class _Staged:
    """A batch whose per-row host tensors are valid once ``ready`` (a CUDA event, if any) fires."""

    rows: list[CaptureRow]
    hidden_rows: list[torch.Tensor]  # [T, L, H] each
    ready: torch.cuda.Event | None


def collate(batch: list[CaptureRow], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ``ids_BS`` and ``mask_BS`` (int64, host) and the row lengths; refuses ids
    outside the vocabulary, which would index past the embedding table."""
    lengths = [row.input_ids.shape[0] for row in batch]
    ids_BS = torch.zeros((len(batch), max(lengths)), dtype=torch.int64)
    mask_BS = torch.zeros((len(batch), max(lengths)), dtype=torch.int64)
    for b, row in enumerate(batch):
        if lengths[b] == 0:
            raise ValueError(f"row {row.sample_id} has no tokens")
        low, high = int(row.input_ids.min()), int(row.input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"row {row.sample_id} has token id {high if high >= vocab_size else low} outside the target's "
                f"vocabulary of {vocab_size}: was the dataset prepared with this model's tokenizer (--model)?"
            )
        ids_BS[b, : lengths[b]] = row.input_ids
        mask_BS[b, : lengths[b]] = 1
    return ids_BS, mask_BS, lengths


class HFCapture:
    """Capture backend over a ``transformers`` causal LM (see the module docstring).

    ``model`` lends an already loaded causal LM (on ``config``'s device, in the wanted dtype) instead
    of loading ``config.model``; ``close()`` removes the hooks and leaves it usable."""

    def __init__(self, config: CaptureConfig, *, model=None):
        self.config = config
        self.device = config.resolved_device()
        if model is None:
            from transformers import AutoModelForCausalLM

            dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
            # Loaded on the host, then moved: ``device_map`` would need ``accelerate``, not a dependency.
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(self.device)
        self.model = model.eval()
        self._decoder = self.model.get_decoder()
        layers = self._decoder.layers
        self.num_layers = len(layers)
        self.layer_ids = capture_layer_ids(config.layer_ids, self.num_layers)
        self.dtype = next(self.model.parameters()).dtype
        self._vocab_limit = self.model.get_input_embeddings().num_embeddings
        self._capture = ResidualCapture(layers, self.layer_ids)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def describe(self) -> TargetSpec:
        return TargetSpec(
            target_model=self.config.model,
            layer_ids=list(self.layer_ids),
            hidden_size=int(self.model.config.hidden_size),
            dtype=DTYPE_NAMES[self.dtype],
            vocab_size=int(self.model.config.vocab_size),
        )

    def capture(self, rows: Iterable[CaptureRow], *, epoch: int = 0, lease_id: int = 0) -> Iterator[Sample]:
        """Yield one Sample per row, in input order. On CUDA, batch i's samples come out after
        batch i+1's forward has been launched, so the copy overlaps compute."""
        pending: _Staged | None = None
        for batch in plan_batches(rows, self.config.max_batch_tokens):
            staged = self._run(batch)
            if pending is not None:
                yield from self._emit(pending, epoch, lease_id)
            pending = staged
        if pending is not None:
            yield from self._emit(pending, epoch, lease_id)

    @torch.no_grad()
    def _run(self, batch: list[CaptureRow]) -> _Staged:
        ids_BS, mask_BS, lengths = collate(batch, self._vocab_limit)
        self._decoder(
            input_ids=ids_BS.to(self.device, non_blocking=True),
            attention_mask=mask_BS.to(self.device, non_blocking=True),
            use_cache=False,
        )
        hidden_BSLH = torch.stack(self._capture.take(), dim=2)
        if self._copy_stream is None:
            return _Staged(batch, [hidden_BSLH[b, :T] for b, T in enumerate(lengths)], None)

        # Only real tokens cross to the host: one contiguous memcpy per row into a pinned buffer.
        num_layers, hidden = hidden_BSLH.shape[2], hidden_BSLH.shape[3]
        host_NLH = torch.empty((sum(lengths), num_layers, hidden), dtype=hidden_BSLH.dtype, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        views, offset = [], 0
        with torch.cuda.stream(self._copy_stream):
            for b, T in enumerate(lengths):
                view = host_NLH[offset : offset + T]
                view.copy_(hidden_BSLH[b, :T], non_blocking=True)
                views.append(view)
                offset += T
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        # The caching allocator must not hand this memory to the next batch before the copy ends.
        hidden_BSLH.record_stream(self._copy_stream)
        return _Staged(batch, views, ready)

    def _emit(self, staged: _Staged, epoch: int, lease_id: int) -> Iterator[Sample]:
        if staged.ready is not None:
            staged.ready.synchronize()
        for row, hidden_TLH in zip(staged.rows, staged.hidden_rows):
            yield Sample(
                sample_id=int(row.sample_id),
                epoch=epoch,
                lease_id=lease_id,
                token_ids=row.input_ids.to("cpu", torch.int64),
                loss_mask=row.loss_mask.to("cpu", torch.uint8),
                hidden_states=hidden_TLH,
            )

    def close(self) -> None:
        self._capture.close()
