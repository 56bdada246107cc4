"""Attention masks and kernels for the drafts: one mask definition, two kernels.

Each algorithm describes its mask once, as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``
that is vectorised over index tensors. On CUDA that function becomes a ``BlockMask`` for
FlexAttention; elsewhere it is evaluated on broadcast index grids into a dense boolean mask for
SDPA (FlexAttention's backward does not run on CPU). Both kernels therefore see the same mask by
construction, and the GPU test compares their outputs.

Every query row may attend to at least itself, so no row is ever fully masked: a fully masked row
makes SDPA return NaN (padding rows would otherwise poison the loss through the backward).

Shape letters: B rows, h query heads, g key/value heads, Q queries, M keys, K head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_compiled_flex = None


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` picks FlexAttention on CUDA and SDPA with a dense mask elsewhere."""
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if requested == "flex" and device.type != "cuda":
        raise ValueError("--attention-backend flex needs CUDA (FlexAttention backward fails on CPU); use sdpa or auto")
    return requested


@dataclasses.dataclass
class AttentionMask:
    """A mask for one attention call: a dense ``[Q, M]`` bool tensor (SDPA) or a BlockMask (flex)."""

    backend: str
    dense_QM: torch.Tensor | None = None
    block_mask: object | None = None

    @classmethod
    def build(cls, mask_mod: MaskMod, q_len: int, kv_len: int, *, device: torch.device, backend: str) -> AttentionMask:
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            return cls(backend, block_mask=create_block_mask(mask_mod, None, None, q_len, kv_len, device=device))
        zero = torch.zeros((), dtype=torch.int64, device=device)
        q_idx = torch.arange(q_len, device=device)[:, None]
        kv_idx = torch.arange(kv_len, device=device)[None, :]
        return cls(backend, dense_QM=mask_mod(zero, zero, q_idx, kv_idx).expand(q_len, kv_len))


def attend(q_BhQK: torch.Tensor, k_BgMK: torch.Tensor, v_BgMK: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention under ``mask``; grouped-query heads are expanded by the kernel."""
    gqa = q_BhQK.shape[1] != k_BgMK.shape[1]
    if mask.backend == "flex":
        return _flex()(q_BhQK, k_BgMK, v_BgMK, block_mask=mask.block_mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q_BhQK, k_BgMK, v_BgMK, attn_mask=mask.dense_QM, enable_gqa=gqa)


def _flex():
    # Uncompiled flex_attention materialises the full score matrix; compile once per process.
    # Packed lengths vary per batch: padding rows to a fixed length (pack(pad_to=...)) avoids
    # recompiles.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def ttt_mask_mod(doc_N: torch.Tensor) -> MaskMod:
    """Eagle-3 training-time test. Keys are the N positions of step 0 followed by N per later step;
    a query at position q sees step-0 positions <= q of its own document, plus position q itself at
    every step (its own chain). Padding (doc -1) sees only itself."""
    n = doc_N.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        pos = kv_idx % n
        context = (kv_idx < n) & (pos <= q_idx) & (doc_N[q_idx] == doc_N[pos]) & (doc_N[q_idx] >= 0)
        return context | (pos == q_idx)

    return mask_mod


def cod_mask_mod(anchor_E: torch.Tensor, depth_E: torch.Tensor, doc_N: torch.Tensor) -> MaskMod:
    """P-EAGLE over E sampled elements (anchor position, depth): an element sees the depth-0
    elements of its document up to its anchor, and its own chain's elements of lower depth.
    Padding sees only itself."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_anchor, kv_anchor = anchor_E[q_idx], anchor_E[kv_idx]
        q_doc = doc_N[q_anchor]
        same_doc = (q_doc == doc_N[kv_anchor]) & (q_doc >= 0)
        context = (depth_E[kv_idx] == 0) & (kv_anchor <= q_anchor)
        chain = (kv_anchor == q_anchor) & (depth_E[kv_idx] <= depth_E[q_idx])
        return (same_doc & (context | chain)) | (q_idx == kv_idx)

    return mask_mod
