"""A stand-in for `draftstream launch-vllm`'s server, for tests without vLLM: the OpenAI completions
routes ``produce --backend vllm --endpoint`` uses, with our real connector machinery behind them
(``SampleRoute`` parsing, ``HSSender`` pushing to trainer ranks or spilling, delivery reports).

Its "hidden states" are a deterministic function of the prompt (``fake_hidden``), so tests can check
what arrived. Behaviour switches: ``alter_prompt`` (vLLM ran other ids), ``no_connector`` (a server
without our kv-transfer config), ``fail_once`` (sample ids whose first delivery the connector reports
failed without sending), ``layer_ids`` and ``dtype`` (what the server captures), ``delay_seconds``
(each completion takes this long; ``max_concurrent`` counts the most answered at once).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from producer.vllm.params import PARAMS_KEY, SampleRoute
from producer.vllm.sender import HostCopy, HSSender, SenderConfig, SendJob


def fake_hidden(prompt: list[int], num_layers: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    ids = torch.as_tensor(prompt).to(torch.float32)
    layer = torch.arange(num_layers, dtype=torch.float32)
    col = torch.arange(hidden, dtype=torch.float32)
    return (ids[:, None, None] * 0.01 + layer[None, :, None] + col[None, None, :] * 0.001).to(dtype)


class FakeVLLMServer:
    def __init__(self, *, layer_ids: list[int], hidden_size: int, dtype: str, spill_dirs=(), model_name: str = "tiny"):
        self.layer_ids, self.hidden_size, self.dtype = list(layer_ids), hidden_size, dtype
        self.model_name = model_name
        self.alter_prompt = False
        self.no_connector = False
        self.fail_once: set[int] = set()
        self.requests: collections.Counter = collections.Counter()  # sample id -> completions seen
        self.probes = 0  # dtype probes seen (route ticket 0)
        self.delay_seconds = 0.0
        self.max_concurrent = 0
        self._running = 0
        self.sender = HSSender(SenderConfig(spill_dirs=[str(d) for d in spill_dirs], fsync=False), name="FakeVLLMSend")
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="FakeVLLM", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.sender.close(timeout=10)

    def complete(self, body: dict) -> dict:
        with self._lock:
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
        try:
            time.sleep(self.delay_seconds)
            return self._complete(body)
        finally:
            with self._lock:
                self._running -= 1

    def _complete(self, body: dict) -> dict:
        prompt = list(body["prompt"])
        assert body["max_tokens"] == 1 and body["return_token_ids"] is True and body["model"] == self.model_name
        route = SampleRoute.from_params(body.get("kv_transfer_params"))
        ran = prompt[:-1] + [prompt[-1] + 1] if self.alter_prompt else prompt
        reply = {"choices": [{"text": "x", "prompt_token_ids": ran, "token_ids": [1]}]}
        if route is None or self.no_connector:
            return reply
        with self._lock:
            if route.ticket == 0:  # the producer's dtype probe (producer.vllm.backend): never a row's
                self.probes += 1
            else:
                self.requests[route.sample_id] += 1
            fail = route.sample_id in self.fail_once
            self.fail_once.discard(route.sample_id)
        if fail:
            self.sender.fail(route, "injected delivery failure")
        else:
            hidden_TLH = fake_hidden(ran, len(self.layer_ids), self.hidden_size, getattr(torch, self.dtype))
            self.sender.submit(SendJob(route=route, token_ids=torch.tensor(ran), copy=HostCopy(hidden_TLH)))
        capture = {"layer_ids": self.layer_ids, "hidden_size": self.hidden_size, "dtype": self.dtype}
        reply["kv_transfer_params"] = {PARAMS_KEY: {"sample_id": route.sample_id, "num_tokens": len(ran), **capture}}
        return reply

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload: dict, code: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send({"data": [{"id": server.model_name}]})
                else:
                    self._send({"error": "no such route"}, 404)

            def do_POST(self):
                if self.path != "/v1/completions":
                    self._send({"error": "no such route"}, 404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(server.complete(body))

        return Handler
