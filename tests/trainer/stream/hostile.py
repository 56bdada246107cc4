"""Hostile local peers against a real trainer rank (issue 13): a harness that runs `draftstream train
--stream-endpoint ipc://...` plus one real `draftstream produce --connect ...` on the tiny target,
reads what a run leaves (exit code, accounting record, losses, logs, the trainer's RSS), and one
hostile client per row of the issue, each attacking the trainer's control/data ipc sockets.

Nothing here knows a lease's token: hostile samples carry ``"0" * 32`` or ``""`` where the Sample
message has a ``token`` field (protocol 2), and nothing at all under protocol 1. Well-formed hostile
messages are built with ``protocol.codec.encode`` (so they follow the current protocol version);
malformed ones are raw frames whose header carries ``protocol.messages.PROTOCOL_VERSION`` read at
call time.

Harness::

    workload = shared_workload(tmp_path_factory, tiny_llama, conversations_jsonl)  # prepared rows + plan
    baseline = shared_baseline(tmp_path_factory, workload)       # unattacked run, once per pytest process
    with TrainingRun(workload, tmp_path, start_producer=False) as run:  # trainer up, sockets bound
        make = forged_sample_maker(workload, fills=["nan"], lease_ids=range(1, 33))
        attacks = Attacks()                                       # hostile clients on threads
        attacks.start("nan", lambda: push_samples(run, make, stop=run.finished, limit=1500, seconds=60))
        run.start_producer()
        result = run.wait()                                       # RunResult; kills the trainer at timeout
        figures = attacks.join()
    assert_unaffected(result, baseline, workload, what="row 4")   # exit 0, record == plan, losses, RSS

Subprocesses run this checkout (PYTHONPATH = the repository holding this file). Every process
started here is ended by the harness, by its own pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack
import torch
import zmq

from protocol import messages
from protocol.codec import encode
from protocol.messages import EndOfStream, Error, Grant, Heartbeat, Hello, LeaseFailed, Sample, Welcome
from protocol.sockets import rank_endpoints

REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "protocol.cli"]
MiB, GiB = 1 << 20, 1 << 30

SEED = 7
EPOCHS = 2
TOTAL_SEQ_LEN = 384
BUFFER_BYTES = 16 * MiB  # --buffer-bytes of every run: far above what the tiny target's batches need
TRAIN_ARGS = [
    "--lr",
    "3e-3",
    "--total-seq-len",
    str(TOTAL_SEQ_LEN),
    "--draft-vocab-size",
    "128",
    "--log-every",
    "1",
    "--no-progress",
    "--seed",
    str(SEED),
    "--epochs",
    str(EPOCHS),
    "--buffer-bytes",
    str(BUFFER_BYTES),
]
# One row per forward (--max-batch-tokens 1): a row's hidden states then do not depend on which
# rows shared its batch, so every run of the same plan trains on bit-identical samples and the
# losses of an attacked run equal the baseline's exactly.
PRODUCER_ARGS = ["--max-batch-tokens", "1", "--handshake-timeout", "120"]
PRODUCER_ID = "producer-0"
FORGED_TOKENS = ("0" * 32, "")  # what a peer that never saw a grant can put in Sample.token


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


# ---- the workload: tiny target, prepared rows, the plan --------------------------------------------


@dataclasses.dataclass
class Workload:
    model: Path
    data: Path
    spec_fields: dict  # what a genuine producer of this workload announces in its Hello
    num_rows: int
    train_ids: list[int]
    val_ids: list[int]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]]  # sample id -> (input_ids int64, loss_mask bool)

    @property
    def num_layers(self) -> int:
        return len(self.spec_fields["layer_ids"])

    @property
    def hidden_size(self) -> int:
        return self.spec_fields["hidden_size"]

    @property
    def dtype(self) -> torch.dtype:
        from protocol.codec import DTYPES

        return DTYPES[self.spec_fields["dtype"]]

    @property
    def needed_keys(self) -> list[tuple[int, int]]:
        """Every (epoch, sample id) a run needs: train and validation rows, every epoch."""
        return [(e, sid) for e in range(EPOCHS) for sid in sorted(self.train_ids + self.val_ids)]

    def expected_record(self) -> dict:
        """(epoch, step, logical rank) -> planned sample ids, as the single trainer rank plans them."""
        from trainer.data.plan import BatchPlan

        expected = {}
        for epoch in range(EPOCHS):
            plan = BatchPlan.build(
                sample_ids=self.train_ids,
                lengths=[len(self.rows[s][0]) for s in self.train_ids],
                seed=SEED,
                epoch=epoch,
                world_size=1,
                total_seq_len=TOTAL_SEQ_LEN,
            )
            for step in range(plan.num_steps):
                expected[(epoch, step, 0)] = plan.batches_for(0, step)
        return expected

    def hello(self, producer_id: str, **changes) -> Hello:
        return Hello(producer_id=producer_id, **{**self.spec_fields, **changes})

    def secrets(self) -> list[str]:
        """Trainer-side values a refusal to an unauthenticated peer must not show."""
        f = self.spec_fields
        return [
            str(self.model),
            self.model.name,
            f["dataset_fingerprint"],
            str(f["layer_ids"]),
            ", ".join(map(str, f["layer_ids"])),
            f["dtype"],
        ]


def make_workload(root: Path, model: Path, conversations: Path) -> Workload:
    """Prepare the tiny target's conversations (seq length 256) and describe the plan."""
    from producer.prepare import PrepareConfig, prepare_dataset
    from protocol.dataset import PreparedDataset
    from protocol.target import checkpoint_dtype, default_layer_ids, read_text_config
    from trainer.data.sources import split_train_val

    data = root / "prepared"
    prepare_dataset(
        PrepareConfig(model=str(model), data=[str(conversations)], output=str(data), seq_length=256, num_workers=1)
    )
    dataset = PreparedDataset(data)
    text = read_text_config(model)
    spec_fields = dict(
        target_model=str(model),
        layer_ids=default_layer_ids(int(text["num_hidden_layers"])),
        hidden_size=int(text["hidden_size"]),
        dtype=checkpoint_dtype(text),
        vocab_size=int(text["vocab_size"]),
        dataset_fingerprint=dataset.fingerprint,
    )
    train_ids, val_ids = split_train_val(len(dataset), val_ratio=0.1, seed=SEED)
    rows = {i: dataset.row(i) for i in range(len(dataset))}
    return Workload(Path(model), data, spec_fields, len(dataset), train_ids, val_ids, rows)


