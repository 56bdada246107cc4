"""The two ways the vLLM producer runs requests, behind one asynchronous ``Engine`` contract:
``InProcessEngine`` (``vllm.LLM`` in this process, on a thread of its own) and ``HTTPEngine`` (a
server started with ``draftstream launch-vllm``: OpenAI completions with token-id prompts). Both
start requests at once and hand finished ones back through a queue, so the producer keeps several
batches in the engine (``producer.vllm.backend``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from typing import Any, Protocol

from producer.vllm.launch import kv_transfer_config, speculative_config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Answer:
    """What an engine says about one request: the prompt ids it ran and the connector's params."""

    prompt_token_ids: list[int] | None
    kv_transfer_params: dict[str, Any] | None
    error: str = ""


class Engine(Protocol):
    """Runs requests asynchronously: ``start`` returns at once, ``finished`` hands back the answers
    of requests done since its last call (any order, by the key given to ``start``); it raises once
    the engine itself has failed. One thread calls ``start`` and ``finished``."""

    def start(self, key: int, ids: list[int], kv_transfer_params: dict[str, Any]) -> None: ...

    def finished(self, timeout_seconds: float = 0.0) -> list[tuple[int, Answer]]: ...

    def close(self) -> None: ...


class _Answers:
    """The finished side shared by both engines: a queue of (key, answer), and the engine's failure."""

    def __init__(self) -> None:
        self._done: queue.Queue[tuple[int, Answer]] = queue.Queue()
        self._failure: BaseException | None = None

    def finished(self, timeout_seconds: float = 0.0) -> list[tuple[int, Answer]]:
        out = []
        try:
            out.append(self._done.get(timeout=timeout_seconds) if timeout_seconds > 0 else self._done.get_nowait())
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        if self._failure is not None:
            raise RuntimeError(f"the vLLM engine failed: {self._failure}") from self._failure
        return out

    def run(self, requests: list[tuple[list[int], dict[str, Any]]]) -> list[Answer]:
        """Blocking: start ``requests`` and wait for all their answers (keys -1, -2, ...: not a ticket)."""
        for i, (ids, kv) in enumerate(requests):
            self.start(-1 - i, ids, kv)  # type: ignore[attr-defined]
        answers: dict[int, Answer] = {}
        while len(answers) < len(requests):
            answers.update(self.finished(timeout_seconds=1.0))
        return [answers[-1 - i] for i in range(len(requests))]


