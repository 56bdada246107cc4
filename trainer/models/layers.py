"""Draft decoder layers: Llama / Qwen3 layers with an explicit attention mask and an Eagle first layer.

The layer config is a plain transformers ``LlamaConfig`` / ``Qwen3Config`` derived from the
verifier's (``derive_layer_config``); it is also what the checkpoint records as
``transformer_layer_config``. Parameter names match the checkpoint (SPEC) and vLLM's Eagle-3
loader: ``self_attn.{q,k,v,o}_proj`` (+ ``q_norm``/``k_norm`` for Qwen3), ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm`` and, in layer 0, ``hidden_norm``.

The attention forward is ours (not transformers') because the drafts need masks that are neither
causal nor padding masks (training-time test, COD chains) and, for Eagle-3, keys that persist
across TTT steps.

Shape letters: B rows, N tokens (queries), M keys, H hidden, h heads, g kv heads, K head dim.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, Qwen3Config
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from trainer.models.attention import AttentionMask, attend

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen3": Qwen3Config}
_ROTARY_CLASSES = {"llama": LlamaRotaryEmbedding, "qwen3": Qwen3RotaryEmbedding}
# Verifier config keys a draft layer inherits (anything shaping attention, MLP, norms, rope).
_INHERITED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def derive_layer_config(verifier_config: dict, *, num_layers: int, draft_arch: str | None) -> PretrainedConfig:
    """The draft decoder's config: the verifier's shapes, ``num_layers`` layers, Llama or Qwen3."""
    arch = draft_arch or (
        verifier_config.get("model_type") if verifier_config.get("model_type") in _CONFIG_CLASSES else "llama"
    )
    kwargs = {k: verifier_config[k] for k in _INHERITED_KEYS if verifier_config.get(k) is not None}
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if arch == "qwen3":
        kwargs.pop("mlp_bias", None)
    config = _CONFIG_CLASSES[arch](**kwargs, num_hidden_layers=num_layers, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"]
    return config


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Llama/Qwen3 and vLLM do)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit position ids, via the verifier family's rotary (rope scaling included)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.inner = _ROTARY_CLASSES[config.model_type](config)

    def forward(self, like_BNX: torch.Tensor, position_ids_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(like_BNX, position_ids_BN)


class DraftAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, in_features: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.model_type == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x_BNX: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """``cache`` (Eagle-3 TTT): keys/values of this layer's earlier steps; this step's are
        appended, and the queries attend over all of them in order."""
        b, n, _ = x_BNX.shape
        q_BNhK = self.q_proj(x_BNX).view(b, n, self.num_heads, self.head_dim)
        k_BNgK = self.k_proj(x_BNX).view(b, n, self.num_kv_heads, self.head_dim)
        v_BNgK = self.v_proj(x_BNX).view(b, n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BNhK, k_BNgK = self.q_norm(q_BNhK), self.k_norm(k_BNgK)
        cos, sin = rope
        q_BhNK, k_BgNK = apply_rotary_pos_emb(q_BNhK.transpose(1, 2), k_BNgK.transpose(1, 2), cos, sin)
        v_BgNK = v_BNgK.transpose(1, 2)
        if cache is not None:
            cache.append((k_BgNK, v_BgNK))
            k_BgNK = torch.cat([k for k, _ in cache], dim=2)
            v_BgNK = torch.cat([v for _, v in cache], dim=2)
        out_BhNK = attend(q_BhNK, k_BgNK, v_BgNK, mask)
        return self.o_proj(out_BhNK.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class KVCache:
    """One layer's keys/values of the earlier Eagle-3 TTT steps. Deliberately not a list: FSDP2
    rebuilds the lists, tuples, dicts and dataclasses passed to a sharded module's forward (to hook
    the tensors that need gradients), so appends to a list argument would be lost."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def append(self, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._entries.append(kv)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class DraftMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """A pre-norm Llama/Qwen3 decoder layer. The first layer's attention reads 2H features:
    ``input_layernorm(embedding)`` next to ``hidden_norm(fused state)``; its residual is the
    normed fused state when ``norm_before_residual`` is on, else the raw one (as vLLM does)."""

    def __init__(self, config: PretrainedConfig, *, first: bool, norm_before_residual: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.first = first
        self.norm_before_residual = norm_before_residual
        self.self_attn = DraftAttention(config, 2 * hidden if first else hidden)
        self.mlp = DraftMLP(config)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps) if first else None

    def forward(
        self,
        x_BNH: torch.Tensor,
        *,
        embeds_BNH: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.first:
            normed_BNH = self.hidden_norm(x_BNH)
            residual_BNH = normed_BNH if self.norm_before_residual else x_BNH
            attn_in = torch.cat([self.input_layernorm(embeds_BNH), normed_BNH], dim=-1)
        else:
            residual_BNH = x_BNH
            attn_in = self.input_layernorm(x_BNH)
        x_BNH = residual_BNH + self.self_attn(attn_in, rope, mask, cache)
        return x_BNH + self.mlp(self.post_attention_layernorm(x_BNH))