# ---- RSS of the trainer --------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class RssMonitor:
    """Samples a pid's VmRSS every ``interval`` s on a thread; ``peak`` since the last ``reset``.
    ``reset`` also clears the kernel's VmHWM (``/proc/pid/clear_refs`` 5) where allowed, so
    ``hwm()`` is the exact peak of the window and the sampled peak a lower bound of it."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.hwm_resettable = False

    def start(self) -> RssMonitor:
        self.reset()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = proc_status(self.pid, "VmRSS")
            hwm = proc_status(self.pid, "VmHWM") if self.hwm_resettable else 0
            with self._lock:
                self._peak = max(self._peak, rss, hwm)

    def reset(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_resettable = True
        except OSError:
            self.hwm_resettable = False
        with self._lock:
            self._peak = proc_status(self.pid, "VmRSS")

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def hwm(self) -> int:
        return proc_status(self.pid, "VmHWM")

    @property
    def peak(self) -> int:
        """The window's peak: the kernel's VmHWM where it could be reset (also sampled, so it
        survives the process), else the sampled VmRSS peak."""
        with self._lock:
            sampled = self._peak
        return max(sampled, self.hwm()) if self.hwm_resettable else sampled

    def stop(self) -> None:
        self._stop.set()


# ---- one run: trainer + producer -----------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    returncode: int | None  # None: killed by the harness at its deadline
    wall_s: float  # trainer start to exit
    save: Path
    log: str  # the trainer's stdout + stderr
    producer_log: str
    losses: list[tuple[str, int, float]]  # (kind, global step, loss or val_loss) from train_log.jsonl
    rss_peak: int  # the trainer's VmHWM over the whole run
    figures: dict = dataclasses.field(default_factory=dict)  # filled by tests: attack counts etc.

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, n: int = 3000) -> str:
        return self.log[-n:]

    def streamed(self) -> int | None:
        """Samples the real producer says it streamed (its closing log line)."""
        m = re.search(r"streamed (\d+) samples", self.producer_log)
        return int(m.group(1)) if m else None


def read_losses(save: Path) -> list[tuple[str, int, float]]:
    path = save / "train_log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["kind"], r["global_step"], r.get("loss", r.get("val_loss"))) for r in rows]


def read_record(save: Path) -> dict:
    from trainer.training.accounting import read_accounting

    if not (save / "accounting").is_dir():
        return {}
    records = read_accounting(save)
    got = {(r["epoch"], r["step"], r["logical_rank"]): r["sample_ids"] for r in records}
    assert len(records) == len(got), "a step was recorded twice"
    assert all(not r["skipped"] for r in records), "a step was recorded as skipped"
    return got


class TrainingRun:
    """A real trainer rank (`draftstream train --stream-endpoint ipc://<dir>/stream`) and, unless
    ``start_producer=False`` (then call ``start_producer()``), one real producer. Entering waits
    until the rank's sockets are bound; ``wait()`` waits for the trainer to end (killing it at
    ``timeout`` s after its start) and collects a ``RunResult``. ``finished`` is set once the
    trainer has exited: hostile clients take it as their stop signal."""

    def __init__(
        self,
        workload: Workload,
        workdir: Path,
        *,
        train_args: Iterable[str] = (),
        start_producer: bool = True,
        timeout: float = 150.0,
    ):
        self.workload = workload
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save = self.dir / "save"
        self.endpoint = f"ipc://{self.dir}/stream"
        self.control, self.data = rank_endpoints(self.endpoint, 0)
        self.train_args = list(train_args)
        self.autostart_producer = start_producer
        self.timeout = timeout
        self.trainer: subprocess.Popen | None = None
        self.producer: subprocess.Popen | None = None
        self.finished = threading.Event()
        self.rss: RssMonitor | None = None
        self.started = 0.0
        self.bound_s = 0.0  # trainer start to its sockets bound
        self._logs: list = []

    # -- lifecycle --

    def __enter__(self) -> TrainingRun:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        w = self.workload
        log = open(self.dir / "trainer.log", "w")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        cmd = [
            *CLI,
            "train",
            "--verifier-name-or-path",
            str(w.model),
            "--data-path",
            str(w.data),
            "--save-path",
            str(self.save),
            "--stream-endpoint",
            self.endpoint,
            *TRAIN_ARGS,
            *self.train_args,
        ]
        self.started = time.monotonic()
        self.trainer = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        threading.Thread(target=self._watch, daemon=True).start()
        self.rss = RssMonitor(self.trainer.pid).start()
        if self.autostart_producer:  # it imports and loads the target while the trainer starts
            self.start_producer()
        sockets = [Path(e[len("ipc://") :]) for e in (self.control, self.data)]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in sockets):
            if self.trainer.poll() is not None:
                raise AssertionError(f"the trainer exited before binding its sockets:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the trainer did not bind {sockets} in 120 s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.bound_s = time.monotonic() - self.started

    def _watch(self) -> None:
        assert self.trainer is not None
        with contextlib.suppress(Exception):
            self.trainer.wait()
        self.finished.set()

    def start_producer(self, producer_id: str = PRODUCER_ID) -> None:
        if self.producer is not None:
            return
        log = open(self.dir / "producer.log", "w")  # noqa: SIM115
        self._logs.append(log)
        w = self.workload
        cmd = [*CLI, "produce", "--model", str(w.model), "--data", str(w.data), "--connect", self.endpoint]
        cmd += ["--producer-id", producer_id, *PRODUCER_ARGS]
        self.producer = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> bool:
        """Wait until the trainer's log matches ``pattern`` (regex); False if it ends or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return True
            if self.finished.is_set():
                return bool(re.search(pattern, self.log()))
            time.sleep(0.1)
        return False

    def steps_recorded(self) -> int:
        path = self.save / "accounting"
        if not path.is_dir():
            return 0
        return sum(len(f.read_text().splitlines()) for f in path.glob("rank*.jsonl"))

    def wait_for_steps(self, steps: int, timeout: float = 90.0) -> bool:
        """Wait until ``steps`` optimizer steps are in the accounting record; False if the trainer ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.finished.is_set():
            if self.steps_recorded() >= steps:
                return True
            time.sleep(0.1)
        return self.steps_recorded() >= steps

    def wait_until_training(self, timeout: float = 60.0) -> bool:
        """The model is built and the loop is about to fetch its first batch."""
        return self.wait_for_log(r"steps planned", timeout)

    def alive(self) -> bool:
        return self.trainer is not None and self.trainer.poll() is None

    def log(self) -> str:
        path = self.dir / "trainer.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self) -> RunResult:
        assert self.trainer is not None
        remaining = self.timeout - (time.monotonic() - self.started)
        try:
            returncode: int | None = self.trainer.wait(max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            self.trainer.kill()
            self.trainer.wait(30)
            returncode = None
        wall = time.monotonic() - self.started
        self.finished.set()
        if self.producer is not None:
            try:  # a trainer that finished told it the stream ended; one that failed did not
                self.producer.wait(30 if returncode == 0 else 0.1)
            except subprocess.TimeoutExpired:
                self.producer.kill()
                self.producer.wait(30)
        producer_log = (self.dir / "producer.log").read_text(errors="replace") if self.producer else ""
        return RunResult(
            returncode=returncode,
            wall_s=wall,
            save=self.save,
            log=self.log(),
            producer_log=producer_log,
            losses=read_losses(self.save),
            rss_peak=self.rss.peak if self.rss else 0,  # since the last reset: the whole run unless a test reset it
            figures={"bound_s": round(self.bound_s, 1)},
        )

    def close(self) -> None:
        self.finished.set()
        if self.rss is not None:
            self.rss.stop()
        for proc in (self.producer, self.trainer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        for log in self._logs:
            log.close()
        self._logs.clear()


def run_baseline(workload: Workload, workdir: Path) -> RunResult:
    """The unattacked run every attacked run is compared with."""
    with TrainingRun(workload, workdir) as run:
        result = run.wait()
    assert result.returncode == 0, f"the unattacked baseline failed:\n{result.tail()}"
    assert read_record(result.save) == workload.expected_record(), "the baseline's record differs from the plan"
    assert result.losses, "the baseline wrote no losses"
    return result


_SHARED: dict = {}


def shared_workload(tmp_path_factory, model: Path, conversations: Path) -> Workload:
    """``make_workload`` once per pytest process (both hostile test modules use the same one)."""
    key = ("workload", str(model), str(conversations))
    if key not in _SHARED:
        _SHARED[key] = make_workload(tmp_path_factory.mktemp("hostile-workload"), model, conversations)
    return _SHARED[key]


def shared_baseline(tmp_path_factory, workload: Workload) -> RunResult:
    """``run_baseline`` once per pytest process and workload."""
    key = ("baseline", str(workload.data))
    if key not in _SHARED:
        _SHARED[key] = run_baseline(workload, tmp_path_factory.mktemp("hostile-baseline"))
        result = _SHARED[key]
        print(
            f"\nbaseline: {result.wall_s:.1f} s (sockets up after {result.figures.get('bound_s')} s), "
            f"trainer peak RSS {fmt_mib(result.rss_peak)}, {len(result.losses)} losses, "
            f"final {result.losses[-1][2]:.6f}"
        )
    return _SHARED[key]


# ---- what an attacked run must still be ----------------------------------------------------------


def assert_unaffected(
    result: RunResult,
    baseline: RunResult,
    workload: Workload,
    *,
    what: str,
    rss_bound: int | None = None,
) -> None:
    """Training finished (exit 0), the record equals the plan, the losses equal the baseline's
    (1e-5), and the trainer's peak RSS stayed under ``rss_bound`` (default: the baseline's peak +
    --buffer-bytes + 1 GiB)."""
    if result.timed_out:
        raise AssertionError(
            f"{what}: training did not finish within {result.wall_s:.0f} s (baseline {baseline.wall_s:.0f} s); "
            f"log tail:\n{result.tail()}"
        )
    assert result.returncode == 0, f"{what}: the trainer exited {result.returncode}; log tail:\n{result.tail()}"
    record, expected = read_record(result.save), workload.expected_record()
    if record != expected:
        missing = sorted(k for k in expected if record.get(k) != expected[k])
        raise AssertionError(f"{what}: the accounting record differs from the plan at {missing[:5]}")
    assert [loss[:2] for loss in result.losses] == [loss[:2] for loss in baseline.losses], (
        f"{what}: other steps were logged than in the baseline"
    )
    diffs = [abs(a[2] - b[2]) for a, b in zip(result.losses, baseline.losses)]
    worst = max(diffs, default=0.0)
    assert worst <= 1e-5, (
        f"{what}: losses differ from the unattacked run by up to {worst:.3g} "
        f"(final {result.losses[-1][2]:.6f} vs {baseline.losses[-1][2]:.6f})"
    )
    bound = rss_bound if rss_bound is not None else baseline.rss_peak + BUFFER_BYTES + GiB
    assert result.rss_peak <= bound, (
        f"{what}: trainer peak RSS {result.rss_peak / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB"
    )


def _template(line: str, workdir: Path) -> str:
    """A log line without its timestamp, run folder and numbers: the kind of line it is."""
    line = re.sub(r"^\d\d:\d\d:\d\d ", "", line).replace(str(workdir), "<run>")
    return re.sub(r"0x[0-9a-f]+|[0-9a-f]{16,}|\d+(\.\d+)?(e[-+]?\d+)?", "#", line)


def new_log_lines(result: RunResult, baseline: RunResult) -> list[str]:
    """Lines of an attacked run's trainer log of a kind the unattacked run never printed."""
    known = {_template(line, baseline.save.parent) for line in baseline.log.splitlines()}
    return [
        line for line in result.log.splitlines() if line.strip() and _template(line, result.save.parent) not in known
    ]


