"""Build drafts from a verifier, and save / load them in the speculators format vLLM serves.

``model.safetensors`` holds the draft's weights under the names vLLM's Eagle-3 loader expects (no
``model.`` prefix): ``embed_tokens.weight``, ``input_norm.weight`` (norm_before_fc) or
``fc_norm.{a}.weight`` (fc_norm), ``fc.weight``, ``layers.{i}.*`` (``hidden_norm`` in layer 0),
``norm.weight``, ``lm_head.weight``, ``d2t`` int64 / ``t2d`` bool when the vocabulary is pruned, and
``mask_hidden`` [1, 1, A*H] for P-EAGLE; floating tensors in bf16. The verifier's own final norm
and lm_head (training targets only) are never saved: they are re-read from the verifier.

``config.json`` follows the speculators schema (SPEC "Checkpoint"); vLLM builds its draft config
from ``transformer_layer_config`` plus the algorithm keys, and its speculative config from
``speculators_config.proposal_methods[0].speculative_tokens`` and the verifier entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.models.base import DraftModel
from trainer.models.config import DraftConfig
from trainer.models.eagle3 import Eagle3Draft
from trainer.models.layers import derive_layer_config
from trainer.models.peagle import PEagleDraft
from trainer.models.verifier import VerifierHead, read_verifier_config, read_verifier_head
from trainer.models.vocab import build_vocab_mapping

SPECULATORS_VERSION = "0.3.0"
_ARCHITECTURES = {"eagle3": "Eagle3Speculator", "peagle": "PEagleSpeculator"}
_NEVER_SAVED = ("verifier_norm.", "verifier_lm_head.", "rotary.")


def _model_class(speculator_type: str) -> type[DraftModel]:
    return Eagle3Draft if speculator_type == "eagle3" else PEagleDraft


def resolve_mask_token_id(path: str | Path, verifier_config: dict) -> int:
    """P-EAGLE's mask token when none is given: the tokenizer's mask token; else the first
    embedding row no token uses (P-EAGLE trains embeddings, so that row becomes the mask); else
    the pad, then eos token. The chosen id is recorded in config.json (vLLM requires it)."""
    vocab_size = verifier_config["vocab_size"]
    tokenizer = None
    if any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer is not None and tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    if tokenizer is not None and len(tokenizer) < vocab_size:
        return len(tokenizer)
    for source in (tokenizer, None):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None) if source is not None else verifier_config.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError(f"--mask-token-id is required: {path} has no mask, spare, pad or eos token")


def _construct(config: DraftConfig, verifier_config: dict, *, draft_vocab_size: int) -> DraftModel:
    layer_config = derive_layer_config(verifier_config, num_layers=config.num_layers, draft_arch=config.draft_arch)
    config.draft_arch = layer_config.model_type  # record what was built
    kwargs = dict(draft_vocab_size=draft_vocab_size, target_hidden_size=verifier_config["hidden_size"])
    if config.speculator_type == "peagle":
        if config.mask_token_id is None:
            config.mask_token_id = resolve_mask_token_id(config.verifier_name_or_path, verifier_config)
        if not 0 <= config.mask_token_id < verifier_config["vocab_size"]:
            raise ValueError(f"--mask-token-id {config.mask_token_id} is outside the verifier vocab")
        kwargs["mask_token_id"] = config.mask_token_id
    return _model_class(config.speculator_type)(config, layer_config, **kwargs)


@torch.no_grad()
def _install_verifier_head(model: DraftModel, head: VerifierHead, *, with_draft_weights: bool) -> None:
    """Copy the verifier's frozen target head in; with ``with_draft_weights`` also the draft's
    initial embeddings and lm_head (a fresh build; a reload takes those from the checkpoint)."""
    rows = head.lm_head if model.t2d is None else head.lm_head[model.t2d]
    model.verifier_norm.weight.copy_(head.norm)
    model.verifier_lm_head.weight.copy_(rows)
    if with_draft_weights:
        model.embed_tokens.weight.copy_(head.embed_tokens)
        model.lm_head.weight.copy_(rows)


def build_draft(config: DraftConfig, token_freq: dict[int, int] | None) -> DraftModel:
    verifier_config = read_verifier_config(config.verifier_name_or_path)
    target_vocab = verifier_config["vocab_size"]
    draft_vocab = config.draft_vocab_size or target_vocab
    if draft_vocab > target_vocab:
        raise ValueError(f"--draft-vocab-size {draft_vocab} exceeds the verifier vocab {target_vocab}")
    if draft_vocab < target_vocab and token_freq is None:
        raise ValueError(
            f"--draft-vocab-size {draft_vocab} < verifier vocab {target_vocab} needs token_freq.pt from prepare"
        )
    model = _construct(config, verifier_config, draft_vocab_size=draft_vocab)
    if model.t2d is not None:
        d2t, t2d = build_vocab_mapping(token_freq, draft_vocab, target_vocab)
        model.d2t.copy_(d2t)
        model.t2d.copy_(t2d)
    _install_verifier_head(
        model, read_verifier_head(config.verifier_name_or_path, verifier_config), with_draft_weights=True
    )
    return model


def export_state_dict(model: DraftModel, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors: SPEC names (the model's own, minus the verifier's frozen head), bf16
    floats, ``d2t`` int64 and ``t2d`` bool."""
    source = model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if name.startswith(_NEVER_SAVED):
            continue
        tensor = tensor.detach().cpu()
        if name == "d2t":
            out[name] = tensor.to(torch.int64).contiguous()
        elif name == "t2d":
            out[name] = tensor.to(torch.bool).contiguous()
        else:
            out[name] = tensor.to(torch.bfloat16).contiguous()
    return out


