"""``produce --backend vllm``: prepared rows run through vLLM; its KV connector sends the samples.

::

    produce process                                    vLLM (in-process engine, or `vllm serve`)
      row + SampleRoute (kv_transfer_params) ----------> prefill, max_tokens=1, prompt = token ids
      check prompt ids + connector's answer <-----------   extract_hidden_states -> hidden-state cache
                                                           DraftstreamConnector (producer.vllm.connector)
      report PULL (Delivered, by ticket) <--------------     -- Sample --> trainer rank data endpoint
                                                             -- or ---> file:///DIR/hs_{i}.safetensors

The engine (``producer.vllm.engines``) is either ``vllm.LLM`` in this process (the default; it gets the speculative and
kv-transfer settings of ``producer.vllm.launch``) or a server started with ``draftstream
launch-vllm`` (``--endpoint http://HOST:PORT``: OpenAI completions with token-id prompts,
``max_tokens=1``, ``kv_transfer_params`` in the body, up to ``--concurrency`` requests at once).
Either way the prompt token ids vLLM reports back must equal the row's, and the connector's answer
must name the layer ids, hidden size and dtype this producer announced to the trainer. ``--dtype
auto`` is the checkpoint's dtype (given to the in-process engine; ``launch-vllm`` starts a server
with it), and against a server the dtype its connector reports for one probe request.

Delivery reports come back on a PULL socket this process binds (``--report-endpoint``, by default
``ipc://`` in a temporary folder: the connector runs on this host). Without them, failures still
heal through lease expiry on the trainer; spill waits for them to know when files are complete.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import tempfile
from typing import Any

import torch
import zmq

from producer.backend import DTYPE_CHOICES, CaptureRow, PushJob, PushResult
from producer.vllm.engines import Answer, Engine, HTTPEngine, InProcessEngine
from producer.vllm.params import PARAMS_KEY, SampleRoute, loss_mask_spans
from protocol.codec import DTYPE_NAMES
from protocol.messages import Delivered, ProtocolError
from protocol.sockets import SocketConfig, is_loopback_endpoint, make_socket, recv_message
from protocol.target import TargetSpec, capture_layer_ids, checkpoint_dtype, read_text_config

logger = logging.getLogger(__name__)

_PROBE_WAIT_MS = 2000  # how long the dtype probe waits for its (discarded) sample


@dataclasses.dataclass(kw_only=True)
class VLLMBackendConfig:
    model: str
    layer_ids: list[int] | None = None  # None: [2, N//2, N-3, N]
    dtype: str = "auto"  # auto: the checkpoint's (set on the in-process engine), or what a server captures
    endpoint: str | None = None  # --endpoint http://HOST:PORT of `draftstream launch-vllm`; None: in-process
    served_model_name: str | None = None  # --served-model-name; None: the server's first model
    concurrency: int = 16  # --concurrency: requests in flight against --endpoint
    request_timeout_seconds: float = 600.0
    report_endpoint: str | None = None  # --report-endpoint: where the connector reports; None: ipc in a temp dir
    engine_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # --vllm-engine-args: more vllm.LLM kwargs
    connector_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # in-process kv_connector_extra_config

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be the server's http://HOST:PORT, got {self.endpoint!r}")
        if self.endpoint is not None and self.engine_args:
            raise ValueError(
                "--vllm-engine-args configure the in-process engine; a server (--endpoint) takes them at launch"
            )


def target_spec(model: str, layer_ids: list[int] | None, dtype: str) -> TargetSpec:
    """What vLLM will capture for ``model``, from its config alone (no weights)."""
    text = read_text_config(model)
    ids = capture_layer_ids(layer_ids, int(text["num_hidden_layers"]))
    if dtype == "auto":
        dtype = DTYPE_NAMES[getattr(torch, checkpoint_dtype(text))]
    return TargetSpec(
        target_model=model,
        layer_ids=ids,
        hidden_size=int(text["hidden_size"]),
        dtype=dtype,
        vocab_size=int(text["vocab_size"]),
    )


class VLLMBackend:
    """A ``PushingBackend`` over vLLM (see the module docstring). Not thread-safe: one thread
    calls ``submit`` and ``poll_reports`` (it owns the report socket)."""

    def __init__(self, config: VLLMBackendConfig, *, engine: Engine | None = None):
        self.config = config
        self.spec = target_spec(config.model, config.layer_ids, config.dtype)
        self._tickets = itertools.count(1)
        self._pending: dict[int, PushJob] = {}  # ticket -> job, until poll_results returns it
        self._live: dict[int, int] = {}  # ticket -> sample id, until reported
        self._early: dict[int, Delivered] = {}  # reports that came before their row's result
        self._tmpdir: str | None = None
        self._ctx = zmq.Context()
        self._report_sock, self.report_endpoint = self._bind_reports(config.report_endpoint)
        try:
            if engine is not None:
                self.engine = engine
            elif config.endpoint is not None:
                self.engine = HTTPEngine(
                    config.endpoint,
                    served_model_name=config.served_model_name,
                    concurrency=config.concurrency,
                    timeout_seconds=config.request_timeout_seconds,
                )
            else:
                self.engine = InProcessEngine(
                    config.model,
                    layer_ids=self.spec.layer_ids,
                    dtype=self.spec.dtype,
                    engine_args=config.engine_args,
                    connector_extra=config.connector_extra,
                )
            if config.endpoint is not None and config.dtype == "auto":
                served = self._served_dtype()
                if served is not None and served != self.spec.dtype:
                    logger.info(
                        "the server captures %s (the checkpoint is %s): announcing %s", served, self.spec.dtype, served
                    )
                    self.spec = dataclasses.replace(self.spec, dtype=served)
        except BaseException:
            self._close_reports()
            raise

    def _bind_reports(self, endpoint: str | None) -> tuple[zmq.Socket, str]:
        if endpoint is None:
            self._tmpdir = tempfile.mkdtemp(prefix="draftstream-report-")
            endpoint = f"ipc://{self._tmpdir}/report.sock"
        # A tcp:// report endpoint the user names is where the connector connects, so binding it
        # on a non-loopback address is the opt-in.
        config = SocketConfig(sndhwm=4, rcvhwm=1000, allow_remote=not is_loopback_endpoint(endpoint))
        return make_socket(self._ctx, zmq.PULL, config, bind=endpoint), endpoint

    def _served_dtype(self) -> str | None:
        """``--dtype auto`` against a server: the dtype its connector captures, or None (then the
        checkpoint's dtype stands; ``launch-vllm`` starts vLLM with it).

        A server tells the dtype only in its connector's answer to a draftstream request (``/v1/models``
        does not), so one probe request goes out: a one-token prompt routed to a PULL socket bound here,
        which takes the sample and discards it. The probe's ticket 0 is never live and it names no
        report endpoint. Layer ids and hidden size are still checked on every answer."""
        probe_sock, destination, probe_dir = self._bind_probe()
        try:
            route = SampleRoute(sample_id=0, destination=destination, num_tokens=1, ticket=0)
            (answer,) = self.engine.run([([0], route.to_params())])
            params = (answer.kv_transfer_params or {}).get(PARAMS_KEY)
            if answer.error or not isinstance(params, dict) or params.get("error"):
                reason = answer.error or (params or {}).get("error") or f"no {PARAMS_KEY!r} kv_transfer_params"
                logger.warning("could not learn the server's dtype (%s); announcing the checkpoint's", reason)
                return None
            if probe_sock.poll(_PROBE_WAIT_MS):  # tidy: take the sample the connector sends
                probe_sock.recv_multipart()
            served = params.get("dtype")
            return served if served in DTYPE_CHOICES and served != "auto" else None
        finally:
            probe_sock.close(linger=0)
            if probe_dir is not None:
                shutil.rmtree(probe_dir, ignore_errors=True)

    def _bind_probe(self) -> tuple[zmq.Socket, str, str | None]:
        """A PULL socket for the probe's sample where the connector can reach the reports: ipc in a
        temp dir, or the report endpoint's tcp host on a free port. Returns (socket, endpoint, dir)."""
        config = SocketConfig(sndhwm=4, rcvhwm=4, allow_remote=not is_loopback_endpoint(self.report_endpoint))
        if self.report_endpoint.startswith("tcp://"):
            host = self.report_endpoint[len("tcp://") :].rsplit(":", 1)[0]
            sock = make_socket(self._ctx, zmq.PULL, config, bind=f"tcp://{host}:*")
            return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), None
        probe_dir = tempfile.mkdtemp(prefix="draftstream-probe-")
        endpoint = f"ipc://{probe_dir}/probe.sock"
        return make_socket(self._ctx, zmq.PULL, config, bind=endpoint), endpoint, probe_dir

    def describe(self) -> TargetSpec:
        return self.spec

    def capture(self, rows, *, epoch: int = 0, lease_id: int = 0):
        raise TypeError("the vLLM backend does not hand samples to the producer: its connector sends them (use submit)")

    @property
    def min_in_flight_rows(self) -> int:
        """Against a server, ``--concurrency`` requests run at once: keep at least that many in flight."""
        return self.config.concurrency if self.config.endpoint is not None else 0

    def submit(self, jobs: list[PushJob]) -> list[int]:
        """Hand the rows to the engine and return their tickets at once (see ``PushingBackend``)."""
        tickets = []
        for job in jobs:
            ids = job.row.input_ids.tolist()
            route = SampleRoute(
                sample_id=int(job.row.sample_id),
                epoch=job.epoch,
                lease_id=job.lease_id,
                token=job.token,
                destination=job.destination,
                num_tokens=len(ids),
                loss_mask_spans=loss_mask_spans(job.row.loss_mask),
                report=self.report_endpoint,
                ticket=next(self._tickets),
            )
            # Live from now on: the connector may report before the engine's answer is read here.
            self._pending[route.ticket] = job
            self._live[route.ticket] = route.sample_id
            self.engine.start(route.ticket, ids, route.to_params())
            tickets.append(route.ticket)
        return tickets

    @property
    def num_in_flight(self) -> int:
        """Rows submitted whose result ``poll_results`` has not returned yet."""
        return len(self._pending)

    def poll_results(self, timeout_seconds: float = 0.0) -> list[PushResult]:
        """Results of the rows the engine has finished since the last call (waiting up to
        ``timeout_seconds`` for the first), in the order they finished."""
        results = []
        for ticket, answer in self.engine.finished(timeout_seconds if self._pending else 0.0):
            job = self._pending.pop(ticket, None)
            if job is None:
                continue
            error = answer.error or self._check(job.row, answer)
            params = (answer.kv_transfer_params or {}).get(PARAMS_KEY)
            if not isinstance(params, dict) or params.get("error"):
                # The connector is not sending it: no report is due. (When only our check refuses the
                # answer, the connector is sending it and its report is still due.)
                self._live.pop(ticket, None)
                self._early.pop(ticket, None)
            results.append(PushResult(job=job, ticket=ticket, error=error))
        return results

    def _check(self, row: CaptureRow, answer: Answer) -> str:
        """Why vLLM's answer does not fit the row or the announced capture ("" if it does)."""
        if answer.prompt_token_ids != row.input_ids.tolist():
            got = answer.prompt_token_ids
            return (
                f"row {row.sample_id}: vLLM ran other prompt token ids than the row's "
                f"({'none reported' if got is None else f'{len(got)} ids'} vs {len(row.input_ids)})"
            )
        params = (answer.kv_transfer_params or {}).get(PARAMS_KEY)
        if not isinstance(params, dict):
            return (
                f"row {row.sample_id}: vLLM returned no {PARAMS_KEY!r} kv_transfer_params: is the server running "
                "DraftstreamConnector (draftstream launch-vllm)?"
            )
        if params.get("error"):
            return f"row {row.sample_id}: connector refused: {params['error']}"
        announced = {"layer_ids": self.spec.layer_ids, "hidden_size": self.spec.hidden_size, "dtype": self.spec.dtype}
        for key, ours in announced.items():
            if params.get(key) != ours:
                return f"vLLM captures {key} {params.get(key)!r}, this producer announced {ours!r} (--target-layer-ids / --dtype must match launch-vllm's)"
        return ""

    def poll_reports(self, timeout_seconds: float = 0.0) -> list[Delivered]:
        """Reports on this backend's live tickets that arrived (waiting up to ``timeout_seconds``
        for the first); ``sample_id`` is the one this backend submitted under the ticket."""
        # A report on a row whose result is not out yet waits for it: results come first.
        reports = [self._early.pop(t) for t in list(self._early) if t not in self._pending]
        if not reports and timeout_seconds > 0 and not self._report_sock.poll(int(timeout_seconds * 1000)):
            return reports
        while True:
            try:
                _, message = recv_message(self._report_sock, flags=zmq.NOBLOCK, max_message_bytes=1 << 20)
            except zmq.Again:
                return reports
            except ProtocolError as e:
                logger.warning("malformed delivery report: %s", e)
                continue
            if not isinstance(message, Delivered):
                continue
            sample_id = self._live.pop(message.ticket, None)
            if sample_id is not None:
                report = Delivered(ticket=message.ticket, sample_id=sample_id, ok=message.ok, reason=message.reason)
                if message.ticket in self._pending:
                    self._early[message.ticket] = report
                else:
                    reports.append(report)

    @property
    def num_unreported(self) -> int:
        return len(self._live) + len(self._early)

    def forget_unreported(self) -> list[int]:
        """Give up on the reports still due; returns their sample ids."""
        ids = list(self._live.values()) + [report.sample_id for report in self._early.values()]
        self._live.clear()
        self._early.clear()
        return ids

    def _close_reports(self) -> None:
        self._report_sock.close(linger=0)
        self._ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def close(self) -> None:
        if self._ctx.closed:
            return
        try:
            self.engine.close()
        finally:
            self._close_reports()
