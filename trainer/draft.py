"""The draft model interface the training loop codes against: config, output, build/save/load.

Two algorithms share one module set (SPEC "Eagle-3 draft"): the verifier's token embeddings, an
``fc`` that fuses the three auxiliary hidden states (optionally preceded by ``input_norm``), Llama
or Qwen3 decoder layers whose first layer reads ``[embedding, fused state]`` (2H), a final ``norm``
and a frozen ``lm_head`` restricted to the draft vocabulary. Training targets come from the
verifier's own final norm and lm_head applied to the last captured layer; those two are loaded,
frozen and never saved.

- ``trainer/eagle3.py``: Eagle-3 with training-time test (``ttt_steps`` unrolled steps).
- ``trainer/peagle.py``: P-EAGLE, all depths in one forward over COD-sampled elements.

This module holds the shared architecture (``DraftModel``) and the entry points; the files it
delegates to are ``verifier.py`` (reading the verifier's safetensors), ``vocab.py`` (d2t/t2d),
``layers.py`` / ``attention.py`` (decoder layers, masks, SDPA/FlexAttention) and ``export.py``
(the speculators/vLLM checkpoint format).

Shape letters: B rows, N packed tokens, L captured layers (aux..., last), A aux layers, H hidden,
V target vocab, D draft vocab.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from trainer.batch import PackedBatch
from transformers import PretrainedConfig

from trainer.attention import AttentionMask
from trainer.layers import DraftDecoderLayer, KVCache, RMSNorm, RotaryEmbedding

SPECULATOR_TYPES = ("eagle3", "peagle")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
LOSS_FUNCTIONS = ("kl_div", "ce")


@dataclasses.dataclass(kw_only=True)
class DraftConfig:
    """Everything that shapes a draft model and its objective. Fields named after the
    speculators/draftstream CLI flags; ``None`` defaults are resolved per algorithm."""

    speculator_type: str  # --speculator-type: "eagle3" | "peagle"
    verifier_name_or_path: str  # --verifier-name-or-path: local dir with config.json + *.safetensors
    aux_layer_ids: list[int]  # --target-layer-ids without the last id: the 3 auxiliary layers
    num_layers: int = 1  # --num-layers: draft decoder layers
    draft_vocab_size: int | None = None  # --draft-vocab-size; None = the verifier's full vocab
    # Eagle-3 training-time test.
    ttt_steps: int = 3  # --ttt-steps
    ttt_step_loss_decay: float = 1.0  # --ttt-step-loss-decay: step s loss weighted decay**s
    # P-EAGLE (speculators defaults).
    num_depths: int = 8  # --num-depths: K parallel depths
    down_sample_ratio: float = 0.7  # --down-sample-ratio: COD r
    down_sample_ratio_min: float = 0.2  # --down-sample-ratio-min: COD floor
    max_anchors: int = 512  # --max-anchors: COD seeds per row
    mask_token_id: int | None = None  # --mask-token-id; None = resolved from the verifier (see build_draft)
    # Architecture switches, named as in the speculators config.json (which is what vLLM reads).
    norm_before_residual: bool = True  # --no-norm-before-residual turns it off
    # One RMSNorm ``input_norm`` over the concatenated A*H aux states before ``fc`` (SPEC: on by
    # default). speculators/vLLM call this ``norm_before_fc``.
    norm_before_fc: bool = True
    # Per-aux-layer RMSNorms ``fc_norm.{i}`` before concatenation (Eagle 3.1). NOTE: this is the
    # speculators/vLLM meaning of ``fc_norm``; the single norm over the concatenation is
    # ``norm_before_fc`` above. The two are mutually exclusive.
    fc_norm: bool = False
    # Feed the post-``norm`` hidden state to the next TTT step / depth (Eagle 3.1).
    norm_output: bool = False
    embed_requires_grad: bool | None = None  # None: False for eagle3, True for peagle (SPEC)
    draft_arch: str | None = None  # "llama" | "qwen3"; None = the verifier's if it is one, else llama
    loss_fn: str = "kl_div"  # "kl_div" = forward KL(target || draft); "ce" = cross-entropy on the target argmax
    attention_backend: str = "auto"  # auto = flex on CUDA, sdpa elsewhere

    def __post_init__(self) -> None:
        if self.speculator_type not in SPECULATOR_TYPES:
            raise ValueError(f"--speculator-type must be one of {SPECULATOR_TYPES}, got {self.speculator_type!r}")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(
                f"--target-layer-ids must name 3 auxiliary layers (plus the last), got aux ids {self.aux_layer_ids}"
            )
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"--draft-vocab-size must be >= 1, got {self.draft_vocab_size}")
        if self.ttt_steps < 1:
            raise ValueError(f"--ttt-steps must be >= 1, got {self.ttt_steps}")
        if self.ttt_step_loss_decay <= 0:
            raise ValueError(f"--ttt-step-loss-decay must be > 0, got {self.ttt_step_loss_decay}")
        if self.num_depths < 1:
            raise ValueError(f"--num-depths must be >= 1, got {self.num_depths}")
        if not 0 < self.down_sample_ratio <= 1:
            raise ValueError(f"--down-sample-ratio must be in (0, 1], got {self.down_sample_ratio}")
        if not 0 <= self.down_sample_ratio_min <= 1:
            raise ValueError(f"--down-sample-ratio-min must be in [0, 1], got {self.down_sample_ratio_min}")
        if self.max_anchors < 1:
            raise ValueError(f"--max-anchors must be >= 1, got {self.max_anchors}")
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc (input_norm) and fc_norm (per-layer norms) are mutually exclusive")
        if self.fc_norm and self.speculator_type == "peagle":
            # vLLM (0.33) builds P-EAGLE drafts without per-layer fc norms: such a checkpoint
            # would not load in `vllm serve`.
            raise ValueError("fc_norm is not supported for --speculator-type peagle (vLLM cannot serve it)")
        if self.draft_arch not in (None, "llama", "qwen3"):
            raise ValueError(f"--draft-arch must be llama or qwen3, got {self.draft_arch!r}")
        if self.loss_fn not in LOSS_FUNCTIONS:
            raise ValueError(f"--loss-fn must be one of {LOSS_FUNCTIONS}, got {self.loss_fn!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.embed_requires_grad is None:
            self.embed_requires_grad = self.speculator_type == "peagle"

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def speculative_tokens(self) -> int:
        """K in the checkpoint's greedy proposal: tokens proposed per verifier step."""
        return self.ttt_steps if self.speculator_type == "eagle3" else self.num_depths


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

    def __init__(self, config: DraftConfig, layer_config: PretrainedConfig, *, draft_vocab_size: int, target_hidden_size: int):
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
        self.fc_norm = nn.ModuleList(RMSNorm(target_hidden_size, eps) for _ in range(num_aux)) if config.fc_norm else None
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