def _recorded_verifier_path(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def checkpoint_config(model: DraftModel) -> dict:
    """config.json in the speculators schema."""
    cfg = model.config
    layer = model.layer_config.to_dict()
    # Drop transformers' runtime switches and bookkeeping; keep everything that shapes the layers.
    for key in (
        "transformers_version",
        "_name_or_path",
        "id2label",
        "label2id",
        "dtype",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "problem_type",
    ):
        layer.pop(key, None)
    layer["vocab_size"] = model.layer_config.vocab_size
    # vLLM builds a generic PretrainedConfig from this dict: give the rope base under both the
    # transformers 5 key (rope_parameters) and the older one.
    rope = layer.get("rope_parameters") or {}
    if "rope_theta" in rope:
        layer.setdefault("rope_theta", rope["rope_theta"])
    verifier_config = read_verifier_config(cfg.verifier_name_or_path)
    out = {
        "architectures": [_ARCHITECTURES[cfg.speculator_type]],
        "speculators_model_type": cfg.speculator_type,
        "transformer_layer_config": layer,
        "draft_vocab_size": model.draft_vocab_size,
        "norm_before_residual": cfg.norm_before_residual,
        "norm_before_fc": cfg.norm_before_fc,
        "fc_norm": cfg.fc_norm,
        "norm_output": cfg.norm_output,
        "target_hidden_size": model.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
        "embed_requires_grad": bool(cfg.embed_requires_grad),
        "speculators_config": {
            "algorithm": cfg.speculator_type,
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": cfg.speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            # `vllm serve <checkpoint>` loads this as the target model: a local directory is
            # recorded absolute so serving works from any working directory.
            "verifier": {
                "name_or_path": _recorded_verifier_path(cfg.verifier_name_or_path),
                "architectures": verifier_config["architectures"],
            },
        },
        "speculators_version": SPECULATORS_VERSION,
        "dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    if cfg.speculator_type == "peagle":
        out["mask_token_id"] = cfg.mask_token_id
    return out


def save_draft(model: DraftModel, directory: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(model, state_dict)
    # Write-then-rename so a crash never leaves a half-written file under the final name.
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(checkpoint_config(model), indent=2) + "\n")
    os.replace(tmp, directory / "config.json")


def draft_config_from_checkpoint(
    checkpoint: dict, *, verifier_name_or_path: str | None = None, **overrides
) -> DraftConfig:
    """The DraftConfig a checkpoint's config.json describes (training-only knobs at their
    defaults unless given in ``overrides``)."""
    algorithm = checkpoint["speculators_model_type"]
    layer = checkpoint["transformer_layer_config"]
    speculative_tokens = checkpoint["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    fields = dict(
        speculator_type=algorithm,
        verifier_name_or_path=verifier_name_or_path or checkpoint["speculators_config"]["verifier"]["name_or_path"],
        aux_layer_ids=list(checkpoint["eagle_aux_hidden_state_layer_ids"]),
        num_layers=layer["num_hidden_layers"],
        draft_vocab_size=checkpoint["draft_vocab_size"],
        norm_before_residual=checkpoint["norm_before_residual"],
        norm_before_fc=checkpoint["norm_before_fc"],
        fc_norm=checkpoint["fc_norm"],
        norm_output=checkpoint["norm_output"],
        embed_requires_grad=checkpoint["embed_requires_grad"],
        draft_arch=layer["model_type"],
    )
    if algorithm == "eagle3":
        fields["ttt_steps"] = speculative_tokens
    else:
        fields["num_depths"] = speculative_tokens
        fields["mask_token_id"] = checkpoint["mask_token_id"]
    fields.update(overrides)
    return DraftConfig(**fields)


def load_draft(directory: str | Path, *, verifier_name_or_path: str | None = None, **overrides) -> DraftModel:
    directory = Path(directory)
    checkpoint = json.loads((directory / "config.json").read_text())
    config = draft_config_from_checkpoint(checkpoint, verifier_name_or_path=verifier_name_or_path, **overrides)
    verifier_config = read_verifier_config(config.verifier_name_or_path)
    model = _construct(config, verifier_config, draft_vocab_size=checkpoint["draft_vocab_size"])
    tensors = load_file(str(directory / "model.safetensors"))
    expected = set(export_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(
            f"{directory}/model.safetensors does not match its config.json: "
            f"missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}"
        )
    own = model.state_dict()
    model.load_state_dict({name: t.to(own[name].dtype) for name, t in tensors.items()}, strict=False)
    _install_verifier_head(
        model, read_verifier_head(config.verifier_name_or_path, verifier_config), with_draft_weights=False
    )
    return model
