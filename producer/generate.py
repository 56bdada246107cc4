"""Answers from a target, behind one contract for every engine: ``Generator.generate`` takes prompts
as token ids (``Request``) and hands back each answer's token ids up to its stop token, and whether
``max_new_tokens`` cut it (``Generation``). ``HFGenerator`` is the Hugging Face engine;
``producer.vllm.generate`` holds vLLM's (in-process and server). ``draftstream regenerate``
(``producer.regenerate``) renders the prompts and decodes the answers, the same for every engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch

from protocol.devices import resolve_device


class Request(NamedTuple):
    prompt_ids: list[int]
    seed: int  # per request, for backends that seed each request (vLLM)


class Generation(NamedTuple):
    """One answer: ``token_ids`` before the stop token (or ``text`` where a server gives no ids)."""

    token_ids: list[int] | None
    text: str | None
    truncated: bool
    num_tokens: int  # tokens the engine generated, the stop token included


class GenerateSettings(Protocol):
    """What an engine reads of the run's settings (``producer.regenerate.RegenerateConfig`` has
    them all): the target, sampling, and for vLLM the server or the engine's arguments."""

    model: str
    dtype: str
    seed: int
    max_new_tokens: int
    temperature: float
    top_p: float
    endpoint: str | None
    served_model_name: str | None
    concurrency: int
    request_timeout: float

    def engine_args(self) -> dict: ...


class Generator(Protocol):
    # The engine's context limit where it has its own (vLLM's max_model_len), else None.
    max_model_len: int | None

    def generate(self, requests: list[Request], *, seed: int) -> Iterator[tuple[int, Generation]]:
        """Answers to ``requests`` as ``(index into requests, answer)``, in any order. ``seed``
        seeds this call for backends that seed per call (Hugging Face)."""
        ...

    def close(self) -> None: ...


def finish(token_ids: list[int], stop_ids: set[int], *, truncated: bool) -> Generation:
    """Cut generated ``token_ids`` before the first stop token; an answer that stopped is never truncated."""
    for n, token in enumerate(token_ids):
        if token in stop_ids:
            return Generation(token_ids[:n], None, False, n + 1)
    return Generation(list(token_ids), None, truncated, len(token_ids))


def stop_token_ids(model: str, tokenizer) -> set[int]:
    """The tokens that end an answer: the target's generation_config eos ids and the tokenizer's eos."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        eos = None
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{model} names no end-of-sequence token (generation_config.json / tokenizer eos_token)")
    return ids


class HFGenerator:
    """``model.generate`` over left-padded batches of ``batch_size`` prompts, longest first (similar
    lengths share a batch, and a batch too large for memory fails at once, not at the end)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str,
        device: str,
        batch_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: set[int],
        pad_id: int,
    ):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = resolve_device(device)
        loaded_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=loaded_dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.sampled = temperature > 0
        # Every knob given: generate() fills unset ones from the model's generation_config and global
        # defaults (top_k=50), which would make the HF and vLLM backends answer differently.
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0)
            if self.sampled
            else dict(do_sample=False)
        )
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            **sampling,
        )
        self.max_new_tokens = max_new_tokens
        self.max_model_len = None

    def generate(self, requests: list[Request], *, seed: int) -> Iterator[tuple[int, Generation]]:
        if self.sampled:
            torch.manual_seed(seed)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(requests[i].prompt_ids) for i in batch)
            ids_BS = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask_BS = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                prompt = requests[i].prompt_ids
                ids_BS[row, width - len(prompt) :] = torch.tensor(prompt)
                mask_BS[row, width - len(prompt) :] = 1
            with torch.inference_mode():
                out_BS = self.model.generate(
                    input_ids=ids_BS.to(self.device),
                    attention_mask=mask_BS.to(self.device),
                    generation_config=self.generation_config,
                )
            for i, new in zip(batch, out_BS[:, width:].tolist()):
                yield i, finish(new, self.stop_ids, truncated=len(new) >= self.max_new_tokens)

    def close(self) -> None:
        pass
