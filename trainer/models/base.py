"""The draft architecture both algorithms share: the modules, their output, and flat rows.

Two algorithms share one module set (SPEC "Eagle-3 draft"): the verifier's token embeddings, an
``fc`` that fuses the three auxiliary hidden states (optionally preceded by ``input_norm``), Llama
or Qwen3 decoder layers whose first layer reads ``[embedding, fused state]`` (2H), a final ``norm``
and a frozen ``lm_head`` restricted to the draft vocabulary. Training targets come from the
verifier's own final norm and lm_head applied to the last captured layer; those two are loaded,
frozen and never saved.

- ``trainer/models/eagle3.py``: Eagle-3 with training-time test (``ttt_steps`` unrolled steps).
- ``trainer/models/peagle.py``: P-EAGLE, all depths in one forward over COD-sampled elements.
- ``trainer/models/export.py``: building a draft from a verifier, and the speculators/vLLM
  checkpoint format (save / load).

Shape letters: B rows, N packed tokens, L captured layers (aux..., last), A aux layers, H hidden,
V target vocab, D draft vocab, X = A*H (the aux layers concatenated).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PretrainedConfig

from trainer.data.batch import PackedBatch
from trainer.models.attention import AttentionMask
from trainer.models.config import DraftConfig
from trainer.models.layers import DraftDecoderLayer, KVCache, RMSNorm, RotaryEmbedding


@dataclasses.dataclass
class DraftOutput:
    loss: torch.Tensor  # scalar to backward
    metrics: dict[str, torch.Tensor]  # detached scalars (see eagle3.py / peagle.py for the names)
    num_loss_tokens: torch.Tensor  # scalar count of supervised positions (or elements for P-EAGLE)


class DraftModel(nn.Module):
    """Modules shared by Eagle-3 and P-EAGLE. Parameter names are the checkpoint's names (SPEC),
    except ``verifier_norm`` / ``verifier_lm_head`` (frozen target head, never saved).

    ``embed_tokens`` [V, H], ``input_norm`` [A*H] (norm_before_fc) or ``fc_norm.{a}`` [H] (fc_norm),
    ``fc`` [H, A*H], ``layers.{i}``, ``norm`` [H], ``lm_head`` [D, H] (frozen), buffers ``d2t`` [D]
    int64 and ``t2d`` [V] bool when the draft vocabulary is pruned.
    """

    def __init__(
        self, config: DraftConfig, layer_config: PretrainedConfig, *, draft_vocab_size: int, target_hidden_size: int
    ):
        super().__init__()
        if target_hidden_size != layer_config.hidden_size:
            raise ValueError(
                f"verifier hidden size {target_hidden_size} != draft hidden size {layer_config.hidden_size}"
            )
        self.config = config
        self.layer_config = layer_config
        self.draft_vocab_size = draft_vocab_size
        self.target_hidden_size = target_hidden_size
        hidden, vocab, num_aux = layer_config.hidden_size, layer_config.vocab_size, config.num_aux
        eps = layer_config.rms_norm_eps

        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.input_norm = RMSNorm(num_aux * target_hidden_size, eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(RMSNorm(target_hidden_size, eps) for _ in range(num_aux)) if config.fc_norm else None
        )
        self.fc = nn.Linear(num_aux * target_hidden_size, hidden, bias=False)
        self.layers = nn.ModuleList(
            DraftDecoderLayer(layer_config, first=i == 0, norm_before_residual=config.norm_before_residual)
            for i in range(config.num_layers)
        )
        self.rotary = RotaryEmbedding(layer_config)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.verifier_norm = RMSNorm(hidden, eps)
        self.verifier_lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        if draft_vocab_size < vocab:
            self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool))
        else:
            self.d2t = None
            self.t2d = None
        self.freeze_verifier_parts()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """FSDP2 shards each of these, then the root."""
        return self.layers

    def freeze_verifier_parts(self) -> None:
        """Verifier-derived weights never train (embeddings do for P-EAGLE / embed_requires_grad)."""
        self.embed_tokens.weight.requires_grad_(bool(self.config.embed_requires_grad))
        for p in (self.lm_head.weight, self.verifier_lm_head.weight, self.verifier_norm.weight):
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- shared building blocks used by both algorithms -------------------------------------

    def fuse_aux(self, aux_BNX: torch.Tensor) -> torch.Tensor:
        """[.., A*H] concatenated aux states -> [.., H] via the optional norms and ``fc``."""
        aux_BNX = aux_BNX.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            aux_BNX = self.input_norm(aux_BNX)
        if self.fc_norm is not None:
            chunks = aux_BNX.chunk(len(self.fc_norm), dim=-1)
            aux_BNX = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux_BNX)

    def decode(
        self,
        fused_BNH: torch.Tensor,
        embeds_BNH: torch.Tensor,
        position_ids_BN: torch.Tensor,
        mask: AttentionMask,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Run the decoder layers; ``caches`` holds one ``KVCache`` per layer (Eagle-3 TTT)."""
        rope = self.rotary(fused_BNH, position_ids_BN)
        x_BNH = fused_BNH
        for i, layer in enumerate(self.layers):
            x_BNH = layer(
                x_BNH,
                embeds_BNH=embeds_BNH,
                rope=rope,
                mask=mask,
                cache=None if caches is None else caches[i],
            )
        return x_BNH

    @torch.no_grad()
    def verifier_logits(self, last_BNH: torch.Tensor) -> torch.Tensor:
        """Target logits over the draft vocabulary from the verifier's last captured layer."""
        last_BNH = last_BNH.to(self.verifier_lm_head.weight.dtype)
        return self.verifier_lm_head(self.verifier_norm(last_BNH))

    def forward(self, batch: PackedBatch, *, generator: torch.Generator | None = None) -> DraftOutput:
        raise NotImplementedError