# ---- message building ----------------------------------------------------------------------------


def sample_has_token() -> bool:
    return any(f.name == "token" for f in dataclasses.fields(Sample))


def make_sample(
    workload: Workload,
    sample_id: int,
    epoch: int,
    *,
    lease_id: int,
    fill: str = "zero",
    token: str = FORGED_TOKENS[0],
    tokens: torch.Tensor | None = None,
) -> Sample:
    """A well-formed Sample: the row's exact tokens and loss mask (or ``tokens`` for ids with no
    row), hidden states [T, L, H] in the target's dtype filled with zeros or NaN."""
    if tokens is None:
        ids, mask = workload.rows[sample_id]
    else:
        ids, mask = tokens, torch.ones(len(tokens), dtype=torch.bool)
    layers, hidden, dtype = workload.num_layers, workload.hidden_size, workload.dtype
    value = float("nan") if fill == "nan" else 0.0
    fields = dict(
        sample_id=sample_id,
        epoch=epoch,
        lease_id=lease_id,
        token_ids=ids.to(torch.int64),
        loss_mask=mask.to(torch.uint8),
        hidden_states=torch.full((len(ids), layers, hidden), value, dtype=dtype),
    )
    if sample_has_token():
        fields["token"] = token
    return Sample(**fields)


def sample_header_fields(sample_id: int = 0, epoch: int = 0, lease_id: int = 1) -> dict:
    fields = {"sample_id": sample_id, "epoch": epoch, "lease_id": lease_id}
    if sample_has_token():
        fields["token"] = FORGED_TOKENS[0]
    return fields


