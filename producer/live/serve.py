"""``draftstream serve``: vLLM serving with a draft, capturing the traffic it serves, and swapping in
better drafts while it runs.

    draftstream serve DRAFT_CHECKPOINT --port 8000 --capture-dir traffic/ --drafts-dir drafts/ \\
        -- --max-model-len 8192

starts, on one host::

    clients --HTTP--> front door (--host:--port)  --loopback-->  vllm serve DRAFT_CHECKPOINT
                         | rows: prompt + generated             (--worker-extension-cls DraftSwap,
                         v                                        dev mode on 127.0.0.1 only)
                      TrafficQueue --> row writer: <capture-dir>/rows/traffic-NNNNN.jsonl ^
                                         every --holdout-every-th row: held-out slice   |
                      draft watcher: a new checkpoint in --drafts-dir is scored on the  |
                      held-out slice against the serving draft; the better one serves --+ (in place)

- Arguments after ``--`` go to ``vllm serve`` unchanged; ``--host``/``--port`` are the front door's,
  vLLM gets a free loopback port. The speculative config is the checkpoint's (a speculators
  checkpoint given as the model names its verifier), as with plain ``vllm serve``.
- Captured rows are ``{"input_ids", "loss_mask", "request_id"}`` JSON lines, the pre-tokenized form
  ``draftstream prepare`` passes through, so ``prepare --data <capture-dir>/rows`` then ``train``
  gives a draft for this traffic. Capture controls: ``producer.live.traffic``.
- Swaps are guarded: a candidate (a folder with ``config.json`` + ``model.safetensors`` that appears in
  ``--drafts-dir``; write it elsewhere and rename it in) is scored with ``draftstream eval`` (greedy
  speculative decoding against the target, vLLM's counting) on the held-out slice of recent traffic,
  as is the serving draft on the same slice, and swapped in only if its acceptance length is higher
  by ``--min-gain``. Every decision goes to ``<capture-dir>/swaps.jsonl`` with both scores and the
  previous draft (kept on disk: swapping back is another swap).
- SIGINT/SIGTERM: stop taking requests, write out the queued rows, stop vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from producer.live.engine import ServingEngine
from producer.live.traffic import CaptureControls, LiveRow, TrafficQueue
from protocol.cli import DefaultsHelpFormatter, config_defaults
from protocol.logs import setup_logging
from protocol.signals import StopSignals
from protocol.trafficlog import create_log_id

log = logging.getLogger(__name__)

SWAP_EXTENSION = "producer.live.swap.DraftSwap"
_NOT_CANDIDATES = ("latest",)
_OWNED_FLAGS = ("--host", "--port", "--worker-extension-cls")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_command(model: str, serve_args: list[str], *, port: int, vllm: str | None = None) -> list[str]:
    """``vllm serve MODEL`` on loopback ``port`` with the draft-swap extension, plus the user's args."""
    from producer.vllm.launch import vllm_executable

    for flag in _OWNED_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in serve_args):
            raise ValueError(f"{flag} is set by draftstream serve (the front door's --host/--port are its own flags)")
    return [
        *vllm_executable(vllm),
        "serve",
        model,
        *serve_args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-extension-cls",
        SWAP_EXTENSION,
    ]


