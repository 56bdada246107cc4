"""The target a producer captures and a trainer expects: the one description both sides share.

- **Layer ids** follow vLLM's ``extract_hidden_states``: id ``k`` is the residual stream entering
  decoder layer ``k`` (id 0 = the embeddings), id ``N`` is the last decoder layer's output before
  the final norm. The default capture ``[2, N//2, N-3, N]`` is three auxiliary layers plus the
  last; checkpoints record only the auxiliary ids. ``capture_layer_ids`` (what a producer
  captures) and ``aux_layer_ids`` (what a draft reads) are the only places that rule lives.
- **``TargetSpec``** is what a producer announces in its ``Hello`` and what a trainer rank checks
  it against; ``mismatch`` says why two specs cannot work together.
- **``sample_nbytes``** is what one captured sample weighs in a trainer's buffer: producers and
  trainers size credit and reports with the same rule.
- **``read_text_config``** reads a target's decoder settings from its ``config.json`` (local
  folder, else ``transformers.AutoConfig``), multimodal ``text_config`` included.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from protocol.messages import Hello


def default_layer_ids(num_layers: int) -> list[int]:
    """``[2, N//2, N-3, N]``: the three auxiliary ids EAGLE-3 uses, then the last layer."""
    return [2, num_layers // 2, num_layers - 3, num_layers]


def capture_layer_ids(layer_ids: Sequence[int] | None, num_layers: int, *, require_last: bool = False) -> list[int]:
    """The ids a producer captures, in the order given (aux..., last): ``layer_ids`` checked
    against a target of ``num_layers`` decoder layers, or the default. ``require_last``: the
    capture feeds a trainer, which computes the verifier's targets from the last id, so it must
    be ``N``."""
    ids = [int(k) for k in layer_ids] if layer_ids else default_layer_ids(num_layers)
    bad = [k for k in ids if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(
            f"--target-layer-ids {bad} out of range: the target has {num_layers} decoder layers, "
            f"so ids go from 0 (embeddings) to {num_layers} (last layer output, before the final norm)"
        )
    if require_last and ids[-1] != num_layers:
        raise ValueError(
            f"--target-layer-ids {ids} must end with the last layer id {num_layers}: the trainer computes "
            "the verifier's targets from it (give the auxiliary ids first, then the last)"
        )
    return ids


def aux_layer_ids(layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    """The three auxiliary ids a draft reads: ``layer_ids`` as 3 aux ids, or 4 ending with the
    last id ``N`` (what the producer captured); default ``2, N//2, N-3``."""
    if layer_ids is None:
        return default_layer_ids(num_layers)[:3]
    ids = [int(k) for k in layer_ids]
    if len(ids) == 4:
        if ids[-1] != num_layers:
            raise ValueError(
                f"--target-layer-ids: with 4 ids the last must be the last layer id {num_layers}, got {ids}"
            )
        ids = ids[:3]
    if len(ids) != 3:
        raise ValueError(f"--target-layer-ids takes 3 auxiliary ids (or 4 ending with {num_layers}), got {ids}")
    if any(not 0 <= k < num_layers for k in ids):
        raise ValueError(f"--target-layer-ids {ids}: ids must be in [0, {num_layers})")
    return ids


def sample_nbytes(num_tokens: int, num_layers: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes one sample occupies in the buffer: hidden states + int64 token ids + uint8 loss mask."""
    return num_tokens * (num_layers * hidden_size * dtype.itemsize + 8 + 1)


def model_name(name_or_path: str) -> str:
    """Hub id or local path -> the model's name, so `/models/Llama-3.1-8B` matches `meta-llama/Llama-3.1-8B`."""
    return Path(name_or_path.rstrip("/")).name


@dataclasses.dataclass(kw_only=True, frozen=True)
class TargetSpec:
    """A target's captures: model, layer ids (aux..., last), hidden size, dtype name, vocabulary,
    and the prepared dataset the rows come from (``""`` = unknown, not checked)."""

    target_model: str
    layer_ids: list[int]
    hidden_size: int
    dtype: str
    vocab_size: int
    dataset_fingerprint: str = ""

    def hello(self, producer_id: str) -> Hello:
        return Hello(producer_id=producer_id, **dataclasses.asdict(self))

    @classmethod
    def from_hello(cls, hello: Hello) -> TargetSpec:
        return cls(**{f.name: getattr(hello, f.name) for f in dataclasses.fields(cls)})

    def mismatches(self, other: TargetSpec) -> list[tuple[str, str]]:
        """``(field, why)`` for each way ``other`` (a producer's) does not fit this one (a
        trainer's). ``field`` names the setting and reveals nothing; ``why`` shows both values.
        A trainer that knows its dataset's fingerprint refuses a producer that does not say one."""
        problems = []
        if model_name(other.target_model) != model_name(self.target_model):
            problems.append(("target model", f"target model {other.target_model!r} != {self.target_model!r}"))
        if list(other.layer_ids) != list(self.layer_ids):
            problems.append(("layer ids", f"layer ids {other.layer_ids} != {self.layer_ids} (--target-layer-ids)"))
        if other.hidden_size != self.hidden_size:
            problems.append(("hidden size", f"hidden size {other.hidden_size} != {self.hidden_size}"))
        if other.dtype != self.dtype:
            problems.append(("dtype", f"dtype {other.dtype} != {self.dtype}"))
        if other.vocab_size != self.vocab_size:
            problems.append(("vocab size", f"vocab size {other.vocab_size} != {self.vocab_size}"))
        if self.dataset_fingerprint and other.dataset_fingerprint != self.dataset_fingerprint:
            problems.append(
                (
                    "dataset fingerprint",
                    f"prepared dataset {other.dataset_fingerprint or '(none given)'} != {self.dataset_fingerprint} (--data)",
                )
            )
        return problems

    def mismatch(self, other: TargetSpec) -> str:
        """Why ``other`` (a producer's) does not fit this one (a trainer's): "" if it does."""
        return "; ".join(why for _, why in self.mismatches(other))


def checkpoint_dtype(text: dict) -> str:
    """The dtype a checkpoint's config names (``dtype``, else ``torch_dtype``, else float32), as a
    name (``"bfloat16"``): what ``--dtype auto`` means on both sides."""
    raw = text.get("dtype") or text.get("torch_dtype") or "float32"
    return str(raw).removeprefix("torch.")


def read_text_config(model: str | Path) -> dict:
    """The decoder's settings (``num_hidden_layers``, ``hidden_size``, ``vocab_size``, dtype, ...)
    of ``model``: a local folder's ``config.json`` read as JSON, else ``transformers.AutoConfig``
    (hub ids). Multimodal configs keep them under ``text_config``; that part is returned."""
    config_file = Path(model) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        text = dict(config.get("text_config") or config)
        for key in ("dtype", "torch_dtype"):
            text.setdefault(key, config.get(key))
        return text
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = text.to_dict()
    out.setdefault("dtype", getattr(config, "dtype", None))
    return out