def raw_message(kind: int, fields: dict, tensors: list[list], data_frames: list, *, version=None) -> list:
    """Hand-made frames: kind byte, msgpack header {"v", "f", "t"}, then ``data_frames`` as given."""
    header = {"v": messages.PROTOCOL_VERSION if version is None else version, "f": fields, "t": tensors}
    return [bytes((int(kind),)), msgpack.packb(header, use_bin_type=True), *data_frames]


def absurd_shape_messages() -> list[tuple[str, list]]:
    """Small Samples whose tensor shapes hold a zero and a 2**64-1 / 2**63-1: 0 bytes in all, so
    every size check passes, and only the shape itself is absurd."""
    out = []
    for big in (2**64 - 1, 2**63 - 1):
        for where in ("token_ids", "hidden_states"):
            shapes = {"token_ids": [0], "loss_mask": [0], "hidden_states": [0, 4, 64]}
            shapes[where] = [0, big] if where == "token_ids" else [0, big, 64]
            tensors = [
                ["token_ids", "int64", shapes["token_ids"], 0],
                ["loss_mask", "uint8", shapes["loss_mask"], 0],
                ["hidden_states", "float32", shapes["hidden_states"], 0],
            ]
            out.append(
                (f"{where} {shapes[where]}", raw_message(messages.Kind.SAMPLE, sample_header_fields(), tensors, []))
            )
    return out


def one_kib_header_message(frames: int, frame_bytes: int, payload: bytes | memoryview) -> list:
    """A Sample header declaring 1 KiB of tensors in 3 frames, followed by ``frames`` frames of
    ``frame_bytes`` (views of one ``payload`` buffer, so the sender holds it once)."""
    tensors = [
        ["token_ids", "int64", [16], 1],
        ["loss_mask", "uint8", [16], 1],
        ["hidden_states", "float32", [16, 1, 14], 1],
    ]  # 128 + 16 + 896 = 1040 bytes
    view = memoryview(payload)[:frame_bytes]
    return raw_message(messages.Kind.SAMPLE, sample_header_fields(), tensors, [view] * frames)