def build_draft(config: DraftConfig, token_freq: dict[int, int] | None) -> DraftModel:
    """Build a draft for ``config.verifier_name_or_path``: decoder config derived from the
    verifier's, embeddings / final norm / lm_head read from its safetensors (only those tensors),
    d2t/t2d from ``token_freq`` when ``draft_vocab_size`` is below the verifier vocab. Trainable
    weights are freshly initialised (seeded by the caller's ``torch.manual_seed``). Choices left
    open in ``config`` are resolved and recorded in it: ``draft_arch`` and, for P-EAGLE,
    ``mask_token_id``."""
    from trainer import export  # export.py builds on this module's classes

    return export.build_draft(config, token_freq)


def save_draft(model: DraftModel, directory: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (bf16, SPEC names) into ``directory``.
    ``state_dict``: a full state dict gathered from FSDP (model's own names); default the model's."""
    from trainer import export

    export.save_draft(model, directory, state_dict=state_dict)


def load_draft(directory: str | Path, *, verifier_name_or_path: str | None = None, **overrides) -> DraftModel:
    """Rebuild a draft from ``save_draft``'s output; the frozen verifier norm / lm_head come from
    the verifier (``verifier_name_or_path`` overrides the path recorded in config.json).
    ``overrides``: DraftConfig fields config.json does not record (``ttt_step_loss_decay``,
    ``down_sample_ratio``, ``attention_backend``, ...), else their defaults."""
    from trainer import export

    return export.load_draft(directory, verifier_name_or_path=verifier_name_or_path, **overrides)


def export_state_dict(model: DraftModel, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``save_draft`` writes, under SPEC names and dtypes."""
    from trainer import export

    return export.export_state_dict(model, state_dict)
