"""Swap a new draft into a running vLLM engine, in place, between two engine steps.

vLLM loads a worker extension class given as ``--worker-extension-cls`` into every worker; its
methods are reached through ``collective_rpc`` (``LLM.collective_rpc`` in process, or the dev
server's ``POST /collective_rpc``). ``DraftSwap.draftstream_swap_draft(path)`` reads a speculators
checkpoint (``config.json`` + ``model.safetensors``, what ``save_draft`` writes) and copies its
tensors into the draft the engine is serving. The engine core runs utility calls between its steps,
so no forward pass ever sees half a draft; requests in flight go on with the new draft at their next
step, and because the target verifies every token, their outputs do not change.

Why this and not vLLM's own weight-update endpoints (``/start_draft_weight_update`` +
``/update_weights``): in vLLM 0.32 their transfer engines are CUDA-only (NCCL, CUDA IPC), and the
worker's ``reload_weights(weights_path=...)`` reloads the *target* model. A draft is a few hundred MB
at most, read from a local file; loading it in the worker is simpler and works on every device.

What a swap may not change, and is refused for (the serving draft stays as it was): the tensor
names, shapes and kinds of the checkpoint it serves (another draft vocabulary, hidden size, layer
count or algorithm), the number of drafted tokens, and any tensor the draft shares with the target
(vLLM shares ``embed_tokens`` / ``lm_head`` when the draft's copy equals the target's, so a new value
would overwrite the target's own weights; Eagle-3 keeps the verifier's embeddings frozen, so it does
not change them). These checks run before anything is written; a load that still fails midway is
undone by loading the serving checkpoint again.

Measured on the CPU engine (tests/vllm/engine/test_serve.py): a swap of the tiny test draft takes
10-14 ms, and after four swaps under a stream of requests the draft's counters on a fixed batch are
exactly those it had before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Tensor names of a speculators checkpoint that hold no trainable draft weight.
_INDEX_TENSORS = ("t2d",)


class SwapRefused(ValueError):
    """The checkpoint cannot replace the serving draft in place (see the module docstring)."""


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a speculators checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    return config, load_file(str(path / "model.safetensors"))


def speculative_tokens(config: dict) -> int | None:
    """The tokens a speculators checkpoint drafts per step (its first proposal method's)."""
    methods = config.get("speculators_config", {}).get("proposal_methods") or [{}]
    return methods[0].get("speculative_tokens")


class DraftSwap:
    """Worker extension (``--worker-extension-cls producer.live.swap.DraftSwap``): hot-swaps the draft.

    Methods are prefixed so they cannot clash with the worker's own. The worker remembers the
    checkpoint it serves (at first the one the engine started with): a swap must match its tensor
    names and shapes, and a failed load is undone by loading it again."""

    def draftstream_swap_draft(self, path: str) -> dict:
        """Load checkpoint ``path`` into the serving draft. Returns ``{"ok": True, ...}`` with what
        was done, or ``{"ok": False, "reason": ...}`` with the serving draft unchanged (a dict, not
        an exception, so the reason crosses vLLM's ``/collective_rpc`` intact)."""
        try:
            return {"ok": True, **self._draftstream_swap(path)}
        except SwapRefused as e:
            return {"ok": False, "path": str(path), "reason": str(e)}

    def _draftstream_swap(self, path: str) -> dict:
        start = time.perf_counter()
        runner = self.model_runner  # type: ignore[attr-defined]
        spec = self.vllm_config.speculative_config  # type: ignore[attr-defined]
        draft = runner.get_draft_model()
        if draft is None or spec is None:
            raise SwapRefused("this engine serves no draft model (start it with a speculative config)")
        serving_path = getattr(self, "_draftstream_serving", None) or spec.model
        try:
            config, tensors = read_checkpoint(path)
        except Exception as e:  # missing, truncated, not JSON, not safetensors: all refused the same way
            raise SwapRefused(f"cannot read checkpoint {path}: {e}") from e
        _, serving = read_checkpoint(serving_path)
        if speculative_tokens(config) != spec.num_speculative_tokens:
            raise SwapRefused(
                f"checkpoint {path} drafts {speculative_tokens(config)} tokens, the engine {spec.num_speculative_tokens}"
            )
        if set(tensors) != set(serving):
            raise SwapRefused(
                f"checkpoint {path} holds other tensors than the serving draft: "
                f"missing {sorted(set(serving) - set(tensors))[:5]}, extra {sorted(set(tensors) - set(serving))[:5]}"
            )
        for name, value in tensors.items():
            if (
                value.shape != serving[name].shape
                or value.dtype.is_floating_point != serving[name].dtype.is_floating_point
            ):
                raise SwapRefused(
                    f"{name}: checkpoint {value.dtype} {tuple(value.shape)}, serving {serving[name].dtype} {tuple(serving[name].shape)}"
                )
        shared = _shared_with_target(runner.get_model(), draft)
        for name in shared:
            if not torch.equal(tensors[name], serving[name]):
                raise SwapRefused(
                    f"{name} is shared with the target in the serving engine and checkpoint {path} changes it: "
                    "restart the server with the new draft instead"
                )
        weights = [
            (name, value) for name, value in tensors.items() if name not in shared and name not in _INDEX_TENSORS
        ]
        try:
            _load(draft, weights, spec.draft_model_config, runner)
        except Exception as e:
            _load(
                draft,
                [(n, v) for n, v in serving.items() if n not in shared and n not in _INDEX_TENSORS],
                spec.draft_model_config,
                runner,
            )
            raise SwapRefused(f"loading {path} failed ({type(e).__name__}: {e}); the serving draft was reloaded") from e
        self._draftstream_serving = str(path)
        return {
            "path": str(path),
            "previous": str(serving_path),
            "tensors": len(weights),
            "shared_unchanged": sorted(shared),
            "seconds": round(time.perf_counter() - start, 4),
        }

    def draftstream_serving_draft(self) -> str:
        """The checkpoint the draft was last loaded from."""
        return getattr(self, "_draftstream_serving", None) or self.vllm_config.speculative_config.model  # type: ignore[attr-defined]


def _load(draft: torch.nn.Module, weights: list[tuple[str, torch.Tensor]], model_config, runner) -> None:
    """vLLM's in-place reload: each layer goes back to its checkpoint layout, takes the draft's own
    ``load_weights`` (name mapping, vocabulary padding, shards), then is processed into its kernel
    layout again (on CPU, linear weights are repacked) and copied into the tensors the engine uses."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    with torch.no_grad():
        initialize_layerwise_reload(draft)
        try:
            draft.load_weights(iter(weights))
        finally:
            finalize_layerwise_reload(draft, model_config)
        # P-EAGLE's mask_hidden is a plain buffer of the draft's root module, which the loader
        # copies into directly: the reload above parks it on the meta device meanwhile and puts
        # the old tensor back, so it is written here.
        mask = dict(weights).get("mask_hidden")
        if mask is not None:
            draft.mask_hidden.copy_(mask.reshape(draft.mask_hidden.shape))
        _refresh_parallel_drafting(runner)


def _shared_with_target(target: torch.nn.Module, draft: torch.nn.Module) -> set[str]:
    """Checkpoint names of the draft tensors that are the target's own (vLLM shares ``embed_tokens``
    and ``lm_head`` when the draft's copy equals the target's)."""
    target_params = {id(p) for p in target.parameters()}
    shared = set()
    for name, module in (
        ("embed_tokens.weight", getattr(draft.model, "embed_tokens", None)),
        ("lm_head.weight", getattr(draft, "lm_head", None)),
    ):
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in target_params:
            shared.add(name)
    return shared


def _refresh_parallel_drafting(runner) -> None:
    """P-EAGLE: vLLM precomputes the hidden state fed at masked positions from ``mask_hidden`` when
    it loads the draft; recompute it from the new ``mask_hidden``."""
    drafter = getattr(runner, "drafter", None)
    tensor = getattr(drafter, "parallel_drafting_hidden_state_tensor", None)
    if tensor is None or not getattr(drafter, "parallel_drafting", False):
        return
    if not getattr(drafter, "pass_hidden_states_to_model", False):
        return
    mask = drafter.model.mask_hidden.view(-1)
    tensor.copy_(drafter.model.combine_hidden_states(mask) if drafter.eagle3_use_aux_hidden_state else mask)