# ---- sockets -------------------------------------------------------------------------------------


def _socket(ctx: zmq.Context, kind: int, endpoint: str, *, identity: bytes | None = None, hwm: int = 16) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def _recv(sock: zmq.Socket, timeout: float):
    """The next decodable message on a DEALER, or None after ``timeout`` s."""
    from protocol.codec import decode

    if not sock.poll(int(timeout * 1000)):
        return None
    frames = sock.recv_multipart()
    try:
        return decode(frames, max_message_bytes=1 << 20)
    except messages.ProtocolError:
        return None


def _send(sock: zmq.Socket, frames: list, *, block: bool = True) -> bool:
    try:
        sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


def handshake(
    run: TrainingRun, hello: Hello, ctx: zmq.Context, timeout: float = 15.0
) -> tuple[zmq.Socket, Welcome | None]:
    """A DEALER that said ``hello`` to the run's rank; the Welcome (accepted or not), or None if
    none came within ``timeout`` s or before the trainer ended."""
    sock = _socket(ctx, zmq.DEALER, run.control)
    _send(sock, encode(hello))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not run.finished.is_set():
        message = _recv(sock, min(0.2, max(0.0, deadline - time.monotonic())))
        if isinstance(message, Welcome):
            return sock, message
    return sock, None


def _leave(sock: zmq.Socket) -> None:
    with contextlib.suppress(zmq.ZMQError):
        _send(sock, encode(EndOfStream(reason="bye")), block=False)
    time.sleep(0.05)
    sock.close(linger=200)


# ---- row 1: absurd tensor shapes -----------------------------------------------------------------


def send_absurd_shapes(
    run: TrainingRun, *, sockets: Iterable[str] = ("control", "data"), stop: threading.Event, limit: float = 60.0
) -> dict:
    """Every ``absurd_shape_messages`` on each of ``sockets`` ("control", "data") in turn, a round
    every 0.3 s, until ``stop`` or ``limit`` s. Returns {"rounds", "sent", "broke": the sockets
    after whose batch a Python traceback reached the trainer's log or it exited non-zero}."""
    ctx = zmq.Context()
    broke: list[str] = []
    sent = rounds = 0
    try:
        socks = {
            name: _socket(ctx, zmq.PUSH, run.data) if name == "data" else _socket(ctx, zmq.DEALER, run.control)
            for name in sockets
        }
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline and not broke:
            rounds += 1
            for name, sock in socks.items():
                tracebacks = run.log().count("Traceback")
                for _, frames in absurd_shape_messages():
                    sent += _send(sock, frames, block=False)
                time.sleep(0.3)
                code = run.trainer.poll() if run.trainer else None
                if run.log().count("Traceback") > tracebacks or code not in (None, 0):
                    broke.append(name)
                    break
        for sock in socks.values():
            sock.close(linger=0)
        return {"rounds": rounds, "sent": sent, "broke": broke}
    finally:
        ctx.term()


# ---- row 2: taking over the real producer's identity -----------------------------------------------


def steal_identity(
    run: TrainingRun, identity: bytes, *, stop: threading.Event, every: float = 0.5, limit: float = 60.0
) -> dict:
    """Connect a DEALER with the real producer's identity and say nothing; reconnect every
    ``every`` s (a new connection each time) until ``stop`` or ``limit`` s. Counts what it got."""
    ctx = zmq.Context()
    got = 0
    connections = 0
    try:
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            sock = _socket(ctx, zmq.DEALER, run.control, identity=identity)
            connections += 1
            until = time.monotonic() + every
            while time.monotonic() < until and not stop.is_set():
                if sock.poll(100):
                    sock.recv_multipart()
                    got += 1
            sock.close(linger=0)
        return {"connections": connections, "messages_received": got}
    finally:
        ctx.term()


# ---- row 3: many frames under a header that declares 1 KiB ----------------------------------------


def oversized_messages(run: TrainingRun, *, frames: int, frame_bytes: int, count: int, timeout: float = 60.0) -> dict:
    """``count`` messages of ``frames`` x ``frame_bytes`` on the data socket, each under a header
    declaring 1 KiB. A send blocked for 5 s (the trainer stopped reading, or cut us off) ends it."""
    payload = bytearray(frame_bytes)
    ctx = zmq.Context()
    sent = 0
    started = time.monotonic()
    try:
        sock = _socket(ctx, zmq.PUSH, run.data, hwm=2)
        message = one_kib_header_message(frames, frame_bytes, payload)
        for _ in range(count):
            if time.monotonic() - started > timeout or not run.alive():
                break
            try:
                if not _send(sock, message):
                    break
            except zmq.ZMQError:
                break
            sent += 1
        sock.close(linger=3_000)  # let what is queued reach the trainer (or be refused by it)
    finally:
        ctx.term()
    return {"messages": sent, "frames": frames, "frame_bytes": frame_bytes, "seconds": time.monotonic() - started}


# ---- rows 4, 5, 9: forged samples on the data socket ----------------------------------------------