@dataclasses.dataclass
class FlatRows:
    """A batch's rows laid end to end as one row: documents stay apart through ``doc_N``
    (made unique across rows), so every mask and shift below works on one dimension."""

    input_ids_N: torch.Tensor
    aux_NX: torch.Tensor  # the A aux layers concatenated, A*H
    last_NH: torch.Tensor  # the last captured layer (verifier targets)
    loss_mask_N: torch.Tensor
    position_ids_N: torch.Tensor
    doc_N: torch.Tensor  # -1 = padding


def flatten_rows(batch: PackedBatch, num_aux: int) -> FlatRows:
    b, n, num_captured, hidden = batch.hidden_states.shape
    if num_captured != num_aux + 1:
        raise ValueError(
            f"batch carries {num_captured} captured layers; the draft needs {num_aux} aux + the last "
            "(check --target-layer-ids against the producer's capture)"
        )
    doc_BN = batch.document_ids
    if b > 1:
        stride = int(doc_BN.max().clamp(min=0)) + 1
        offset_B1 = torch.arange(b, device=doc_BN.device)[:, None] * stride
        doc_BN = torch.where(doc_BN >= 0, doc_BN + offset_B1, -1)
    states_NLH = batch.hidden_states.reshape(b * n, num_captured, hidden)
    return FlatRows(
        input_ids_N=batch.input_ids.reshape(-1),
        aux_NX=states_NLH[:, :num_aux].reshape(b * n, num_aux * hidden),
        last_NH=states_NLH[:, num_aux],
        loss_mask_N=batch.loss_mask.reshape(-1).bool(),
        position_ids_N=batch.position_ids.reshape(-1),
        doc_N=doc_BN.reshape(-1),
    )


def shift_left(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """``t[i + k]`` at ``i`` along dim 0, ``fill`` past the end."""
    k = min(k, t.shape[0])
    return torch.cat([t[k:], t.new_full((k, *t.shape[1:]), fill)])
