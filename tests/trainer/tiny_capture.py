"""Hidden states captured from a tiny target inside tests, with vLLM's layer-id semantics.

Id k < N is the residual stream entering decoder layer k (0 = embeddings); id N is the last
layer's output before the final norm. Captured with hooks on the Hugging Face model, so tests of
the drafts need neither the producer nor a file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from producer.tiny_target import conversations
from protocol.target import default_layer_ids
from trainer.data.batch import TrainSample


@torch.no_grad()
def capture_samples(model_dir: str | Path, num: int, *, max_len: int = 64, seed: int = 0) -> list[TrainSample]:
    """``num`` fixture conversations through the target: token ids, assistant loss mask and
    hidden states ``[T, 4, H]`` at the default capture ids, in the target's dtype."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    decoder = model.model
    num_layers = model.config.num_hidden_layers
    layer_ids = default_layer_ids(num_layers)
    captured: dict[int, torch.Tensor] = {}

    def grab(layer_id):
        def hook(module, args, kwargs):
            captured[layer_id] = args[0] if args else kwargs["hidden_states"]

        return hook

    modules = [decoder.layers[k] for k in layer_ids[:-1]] + [decoder.norm]
    handles = [m.register_forward_pre_hook(grab(k), with_kwargs=True) for m, k in zip(modules, layer_ids)]
    samples = []
    try:
        for i, turns in enumerate(conversations(num, seed)):
            encoded = tokenizer.apply_chat_template(
                turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = torch.tensor(encoded["input_ids"][:max_len])
            mask = torch.tensor(encoded["assistant_masks"][:max_len], dtype=torch.bool)
            captured.clear()
            model(input_ids=ids[None])
            states = torch.stack([captured[k][0] for k in layer_ids], dim=1)
            samples.append(TrainSample(sample_id=i, token_ids=ids, loss_mask=mask, hidden_states=states))
    finally:
        for h in handles:
            h.remove()
    return samples