def push_samples(
    run: TrainingRun,
    make: Callable[[int], Sample | None],
    *,
    stop: threading.Event,
    limit: int,
    seconds: float,
    rate: float = 0.0,
) -> dict:
    """Push ``make(i)`` for i = 0, 1, ... (None: skip) until ``limit`` messages, ``seconds`` s or
    ``stop``, at most ``rate`` messages/s (0: as fast as the trainer takes them); a send the
    trainer does not take within 1 s is skipped."""
    ctx = zmq.Context()
    sent = tried = 0
    started = time.monotonic()
    try:
        sock = _socket(ctx, zmq.PUSH, run.data, hwm=8)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        i = 0
        while tried < limit and not stop.is_set() and time.monotonic() - started < seconds:
            if rate and tried > rate * (time.monotonic() - started):
                time.sleep(1.0 / rate)
                continue
            sample = make(i)
            i += 1
            if sample is None:
                continue
            tried += 1
            sent += _send(sock, encode(sample))
        sock.close(linger=0)
    finally:
        ctx.term()
    return {"tried": tried, "sent": sent, "seconds": round(time.monotonic() - started, 1)}


def forged_sample_maker(
    workload: Workload, *, fills: Iterable[str], lease_ids: Iterable[int]
) -> Callable[[int], Sample]:
    """Every needed key in turn, over and over, with the row's exact tokens; each pass over the
    keys takes the next of ``fills`` ("nan" or "zero" hidden states) and of both forged tokens,
    lease ids cycle through ``lease_ids``."""
    keys = workload.needed_keys
    leases, fills = list(lease_ids), list(fills)

    def make(i: int) -> Sample:
        epoch, sid = keys[i % len(keys)]
        rnd = i // len(keys)
        return make_sample(
            workload,
            sid,
            epoch,
            lease_id=leases[i % len(leases)],
            fill=fills[rnd % len(fills)],
            token=FORGED_TOKENS[rnd % 2],
        )

    return make


def unneeded_sample_maker(workload: Workload) -> Callable[[int], Sample]:
    """Samples no run needs: ids -1 and 10**6, epoch 10**6, and real rows of an epoch past the plan."""
    tiny = torch.arange(4, dtype=torch.int64)
    sid0 = workload.train_ids[0]
    kinds = [
        lambda lease: make_sample(workload, -1, 0, lease_id=lease, tokens=tiny),
        lambda lease: make_sample(workload, 10**6, 0, lease_id=lease, tokens=tiny),
        lambda lease: make_sample(workload, sid0, 10**6, lease_id=lease),
        lambda lease: make_sample(workload, sid0, EPOCHS + 3, lease_id=lease),
    ]
    return lambda i: kinds[i % len(kinds)](1 + i % 8)


# ---- row 6: producers that say hello, heartbeat, and never deliver ---------------------------------


def fake_producers(
    run: TrainingRun, workload: Workload, *, count: int, stop: threading.Event, limit: float = 200.0
) -> dict:
    """``count`` DEALERs with a valid Hello that heartbeat every second and never deliver nor
    give anything back. Returns how many were welcomed and how many samples they were granted."""
    ctx = zmq.Context()
    socks = []
    granted = grants = welcomed = 0
    try:
        for i in range(count):
            sock = _socket(ctx, zmq.DEALER, run.control)
            _send(sock, encode(workload.hello(f"idle-{i}")))
            socks.append(sock)
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        last_beat = 0.0
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            for sock, _ in poller.poll(100):
                from protocol.codec import decode

                try:
                    message = decode(sock.recv_multipart(), max_message_bytes=1 << 20)
                except messages.ProtocolError:
                    continue
                if isinstance(message, Welcome) and message.accepted:
                    welcomed += 1
                elif isinstance(message, Grant):
                    grants += 1
                    granted += len(message.sample_ids)
            if time.monotonic() - last_beat > 1.0:
                last_beat = time.monotonic()
                for i, sock in enumerate(socks):
                    _send(sock, encode(Heartbeat(sender=f"idle-{i}", time_s=time.time())), block=False)
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
    return {"welcomed": welcomed, "grants": grants, "samples_granted": granted}


# ---- row 7: handshakes that must be refused without leaking ---------------------------------------


def probe_handshakes(run: TrainingRun, workload: Workload) -> dict[str, tuple[bool | None, str]]:
    """Say each hostile Hello on a fresh connection; {case: (accepted, reason)} (None: no answer).
    A hello that is (wrongly) accepted leaves at once with EndOfStream, holding no work."""
    cases: dict[str, object] = {
        "protocol_version=999": workload.hello("probe-version", protocol_version=999),
        "empty fingerprint": workload.hello("probe-fingerprint", dataset_fingerprint=""),
        "everything wrong": workload.hello(
            "probe-wrong",
            target_model="someone-elses-model",
            layer_ids=[1, 3],
            hidden_size=32,
            dtype="float16",
            vocab_size=7,
            dataset_fingerprint="f" * 16,
        ),
    }
    out: dict[str, tuple[bool | None, str]] = {}
    ctx = zmq.Context()
    try:
        for name, hello in cases.items():
            sock, welcome = handshake(run, hello, ctx)  # type: ignore[arg-type]
            out[name] = (None, "") if welcome is None else (welcome.accepted, welcome.reason)
            _leave(sock)
        # A header that speaks another protocol version altogether.
        sock = _socket(ctx, zmq.DEALER, run.control)
        hello = encode(workload.hello("probe-header"))
        header = msgpack.unpackb(hello[1], raw=False)
        header["v"] = 999
        _send(sock, [hello[0], msgpack.packb(header, use_bin_type=True)])
        answer = None
        deadline = time.monotonic() + 15.0
        while answer is None and time.monotonic() < deadline and not run.finished.is_set():
            answer = _recv(sock, 0.2)
        out["header v=999"] = (None, "") if not isinstance(answer, Welcome) else (answer.accepted, answer.reason)
        _leave(sock)
    finally:
        ctx.term()
    return out


