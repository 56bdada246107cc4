"""vLLM's layer-id semantics on a Hugging Face decoder, shared by the producer's capture backend
and the trainer's evaluation: part of the compatibility contract, like the hidden-state file.

Id ``k`` is the residual stream entering decoder layer ``k`` (id 0 = the embeddings' output), id
``N`` is the last decoder layer's output *before* the final norm. Forward pre-hooks on the layers
(and a forward hook on the last one for id N) record them during an ordinary forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualCapture:
    """Hooks on ``layers`` that record the residual streams of ``layer_ids`` on every forward."""

    def __init__(self, layers: Sequence[nn.Module], layer_ids: Sequence[int]):
        self.num_layers = len(layers)
        bad = [k for k in layer_ids if not 0 <= k <= self.num_layers]
        if bad:
            raise ValueError(
                f"--target-layer-ids {bad} out of range: the target has {self.num_layers} decoder layers, "
                f"so ids go from 0 (embeddings) to {self.num_layers} (last layer output, before the final norm)"
            )
        self.layer_ids = list(layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = []
        for k in sorted(set(self.layer_ids)):
            if k < self.num_layers:
                self._hooks.append(layers[k].register_forward_pre_hook(self._pre_hook(k), with_kwargs=True))
            else:
                self._hooks.append(layers[-1].register_forward_hook(self._post_hook(k)))

    def _pre_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            self._captured[layer_id] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post_hook(self, layer_id: int):
        def hook(module, args, output):
            # Older transformers return (hidden_states, ...) from decoder layers.
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> list[torch.Tensor]:
        """The states of the last forward, in ``layer_ids`` order (each ``[B, S, H]``)."""
        states = [self._captured[k] for k in self.layer_ids]
        self._captured.clear()
        return states

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured.clear()