class RowWriter:
    """Takes rows off the queue: every ``holdout_every``-th goes to the held-out slice (the last
    ``holdout_rows`` of them, rewritten to ``heldout.jsonl``), the others are appended to
    ``rows/traffic-NNNNN.jsonl`` (a new file every ``rows_per_file``; ``prepare --data DIR/rows``
    reads them, and never the held-out slice). Without a directory, rows are only counted (the
    held-out slice is still kept, in memory)."""

    def __init__(
        self,
        queue: TrafficQueue,
        directory: Path | None,
        *,
        holdout_every: int,
        holdout_rows: int,
        rows_per_file: int = 10000,
    ):
        self.queue, self.directory = queue, directory
        self.holdout_every, self.holdout_rows, self.rows_per_file = holdout_every, holdout_rows, rows_per_file
        self.heldout: list[LiveRow] = []
        self.heldout_version = 0
        self.written = 0
        self._seen = 0
        self._file = None
        self._lock = threading.Lock()
        if directory is not None:
            (directory / "rows").mkdir(parents=True, exist_ok=True)
            create_log_id(directory)  # marks the folder as a traffic log (protocol.trafficlog)
            self._next_file = len(list((directory / "rows").glob("traffic-*.jsonl")))

    def drain(self, timeout: float = 0.5) -> int:
        rows = self.queue.take(256, timeout=timeout)
        for row in rows:
            self._seen += 1
            if self.holdout_every and self._seen % self.holdout_every == 0:
                with self._lock:
                    self.heldout = (self.heldout + [row])[-self.holdout_rows :]
                    self.heldout_version += 1
                self._write_heldout()
            else:
                self._write(row)
        if rows and self._file is not None:
            self._file.flush()
        return len(rows)

    def _write(self, row: LiveRow) -> None:
        self.written += 1
        if self.directory is None:
            return
        if self._file is None or self._rows_in_file >= self.rows_per_file:
            if self._file is not None:
                self._file.close()
            self._file = (self.directory / "rows" / f"traffic-{self._next_file:05d}.jsonl").open("a")
            self._next_file += 1
            self._rows_in_file = 0
        self._file.write(json.dumps(_row_json(row)) + "\n")
        self._rows_in_file += 1

    def _write_heldout(self) -> None:
        if self.directory is None:
            return
        tmp = self.directory / "heldout.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_row_json(r)) + "\n" for r in self.heldout))
        os.replace(tmp, self.directory / "heldout.jsonl")

    def heldout_snapshot(self) -> tuple[int, list[LiveRow]]:
        with self._lock:
            return self.heldout_version, list(self.heldout)

    def close(self) -> None:
        while self.drain(timeout=0.0):
            pass
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_json(row: LiveRow) -> dict:
    return {"input_ids": list(row.token_ids), "loss_mask": row.loss_mask, "request_id": row.request_id}


@dataclasses.dataclass(kw_only=True)
class GuardConfig:
    min_gain: float = 0.0  # a candidate must beat the serving draft's acceptance length by more than this
    min_heldout: int = 8  # held-out rows needed before any candidate is scored
    max_new_tokens: int = 64  # tokens generated per held-out prompt when scoring
    poll_seconds: float = 5.0