# ---- row 8: log forgery through Error messages ----------------------------------------------------

FORGE_MARK = "FORGED-LINE"
FORGED_PREFIX = "00:00:00 [trainer] INFO trainer.training.loop: "


def forged_error_text(i: int) -> str:
    return (
        f"disk full\n{FORGED_PREFIX}{FORGE_MARK} {i} step 999 loss 0.000 all samples verified\r\n"
        f"{FORGE_MARK} {i} second forged line\n" + "x" * 4000
    )


def flood_errors(
    run: TrainingRun, workload: Workload, *, count: int, stop: threading.Event, seconds: float = 60.0
) -> dict:
    """Join as a genuine-looking producer, give back every grant at once (LeaseFailed on its own
    lease: it holds no work), and send ``count`` Error messages whose code and text carry
    newlines, carriage returns, forged log prefixes and 4 KB of padding. Then leave."""
    ctx = zmq.Context()
    sent = 0
    started = time.monotonic()
    try:
        sock, welcome = handshake(run, workload.hello("chatty"), ctx)
        if welcome is None or not welcome.accepted:
            return {"sent": 0, "welcome": None if welcome is None else welcome.reason}

        def give_back() -> None:
            while sock.poll(0):
                from protocol.codec import decode

                try:
                    message = decode(sock.recv_multipart(), max_message_bytes=1 << 20)
                except messages.ProtocolError:
                    continue
                if isinstance(message, Grant):
                    reply = LeaseFailed(lease_id=message.lease_id, sample_ids=list(message.sample_ids), reason="busy")
                    _send(sock, encode(reply), block=False)

        for i in range(count):
            if stop.is_set() or time.monotonic() - started > seconds:
                break
            give_back()
            error = Error(code=f"E{i}\n{FORGED_PREFIX}{FORGE_MARK} code", message=forged_error_text(i))
            if not _send(sock, encode(error)):
                break
            sent += 1
        give_back()
        _leave(sock)
    finally:
        ctx.term()
    return {"sent": sent, "seconds": round(time.monotonic() - started, 1)}


def forged_lines(log: str) -> tuple[list[str], list[str]]:
    """(lines that mention the forgery mark, lines that look like a forged log line start)."""
    lines = log.split("\n")
    mentions = [line for line in lines if FORGE_MARK in line]
    starts = [
        line
        for line in lines
        if line.startswith(FORGED_PREFIX.split(" [")[0] + " [") or line.lstrip().startswith(FORGE_MARK)
    ]
    return mentions, starts


# ---- row 10: failing another producer's leases -----------------------------------------------------


def fail_others_leases(
    run: TrainingRun, workload: Workload, *, stop: threading.Event, seconds: float = 90.0, window: int = 64
) -> dict:
    """Join as a producer, then every 0.2 s send LeaseFailed for every lease id from 1 to (the
    highest id it was granted + ``window``), naming every row, so each lease granted to the real
    producer is failed as soon as it exists. Its own grants are failed too (it holds no work)."""
    from protocol.codec import decode

    ctx = zmq.Context()
    sent = 0
    own: set[int] = set()
    started = time.monotonic()
    try:
        sock, welcome = handshake(run, workload.hello("saboteur"), ctx)
        if welcome is None or not welcome.accepted:
            return {"sent": 0, "welcome": None if welcome is None else welcome.reason}
        all_ids = list(range(workload.num_rows))
        highest = 0
        while not stop.is_set() and time.monotonic() - started < seconds:
            while sock.poll(0):
                try:
                    message = decode(sock.recv_multipart(), max_message_bytes=1 << 20)
                except messages.ProtocolError:
                    continue
                if isinstance(message, Grant):
                    own.add(message.lease_id)
                    highest = max(highest, message.lease_id)
            for lease_id in range(1, highest + window):
                if _send(sock, encode(LeaseFailed(lease_id=lease_id, sample_ids=all_ids, reason="x")), block=False):
                    sent += 1
            time.sleep(0.2)
        _leave(sock)
    finally:
        ctx.term()
    return {"sent": sent, "own_leases": len(own)}


# ---- several attacks at once ----------------------------------------------------------------------


