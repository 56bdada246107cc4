"""Read what a draft needs from the verifier checkpoint, without loading the verifier.

A draft needs the verifier's config (shapes, rope, vocabulary) and three tensors: the token
embeddings, the final norm and the lm_head. They are read by name straight from the verifier's
safetensors (sharded with ``model.safetensors.index.json`` or a single file), so an 8B or 70B
verifier costs only those tensors' memory. Multimodal checkpoints keep the language model under a
prefix and their text settings under ``text_config``; both are handled.

A hub id works too: only ``config.json``, the shard index and the shards holding those three
tensors are downloaded (one or two shards of an 8B model), into the usual Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

_EMBED_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "embed_tokens.weight",
)
_NORM_NAMES = (
    "model.norm.weight",
    "model.language_model.norm.weight",
    "language_model.model.norm.weight",
    "norm.weight",
)
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


@dataclasses.dataclass(kw_only=True)
class VerifierHead:
    embed_tokens: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]


def resolve_verifier_dir(name_or_path: str | Path, *, download=None) -> Path:
    """A local directory as is; a hub id -> its cache snapshot holding config.json and the
    safetensors shards with the embeddings, final norm and lm_head (nothing else is fetched)."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    if download is None:
        from huggingface_hub import hf_hub_download as download
    repo = str(name_or_path)
    try:
        root = Path(download(repo, "config.json")).parent
    except Exception as e:  # offline, unknown repo, no access: all mean the same to the user
        raise ValueError(
            f"--verifier-name-or-path {repo}: not a local directory, and the hub has no config.json for it ({e})"
        ) from e
    try:
        index_file = download(repo, "model.safetensors.index.json")
    except Exception:  # a single-file checkpoint
        download(repo, "model.safetensors")
        return root
    weight_map = json.loads(Path(index_file).read_text())["weight_map"]
    wanted = {weight_map[n] for n in (*_EMBED_NAMES, *_NORM_NAMES, *_LM_HEAD_NAMES) if n in weight_map}
    for shard in sorted(wanted):
        download(repo, shard)
    return root


def read_verifier_config(path: str | Path) -> dict:
    """The verifier's text-model config as a dict (``text_config`` merged over the top level),
    with ``architectures`` always taken from the top level."""
    path = resolve_verifier_dir(path)
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--verifier-name-or-path {path}: no config.json")
    top = json.loads(config_file.read_text())
    text = top.get("text_config") or {}
    merged = {**top, **text}
    merged["architectures"] = top.get("architectures") or []
    if "hidden_size" not in merged or "vocab_size" not in merged:
        raise ValueError(f"--verifier-name-or-path {path}: config.json lacks hidden_size/vocab_size")
    return merged


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--verifier-name-or-path {path}: no *.safetensors files")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def read_verifier_head(path: str | Path, config: dict | None = None) -> VerifierHead:
    """Embeddings, final norm and lm_head (the embeddings when the verifier ties them)."""
    path = resolve_verifier_dir(path)
    config = config or read_verifier_config(path)
    files = _tensor_files(path)

    def load(candidates: tuple[str, ...], what: str, required: bool = True) -> torch.Tensor | None:
        for name in candidates:
            if name in files:
                with safe_open(files[name], framework="pt") as f:
                    return f.get_tensor(name)
        if required:
            raise ValueError(f"--verifier-name-or-path {path}: no {what} tensor (looked for {list(candidates)})")
        return None

    embed = load(_EMBED_NAMES, "token embedding")
    norm = load(_NORM_NAMES, "final norm")
    lm_head = load(_LM_HEAD_NAMES, "lm_head", required=False)
    if lm_head is None:
        if not config.get("tie_word_embeddings", False):
            raise ValueError(f"--verifier-name-or-path {path}: no lm_head.weight and tie_word_embeddings is false")
        lm_head = embed
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    expected = (
        ("embed_tokens", embed, (vocab, hidden)),
        ("norm", norm, (hidden,)),
        ("lm_head", lm_head, (vocab, hidden)),
    )
    for name, t, shape in expected:
        if tuple(t.shape) != shape:
            raise ValueError(f"--verifier-name-or-path {path}: {name} has shape {tuple(t.shape)}, config says {shape}")
    return VerifierHead(embed_tokens=embed, norm=norm, lm_head=lm_head)