class InProcessEngine(_Answers):
    """``vllm.LLM`` with hidden-state capture and our connector, in this process, driven by a thread
    of its own: ``start`` queues a request and returns; the thread adds queued requests to the
    engine (``LLM.enqueue``) between its steps and hands finished ones back, so the engine always
    has the next rows while it runs the current ones."""

    def __init__(
        self,
        model: str,
        *,
        layer_ids: list[int],
        dtype: str,
        engine_args: dict[str, Any],
        connector_extra: dict[str, Any],
    ):
        from vllm import LLM

        super().__init__()
        self.llm = LLM(
            **self.llm_kwargs(
                model, layer_ids=layer_ids, dtype=dtype, engine_args=engine_args, connector_extra=connector_extra
            )
        )
        self._inbox: queue.Queue[tuple[int, list[int], dict[str, Any]]] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def llm_kwargs(
        model: str, *, layer_ids: list[int], dtype: str, engine_args: dict[str, Any], connector_extra: dict[str, Any]
    ) -> dict[str, Any]:
        """``vllm.LLM`` arguments: capture ``layer_ids`` with our connector, plus the user's extras."""
        for owned in ("speculative_config", "kv_transfer_config", "model", "dtype"):
            if owned in engine_args:
                raise ValueError(f"--vllm-engine-args may not set {owned}: produce sets it")
        return dict(
            model=model,
            dtype=dtype,
            speculative_config=speculative_config(layer_ids),
            kv_transfer_config=kv_transfer_config(connector_extra),
            **engine_args,
        )

    @staticmethod
    def sampling_params(kv_transfer_params: dict[str, Any]):
        """One prefill, one sampled token; the route rides in ``extra_args`` as vLLM expects."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": kv_transfer_params})

    def start(self, key: int, ids: list[int], kv_transfer_params: dict[str, Any]) -> None:
        if self._failure is not None or self._closing.is_set():
            raise RuntimeError(f"the vLLM engine is not running ({self._failure or 'closed'})")
        self._inbox.put((key, ids, kv_transfer_params))

    def _add(self, running: dict[str, int], key: int, ids: list[int], kv: dict[str, Any]) -> None:
        from vllm.inputs import TokensPrompt

        try:
            (request_id,) = self.llm.enqueue(
                TokensPrompt(prompt_token_ids=ids), self.sampling_params(kv), use_tqdm=False
            )
        except (ValueError, TypeError) as e:  # this request (too long for max_model_len, ...), not the engine
            self._done.put((key, Answer(None, None, f"vLLM refused the request: {e}")))
            return
        # Outputs carry the id LLM gave (its counter); enqueue returns vLLM's, that id + "-" + a random suffix.
        running[request_id.rsplit("-", 1)[0]] = key

    def _loop(self) -> None:
        engine = self.llm.llm_engine
        running: dict[str, int] = {}  # LLM's request id -> key
        try:
            while not self._closing.is_set():
                try:  # idle: wait for work; running: take what is queued and step at once
                    item = self._inbox.get(timeout=0.1) if not running else self._inbox.get_nowait()
                    self._add(running, *item)
                    while True:
                        self._add(running, *self._inbox.get_nowait())
                except queue.Empty:
                    pass
                if not running:
                    continue
                if not engine.has_unfinished_requests():
                    for key in running.values():
                        self._done.put((key, Answer(None, None, "vLLM dropped the request")))
                    running.clear()
                    continue
                for out in engine.step():
                    key = running.pop(out.request_id, None) if out.finished else None
                    if key is not None:
                        self._done.put((key, Answer(list(out.prompt_token_ids or []), out.kv_transfer_params)))
        except BaseException as e:  # the engine died: answer what was running, refuse what comes
            logger.exception("the vLLM engine failed")
            self._failure = e
            for key in running.values():
                self._done.put((key, Answer(None, None, f"the vLLM engine failed: {e}")))

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=60)
        shutdown_llm(self.llm)


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core processes now (``LLMEngine`` has no ``shutdown`` of its own;
    left to exit, a process holding two engines waits on their cores forever)."""
    engine = getattr(llm, "llm_engine", None)
    for owner in (engine, getattr(engine, "engine_core", None)):
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            return


class HTTPEngine(_Answers):
    """A running ``vllm serve`` (``draftstream launch-vllm``), through its OpenAI completions API:
    each request is one call on a pool of ``concurrency`` threads."""

    def __init__(self, endpoint: str, *, served_model_name: str | None, concurrency: int, timeout_seconds: float):
        super().__init__()
        self.base = endpoint.rstrip("/")
        self.timeout = timeout_seconds
        self.model = served_model_name or self._first_model()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm-http")

    def _first_model(self) -> str:
        models = self._call("GET", "/v1/models").get("data") or []
        if not models:
            raise ValueError(f"{self.base}/v1/models lists no model; pass --served-model-name")
        return str(models[0]["id"])

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {self.base}{path}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise ConnectionError(
                f"{method} {self.base}{path}: {e.reason}; is the server up (draftstream launch-vllm)?"
            ) from None

    @staticmethod
    def completion_body(model: str, ids: list[int], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
        """A completions request vLLM runs as exactly these token ids, one token out, and answers
        with the prompt ids it ran (``return_token_ids``) and the connector's kv_transfer_params."""
        return {
            "model": model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_token_ids": True,
            "kv_transfer_params": kv_transfer_params,
        }

    def _one(self, ids: list[int], kv: dict[str, Any]) -> Answer:
        body = self.completion_body(self.model, ids, kv)
        try:
            reply = self._call("POST", "/v1/completions", body)
        except RuntimeError as e:  # the server answered: this request failed, the others may not
            return Answer(None, None, str(e))
        choices = reply.get("choices") or [{}]
        return Answer(choices[0].get("prompt_token_ids"), reply.get("kv_transfer_params"))

    def start(self, key: int, ids: list[int], kv_transfer_params: dict[str, Any]) -> None:
        self._pool.submit(self._answer, key, ids, kv_transfer_params)

    def _answer(self, key: int, ids: list[int], kv: dict[str, Any]) -> None:
        try:
            answer = self._one(ids, kv)
        except Exception as e:  # the server is gone (ConnectionError) or answered nonsense
            self._failure = e
            answer = Answer(None, None, f"{type(e).__name__}: {e}")
        self._done.put((key, answer))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