class Attacks:
    """Run hostile clients on threads; ``join()`` returns {name: figures or the exception}."""

    def __init__(self) -> None:
        self._threads: list[tuple[str, threading.Thread]] = []
        self.results: dict[str, object] = {}

    def start(self, name: str, fn: Callable[[], dict]) -> None:
        def target() -> None:
            try:
                self.results[name] = fn()
            except Exception as e:  # a hostile client failing is a figure, not a test error
                self.results[name] = e

        thread = threading.Thread(target=target, name=f"hostile-{name}", daemon=True)
        thread.start()
        self._threads.append((name, thread))

    def join(self, timeout: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        for _, thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        return dict(self.results)


# ---- whose log lines: several rows against one run ------------------------------------------------

DROP_LINE = re.compile(r"dropped sample \((-?\d+), (-?\d+)\): ")
DROP_SUMMARY = re.compile(r"similar lines suppressed in \d+s \(\('drop', '([^']*)'\)\)")
# Lines no Sample on the data socket can cause: the control socket's, named peers' (joined, refused,
# failing leases, reporting errors, leaving), row 1's absurd shapes, row 8's forged text.
NOT_FROM_SAMPLES = [
    re.compile(pattern)
    for pattern in (
        r"on the control socket",
        r"malformed control message",
        r"refused producer ",
        r"producer \S+ (joined rank|failed lease|tried to fail lease|reports |lost \()",
        r"bad shape \[0, (18446744073709551615|9223372036854775807)",
        r"similar lines suppressed in \d+s \(\('(foreign lease|lease failed|error|refused hello|joined|malformed control)'",
        r"similar lines suppressed in \d+s \(\('refused', 'control'\)\)",
        re.escape(FORGE_MARK),
    )
]


def sort_sample_lines(lines: list[str], workload: Workload) -> dict[str, list[str]]:
    """An attacked run's new log lines (``new_log_lines``), sorted by who can have caused them, for
    rows that push Samples next to other hostile peers: "needed" (a dropped sample of a key the run
    needs: rows 4, 5's forged samples), "unneeded" (of a key it does not need: row 9), "either" (a
    suppression summary of the drop reason both meet, "not needed"), "others" (lines no Sample can
    cause, ``NOT_FROM_SAMPLES``: another row's) and "unclaimed" (the rest: a pushing row counts them
    against its bound)."""
    needed = set(workload.needed_keys)
    out: dict[str, list[str]] = {k: [] for k in ("needed", "unneeded", "either", "others", "unclaimed")}
    for line in lines:
        if m := DROP_LINE.search(line):
            out["needed" if (int(m[1]), int(m[2])) in needed else "unneeded"].append(line)
        elif m := DROP_SUMMARY.search(line):
            out["either" if m[1] == "not needed" else "needed"].append(line)
        elif any(p.search(line) for p in NOT_FROM_SAMPLES):
            out["others"].append(line)
        else:
            out["unclaimed"].append(line)
    return out


# ---- every row at once (the soak) -----------------------------------------------------------------

IDLE_PRODUCERS = 20  # row 6's idle fake producers in the soak's run


def run_mixed_load(workload: Workload, baseline: RunResult, workdir: Path) -> tuple[RunResult, dict]:
    """Every row's hostile client at once against one run with --lease-seconds 6 (row 6's setting):
    ``IDLE_PRODUCERS`` idle producers and rows 4, 5, 9's samples from just before the producer
    starts, the other rows from just after. Each client is bounded in messages and seconds; the
    harness kills a run that stalls past 1.5 x the baseline (at least 30 s) + 100 s."""
    limit = 1.5 * max(baseline.wall_s, 30.0) + 100
    with TrainingRun(
        workload, workdir, start_producer=False, train_args=["--lease-seconds", "6"], timeout=limit
    ) as run:
        assert run.wait_until_training(), run.log()[-3000:]
        stop = run.finished
        attacks = Attacks()
        attacks.start(
            "6 idle producers", lambda: fake_producers(run, workload, count=IDLE_PRODUCERS, stop=stop, limit=120)
        )
        nan = forged_sample_maker(workload, fills=["nan"], lease_ids=range(1, 33))
        zero = forged_sample_maker(workload, fills=["zero"], lease_ids=[10**9])
        unneeded = unneeded_sample_maker(workload)
        attacks.start("4 nan samples", lambda: push_samples(run, nan, stop=stop, limit=600, seconds=60, rate=60))
        attacks.start("5 zero samples", lambda: push_samples(run, zero, stop=stop, limit=600, seconds=60, rate=60))
        attacks.start("9 unneeded", lambda: push_samples(run, unneeded, stop=stop, limit=1000, seconds=60, rate=100))
        time.sleep(1.0)
        run.start_producer()
        attacks.start("1 absurd shapes", lambda: send_absurd_shapes(run, stop=stop))
        attacks.start("3 40 x 60 MiB", lambda: oversized_messages(run, frames=40, frame_bytes=60 * MiB, count=2))
        attacks.start("3 100 x (4 x 2 MiB)", lambda: oversized_messages(run, frames=4, frame_bytes=2 * MiB, count=100))
        attacks.start("7 hostile hellos", lambda: probe_handshakes(run, workload))
        attacks.start("8 error flood", lambda: flood_errors(run, workload, count=3000, stop=stop, seconds=60))
        attacks.start("10 lease sabotage", lambda: fail_others_leases(run, workload, stop=stop, seconds=60))
        attacks.start("2 identity theft", lambda: steal_identity(run, PRODUCER_ID.encode(), stop=stop, limit=60))
        result = run.wait()
        figures = attacks.join(timeout=60)
    return result, figures


def shared_mixed_load(tmp_path_factory, workload: Workload, baseline: RunResult) -> tuple[RunResult, dict]:
    """``run_mixed_load`` once per pytest process and workload: the soak and row 6 assert on the
    same run (a failure is kept and raised again, not run twice)."""
    key = ("mixed", str(workload.data))
    if key not in _SHARED:
        try:
            _SHARED[key] = run_mixed_load(workload, baseline, tmp_path_factory.mktemp("hostile-mixed"))
        except BaseException as e:
            _SHARED[key] = e
            raise
    if isinstance(_SHARED[key], BaseException):
        raise AssertionError(f"the shared mixed-load run failed before: {_SHARED[key]!r}")
    return _SHARED[key]


def fmt_mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if not math.isnan(n) else "n/a"
