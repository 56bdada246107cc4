"""The front door of ``draftstream serve``: an HTTP proxy in front of the vLLM server that passes the
OpenAI API through and taps what it serves.

Users talk to the front door only; vLLM listens on loopback, so its dev-mode endpoints (the
``/collective_rpc`` the draft swap uses) are never public. Only ``ALLOWED`` paths are forwarded.

For a completion or chat completion that the ``TrafficQueue`` admits, the front door asks vLLM for
the token ids (``return_token_ids``: prompt ids and generated ids, also when streaming), reads them
from the answer as it passes, and removes them again unless the client asked for them itself, so a
client sees exactly what plain ``vllm serve`` would have sent. When the answer is complete, each
choice becomes one ``LiveRow`` offer. Requests that are not admitted are forwarded untouched.

Nothing here waits on capture: the tap only reads the answer, and ``offer`` never blocks. An answer
that is not JSON, not complete, or has an error status is passed on as it came and counted ``failed``.
Request bodies are bounded (``max_body_bytes``) before they are read.
"""

from __future__ import annotations

import json
import logging

from producer.live.traffic import TrafficQueue

log = logging.getLogger(__name__)

CAPTURED_PATHS = ("/v1/completions", "/v1/chat/completions")
ALLOWED = ("/v1/", "/health", "/ping", "/version", "/metrics", "/tokenize", "/detokenize")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "host",
}


class TokenTally:
    """The prompt and generated token ids of each choice, gathered from an answer or its stream
    chunks (chat answers carry ``prompt_token_ids`` once at the top, completions per choice)."""

    def __init__(self):
        self.request_id = ""
        self.prompt: dict[int, list[int]] = {}
        self.top_prompt: list[int] | None = None
        self.generated: dict[int, list[int]] = {}
        self.done = False  # a stream's [DONE] went through

    def read(self, answer: dict, *, strip: bool) -> None:
        """Take the ids out of one answer object (a whole answer or one chunk); with ``strip``,
        remove them from it."""
        self.request_id = self.request_id or str(answer.get("id", ""))
        top = answer.pop("prompt_token_ids", None) if strip else answer.get("prompt_token_ids")
        if isinstance(top, list):
            self.top_prompt = top
        for choice in answer.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            prompt = choice.pop("prompt_token_ids", None) if strip else choice.get("prompt_token_ids")
            ids = choice.pop("token_ids", None) if strip else choice.get("token_ids")
            if isinstance(prompt, list):
                self.prompt[index] = prompt
            if isinstance(ids, list):
                self.generated.setdefault(index, []).extend(ids)

    def rows(self) -> list[tuple[str, list[int], list[int]]]:
        """``(request_id#choice, prompt ids, generated ids)`` per choice that has both."""
        out = []
        for index in sorted(self.generated):
            prompt = self.prompt.get(index, self.top_prompt)
            generated = self.generated[index]
            if _ids(prompt) and _ids(generated):
                out.append((f"{self.request_id}#{index}", prompt, generated))
        return out


def _ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and t >= 0 for t in value)


def build_app(upstream: str, queue: TrafficQueue, *, max_body_bytes: int = 16 << 20, timeout_s: float = 3600.0):
    """The aiohttp application of the front door, forwarding to ``upstream`` (vLLM's base URL)."""
    import aiohttp
    from aiohttp import web

    upstream = upstream.rstrip("/")
    session_box: dict[str, aiohttp.ClientSession] = {}

    async def start(app):
        session_box["s"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def stop(app):
        await session_box["s"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path
        if not any(path == p.rstrip("/") or path.startswith(p) for p in ALLOWED):
            return web.json_response({"error": f"{path} is not served here"}, status=404)
        body = await request.read()
        capture = strip = False
        if request.method == "POST" and path in CAPTURED_PATHS:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None  # vLLM answers it with its own error
            if isinstance(payload, dict):
                capture = queue.admit(payload)
                if capture:
                    strip = not payload.get("return_token_ids")
                    payload["return_token_ids"] = True
                body = json.dumps(payload).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with session_box["s"].request(
            request.method, upstream + str(request.rel_url), data=body, headers=headers
        ) as answer:
            out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            streaming = answer.headers.get("Content-Type", "").startswith("text/event-stream")
            if not capture:
                return await _relay(request, answer, out_headers)
            tally = TokenTally()
            if streaming:
                response = web.StreamResponse(status=answer.status, headers=out_headers)
                await response.prepare(request)
                complete = False
                try:
                    await _tap_stream(answer, response, tally, strip=strip)
                    complete = tally.done
                except (ConnectionError, aiohttp.ClientError):
                    queue.failed()  # the client or vLLM went away mid-answer
                    raise
                await response.write_eof()
                _finish(queue, tally, ok=answer.status == 200 and complete)
                return response
            data = await answer.read()
            try:
                parsed = json.loads(data)
                if answer.status == 200 and isinstance(parsed, dict):
                    tally.read(parsed, strip=strip)
                    if strip:
                        data = json.dumps(parsed).encode()
            except ValueError:
                pass
            _finish(queue, tally, ok=answer.status == 200)
            return web.Response(status=answer.status, body=data, headers=out_headers)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def _tap_stream(answer, response, tally: TokenTally, *, strip: bool) -> None:
    """Pass a server-sent-event stream on line by line, reading (and with ``strip`` removing) the
    token ids of each ``data:`` chunk; ``tally.done`` once ``data: [DONE]`` went through."""
    async for line in answer.content:
        text = line.decode("utf-8", "replace").strip()
        if text == "data: [DONE]":
            tally.done = True
        elif text.startswith("data: "):
            try:
                chunk = json.loads(text[6:])
            except ValueError:
                chunk = None
            if isinstance(chunk, dict):
                tally.read(chunk, strip=strip)
                if strip:
                    line = ("data: " + json.dumps(chunk) + "\n").encode()
        await response.write(line)


async def _relay(request, answer, headers):
    from aiohttp import web

    response = web.StreamResponse(status=answer.status, headers=headers)
    await response.prepare(request)
    async for chunk in answer.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


def _finish(queue: TrafficQueue, tally: TokenTally, *, ok: bool) -> None:
    rows = tally.rows()
    if not ok or not rows:
        queue.failed()
        return
    for request_id, prompt, generated in rows:
        queue.offer(request_id, prompt, generated)


class FrontDoor:
    """The front door served from a background thread (its own asyncio loop): ``start`` returns
    once it listens; ``url`` is where clients go."""

    def __init__(self, upstream: str, queue: TrafficQueue, *, host: str = "127.0.0.1", port: int = 0, **app_kwargs):
        self.upstream, self.queue, self.host, self.port = upstream, queue, host, port
        self._app_kwargs = app_kwargs
        self._loop = None
        self._thread = None
        self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FrontDoor:
        import asyncio
        import threading

        from aiohttp import web

        started = threading.Event()
        failure: list[BaseException] = []

        async def serve():
            self._runner = web.AppRunner(build_app(self.upstream, self.queue, **self._app_kwargs), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # the bound port when 0 was asked

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # noqa: BLE001 - handed to start()
                failure.append(e)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()  # here, on its own thread: not later by the garbage collector

        self._thread = threading.Thread(target=run, name="front-door", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        import asyncio

        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop = None