def score_draft(checkpoint: str, rows: list[LiveRow], *, max_new_tokens: int, work: Path) -> float:
    """Acceptance length of ``checkpoint`` on ``rows``' prompts by ``draftstream eval`` (Hugging Face
    target, greedy, KV-cached; vLLM's counting), run as its own process (the trainer's evaluation
    stays out of the producer's imports, and its memory goes when it ends): the prompts are each
    row's tokens up to its first generated one, i.e. exactly what was served."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "heldout-scored.jsonl"
    data.write_text("".join(json.dumps(_row_json(r)) + "\n" for r in rows))
    command = [
        sys.executable,
        "-m",
        "protocol.cli",
        "eval",
        "--checkpoint",
        checkpoint,
        "--data",
        str(data),
        "--num-prompts",
        str(len(rows)),
        "--max-new-tokens",
        str(max_new_tokens),
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"draftstream eval exited with {done.returncode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["rows"][-1]["acceptance_length"])


def candidates(directory: Path, seen: set[str]) -> list[Path]:
    """Complete checkpoint folders under ``directory`` not seen yet, oldest first. Skipped: names
    starting with a dot (being written), links, and a training's mid-epoch ``latest`` (rewritten in
    place), so ``--drafts-dir`` can be a live training's ``--save-path``: each chunk's folder is a
    candidate."""
    found = (
        [
            p
            for p in directory.iterdir()
            if p.is_dir()
            and not p.is_symlink()
            and not p.name.startswith(".")
            and p.name not in _NOT_CANDIDATES
            and str(p.resolve()) not in seen
            and (p / "config.json").is_file()
            and (p / "model.safetensors").is_file()
        ]
        if directory.is_dir()
        else []
    )
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


class DraftWatcher:
    """Scores each new checkpoint in ``drafts_dir`` against the serving draft on the held-out slice
    and swaps it in when it is better; logs every decision to ``log_path``."""

    def __init__(
        self,
        engine: ServingEngine,
        writer: RowWriter,
        drafts_dir: Path,
        log_path: Path | None,
        guard: GuardConfig,
        work: Path,
    ):
        self.engine, self.writer, self.drafts_dir, self.log_path = engine, writer, drafts_dir, log_path
        self.guard, self.work = guard, work
        self.seen: set[str] = set()
        self._scores: dict[tuple[str, int], float] = {}  # (checkpoint, held-out version) -> score
        self.decisions: list[dict] = []

    def _score(self, checkpoint: str, version: int, rows: list[LiveRow]) -> float:
        key = (checkpoint, version)
        if key not in self._scores:
            self._scores[key] = score_draft(checkpoint, rows, max_new_tokens=self.guard.max_new_tokens, work=self.work)
        return self._scores[key]

    def poll(self) -> dict | None:
        """Consider the oldest new candidate, if any and if enough traffic was held out."""
        version, rows = self.writer.heldout_snapshot()
        if len(rows) < self.guard.min_heldout:
            return None
        pending = candidates(self.drafts_dir, self.seen)
        if not pending:
            return None
        candidate = str(pending[0].resolve())
        self.seen.add(candidate)
        serving = self.engine.serving()
        decision = {"time": time.time(), "candidate": candidate, "serving": serving, "heldout_rows": len(rows)}
        try:
            decision["candidate_score"] = self._score(candidate, version, rows)
            decision["serving_score"] = self._score(serving, version, rows)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be scored is refused, serving goes on
            decision.update(swapped=False, reason=f"scoring failed: {type(e).__name__}: {e}")
            return self._record(decision)
        if decision["candidate_score"] <= decision["serving_score"] + self.guard.min_gain:
            decision.update(swapped=False, reason="not better on the held-out traffic")
            return self._record(decision)
        result = self.engine.swap(candidate)
        decision.update(swapped=bool(result.get("ok")), swap=result)
        if not result.get("ok"):
            decision["reason"] = result.get("reason", "refused")
        return self._record(decision)

    def _record(self, decision: dict) -> dict:
        self.decisions.append(decision)
        log.info(
            "draft %s: %s (candidate %.3f vs serving %.3f on %d held-out rows)%s",
            decision["candidate"],
            "swapped in" if decision.get("swapped") else "kept out",
            decision.get("candidate_score", float("nan")),
            decision.get("serving_score", float("nan")),
            decision["heldout_rows"],
            "" if decision.get("swapped") else f": {decision.get('reason')}",
        )
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(decision) + "\n")
        return decision


def build_parser() -> argparse.ArgumentParser:
    controls = config_defaults(CaptureControls)
    guard = config_defaults(GuardConfig)
    p = argparse.ArgumentParser(
        prog="draftstream serve",
        description="vLLM serving with a draft that keeps learning: capture served traffic, swap in better drafts.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Arguments after `--` go to `vllm serve` unchanged, e.g. -- --max-model-len 8192 --dtype bfloat16",
    )
    p.add_argument("model", help="the draft checkpoint to serve first (speculators format), or what vllm serve takes")
    p.add_argument("--host", default="127.0.0.1", help="the front door's address (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="the front door's port")
    p.add_argument(
        "--capture-rate", type=float, default=controls["rate"], help="fraction of requests captured (0: off)"
    )
    p.add_argument("--capture-max-tokens", type=int, default=controls["max_tokens"], help="longest row kept (cut)")
    p.add_argument("--capture-max-rows", type=int, default=controls["max_rows"], help="rows waiting at most")
    p.add_argument(
        "--capture-max-queued-tokens", type=int, default=controls["max_queued_tokens"], help="tokens waiting at most"
    )
    p.add_argument("--capture-dir", default=None, help="write captured rows (JSON lines) and swaps.jsonl here")
    p.add_argument("--holdout-every", type=int, default=10, help="every N-th captured row is held out for scoring")
    p.add_argument("--holdout-rows", type=int, default=64, help="held-out rows kept (the most recent)")
    p.add_argument("--drafts-dir", default=None, help="watch this folder for new draft checkpoints")
    p.add_argument("--min-gain", type=float, default=guard["min_gain"], help="acceptance length a candidate must add")
    p.add_argument("--min-heldout", type=int, default=guard["min_heldout"], help="held-out rows before scoring")
    p.add_argument("--score-max-new-tokens", type=int, default=guard["max_new_tokens"], help="tokens per scored prompt")
    p.add_argument("--poll-seconds", type=float, default=guard["poll_seconds"], help="how often --drafts-dir is read")
    p.add_argument("--vllm-port", type=int, default=0, help="vLLM's loopback port (0: a free one)")
    p.add_argument("--vllm", default=None, help="the vllm executable (default: this interpreter's vLLM)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds vLLM may take to start")
    p.add_argument("--seed", type=int, default=0, help="capture sampling seed")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, serve_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    setup_logging("serve")
    try:
        controls = CaptureControls(
            rate=args.capture_rate,
            max_tokens=args.capture_max_tokens,
            max_rows=args.capture_max_rows,
            max_queued_tokens=args.capture_max_queued_tokens,
            seed=args.seed,
        )
        port = args.vllm_port or free_port()
        command = vllm_command(args.model, serve_args, port=port, vllm=args.vllm)
    except ValueError as e:
        parser.exit(2, f"draftstream serve: error: {e}\n")
    capture_dir = Path(args.capture_dir) if args.capture_dir else None
    queue = TrafficQueue(controls)
    writer = RowWriter(queue, capture_dir, holdout_every=args.holdout_every, holdout_rows=args.holdout_rows)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    log.info("starting vLLM on 127.0.0.1:%d: %s", port, " ".join(command))
    vllm = subprocess.Popen(command, env=env, start_new_session=True)
    engine = ServingEngine(f"http://127.0.0.1:{port}")
    door = None
    with StopSignals("stopping: no new requests, writing out captured rows, stopping vLLM") as stop:
        try:
            if not _wait_ready(engine, vllm, args.ready_timeout, stop):
                return 1 if vllm.poll() is not None or not stop.requested else 0
            from producer.live.front import FrontDoor

            door = FrontDoor(engine.url, queue, host=args.host, port=args.port).start()
            log.info("serving on %s (vLLM on %s); capture rate %.2f", door.url, engine.url, controls.rate)
            watcher = None
            if args.drafts_dir:
                guard = GuardConfig(
                    min_gain=args.min_gain,
                    min_heldout=args.min_heldout,
                    max_new_tokens=args.score_max_new_tokens,
                    poll_seconds=args.poll_seconds,
                )
                work = (capture_dir or Path(args.drafts_dir)) / ".scoring"
                log_path = capture_dir / "swaps.jsonl" if capture_dir else None
                watcher = DraftWatcher(engine, writer, Path(args.drafts_dir), log_path, guard, work)
                threading.Thread(
                    target=_watch, args=(watcher, stop.event, guard.poll_seconds), daemon=True, name="draft-watcher"
                ).start()
            while not stop.requested and vllm.poll() is None:
                writer.drain(timeout=0.5)
            if vllm.poll() is not None and not stop.requested:
                log.error("vLLM exited with %s", vllm.returncode)
                return 1
            return 0
        finally:
            if door is not None:
                door.stop()
            writer.close()
            log.info("capture: %s", json.dumps(queue.stats()))
            _stop_vllm(vllm)


def _watch(watcher: DraftWatcher, stop: threading.Event, every: float) -> None:
    while not stop.is_set():
        try:
            watcher.poll()
        except Exception:  # noqa: BLE001 - the watcher must outlive one bad poll
            log.exception("draft watcher")
        stop.wait(every)


def _wait_ready(engine: ServingEngine, vllm: subprocess.Popen, timeout: float, stop) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.requested:
        if vllm.poll() is not None:
            log.error("vLLM exited with %s before it was ready", vllm.returncode)
            return False
        if engine.healthy():
            return True
        time.sleep(1.0)
    if not stop.requested:
        log.error("vLLM not ready after %.0f s", timeout)
    return False


def _stop_vllm(vllm: subprocess.Popen) -> None:
    if vllm.poll() is None:
        vllm.send_signal(signal.SIGTERM)  # vLLM's API server shuts its engine core down on SIGTERM
        try:
            vllm.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(vllm.pid, signal.SIGKILL)
            vllm.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
