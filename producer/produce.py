"""``draftstream produce``: run the target over prepared rows and hand each capture to a sink.

::

    prepared dataset (Arrow)            one producer process (rank R of W)
      row i, i % W == R  ──────────>  backend: HFCapture            ┌─> SpillSink ── queue ──> SpillWriter thread
      not yet on disk                   batch ─> forward + hooks ───┤     (bounded)            hs_{i}.safetensors
                                        Sample(i, token_ids, mask,  └─> (network sink: streaming issue)
                                               hidden [T, L, H])
                          ──────────>  backend: VLLMBackend (--backend vllm) ─> vLLM's DraftstreamConnector
                                        rows + file://DIR                         writes hs_{i}.safetensors itself

The loop (``run_producer``) only knows the ``Sink`` protocol; with ``--backend vllm`` the engine's
connector writes the files (or pushes to trainer ranks with ``--connect``) and the producer only
submits rows and collects delivery reports (``producer.vllm.backend``). Spill runs are resumable: indices
whose ``hs_{i}.safetensors`` is complete are skipped, temporaries of killed writers are removed
(only this rank's), and ``--validate`` re-reads every file of this rank against the dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from producer.backend import CaptureBackend, CaptureRow, check_layer_ids, default_layer_ids
from producer.capture import DTYPE_CHOICES
from producer.sink import Sink
from protocol.hsfile import HiddenStateFileError, clean_partial_files, hs_path, list_hs_indices, read_hs_file

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


@dataclasses.dataclass(kw_only=True)
class ProduceConfig:
    model: str
    data: str
    spill: str | None = None  # --spill DIR: offline mode
    connect: list[str] | None = None  # --connect ENDPOINT...: streaming mode (trainer grants the rows)
    num_ranks: int = 1
    producer_id: str | None = None
    handshake_timeout: float = 600.0
    curve_secret_key: str | None = None
    curve_server_key: str | None = None
    max_samples: int | None = None
    backend: str = "hf"
    dtype: str = "auto"
    device: str = "auto"
    target_layer_ids: list[int] | None = None
    max_batch_tokens: int = 8192
    validate: bool = False
    world_size: int = 1
    rank: int = 0
    skip_nonfinite: bool = False
    # --backend vllm only:
    endpoint: str | None = None  # a running `draftstream launch-vllm` server; None: in-process engine
    served_model_name: str | None = None
    concurrency: int = 16
    report_endpoint: str | None = None
    report_timeout: float = 300.0
    vllm_engine_args: str | None = None  # JSON object of extra vllm.LLM arguments

    def __post_init__(self) -> None:
        if (self.spill is None) == (not self.connect):
            raise ValueError("give exactly one of --spill DIR (write files) or --connect ENDPOINT (stream to a trainer)")
        if self.connect and (self.validate or self.world_size != 1 or self.max_samples is not None):
            raise ValueError("--validate, --world-size and --max-samples apply to --spill; with --connect the trainer decides the rows")
        if self.backend != "vllm":
            given = [flag for flag, value in (("--endpoint", self.endpoint), ("--served-model-name", self.served_model_name),
                     ("--report-endpoint", self.report_endpoint), ("--vllm-engine-args", self.vllm_engine_args)) if value]
            if given:
                raise ValueError(f"{', '.join(given)} apply to --backend vllm only")
        elif self.device != "auto":
            raise ValueError("--device applies to --backend hf; vLLM places itself (CUDA_VISIBLE_DEVICES, --vllm-engine-args)")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank must be in [0, --world-size); got rank {self.rank}, world size {self.world_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")


@dataclasses.dataclass
class ValidationReport:
    num_ok: int = 0
    missing: list[int] = dataclasses.field(default_factory=list)
    bad: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.missing and not self.bad


@dataclasses.dataclass
class ProduceReport:
    num_selected: int = 0
    num_already_done: int = 0
    num_captured: int = 0
    num_tokens: int = 0
    num_written: int = 0
    num_skipped_nonfinite: int = 0
    num_partial_removed: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    validation: ValidationReport | None = None

    def format(self) -> str:
        rate = self.num_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"rows for this rank     {self.num_selected}",
            f"already on disk        {self.num_already_done}  (partial temporaries removed: {self.num_partial_removed})",
            f"captured               {self.num_captured}  ({self.num_tokens} tokens, {rate:.0f} tokens/s)",
            f"written                {self.num_written}",
            f"skipped (NaN/Inf)      {self.num_skipped_nonfinite}",
        ]
        if self.stopped_early:
            lines.append("stopped by a signal before the end: run the same command again to resume")
        if self.validation is not None:
            v = self.validation
            lines.append(f"validated              {v.num_ok} ok, {len(v.missing)} missing, {len(v.bad)} bad")
            lines += [f"  hs_{i}: {why}" for i, why in sorted(v.bad.items())[:10]]
            if v.missing:
                lines.append(f"  missing: {v.missing[:20]}{' ...' if len(v.missing) > 20 else ''}")
        return "\n".join(lines)


def select_indices(num_rows: int, *, max_samples: int | None, world_size: int, rank: int) -> range:
    """This rank's rows: the first ``max_samples`` rows, those with ``i % world_size == rank``."""
    end = num_rows if max_samples is None else min(num_rows, max_samples)
    return range(rank, end, world_size)


def iter_rows(dataset, indices: list[int]) -> Iterator[CaptureRow]:
    """Prepared rows (torch format) as ``CaptureRow``s, ``sample_id`` = dataset row index."""
    for i, row in zip(indices, dataset.select(indices)):
        yield CaptureRow(i, row["input_ids"], row["loss_mask"])


def run_producer(
    backend: CaptureBackend,
    rows: Iterable[CaptureRow],
    sink: Sink,
    *,
    epoch: int = 0,
    lease_id: int = 0,
    total: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, int]:
    """Feed ``rows`` through ``backend`` into ``sink``; returns (samples, tokens). Stops between
    samples once ``stop`` is set. Does not close the sink: its owner does."""
    from tqdm import tqdm

    num_samples = num_tokens = 0
    with tqdm(total=total, unit="row", desc="capture", dynamic_ncols=True) as bar:
        for sample in backend.capture(rows, epoch=epoch, lease_id=lease_id):
            sink.put(sample)
            num_samples += 1
            num_tokens += sample.token_ids.shape[0]
            bar.update(1)
            if stop is not None and stop.is_set():
                break
    return num_samples, num_tokens


def _captured_layout(config: ProduceConfig) -> tuple[list[int], int]:
    """(layer ids, hidden size) from the target's config alone: validation needs no weights."""
    from transformers import AutoConfig

    target = AutoConfig.from_pretrained(config.model)
    text = target.get_text_config() if hasattr(target, "get_text_config") else target
    num_layers = int(text.num_hidden_layers)
    layer_ids = list(config.target_layer_ids) if config.target_layer_ids else default_layer_ids(num_layers)
    check_layer_ids(layer_ids, num_layers)
    return layer_ids, int(text.hidden_size)


def validate_spill(directory: str | Path, dataset, indices: Iterable[int], *, num_slots: int, hidden_size: int) -> ValidationReport:
    """Re-read every file of ``indices``: token ids equal the row's ``input_ids``, shape
    ``[T, num_slots, hidden_size]``, all finite."""
    from tqdm import tqdm

    report = ValidationReport()
    present = set(list_hs_indices(directory))
    indices = list(indices)
    for i in tqdm(indices, unit="file", desc="validate", dynamic_ncols=True):
        if i not in present:
            report.missing.append(i)
            continue
        try:
            _, hidden_TLH = read_hs_file(hs_path(directory, i), expected_token_ids=dataset[i]["input_ids"])
            if tuple(hidden_TLH.shape[1:]) != (num_slots, hidden_size):
                raise HiddenStateFileError(
                    f"hidden_states {tuple(hidden_TLH.shape)}, expected [T, {num_slots}, {hidden_size}]"
                )
        except HiddenStateFileError as e:
            report.bad[i] = str(e)
            continue
        report.num_ok += 1
    return report


def make_vllm_backend(config: ProduceConfig, *, spill_dir: Path | None = None):
    """The ``--backend vllm`` backend; an in-process engine may spill under ``spill_dir`` only."""
    import json

    from producer.vllm.backend import VLLMBackend, VLLMBackendConfig

    try:
        engine_args = json.loads(config.vllm_engine_args) if config.vllm_engine_args else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--vllm-engine-args must be a JSON object: {e}") from None
    if not isinstance(engine_args, dict):
        raise ValueError("--vllm-engine-args must be a JSON object, e.g. '{\"gpu_memory_utilization\": 0.8}'")
    extra: dict = {"spill_dirs": [str(spill_dir.resolve())]} if spill_dir is not None else {}
    if config.curve_secret_key:
        extra.update(curve_secret_key=str(Path(config.curve_secret_key).resolve()), curve_server_key=str(Path(config.curve_server_key).resolve()))
    return VLLMBackend(
        VLLMBackendConfig(
            model=config.model,
            layer_ids=config.target_layer_ids,
            dtype=config.dtype,
            endpoint=config.endpoint,
            served_model_name=config.served_model_name,
            concurrency=config.concurrency,
            report_endpoint=config.report_endpoint,
            engine_args=engine_args,
            connector_extra=extra,
        )
    )


def _spill_with_vllm(config: ProduceConfig, dataset, todo: list[int], spill: Path, report: ProduceReport, stop) -> set[int]:
    """``--backend vllm --spill``: vLLM's connector writes the files; returns the rows skipped for NaN/Inf."""
    from tqdm import tqdm

    from producer.vllm.backend import spill_rows

    backend = make_vllm_backend(config, spill_dir=spill)
    log.info("target: %s", backend.describe())
    try:
        with tqdm(total=len(todo), unit="row", desc="capture (vllm)", dynamic_ncols=True) as bar:
            stats = spill_rows(
                backend,
                iter_rows(dataset, todo),
                spill,
                max_batch_tokens=config.max_batch_tokens,
                report_timeout_seconds=config.report_timeout,
                stop=stop,
                progress=bar,
            )
    finally:
        backend.close()
    report.num_captured, report.num_tokens = stats.num_submitted, stats.num_tokens
    report.num_written = stats.num_written
    report.num_skipped_nonfinite = stats.num_nonfinite
    report.stopped_early = stats.stopped_early
    if stats.nonfinite_ids and not config.skip_nonfinite:
        stats.failed.update({i: "hidden states contain NaN or Inf (pass --skip-nonfinite to skip and count such rows)" for i in stats.nonfinite_ids})
    if stats.failed:
        first = sorted(stats.failed.items())[:5]
        raise ValueError(f"{len(stats.failed)} rows were not written; first: " + "; ".join(f"row {i}: {why}" for i, why in first))
    return set(stats.nonfinite_ids)


def produce(config: ProduceConfig, *, stop: threading.Event | None = None) -> ProduceReport:
    """Spill run: capture this rank's missing rows into ``config.spill``, then optionally validate."""
    import datasets

    from producer.capture import CaptureConfig, HFCapture
    from producer.spill import SpillConfig, SpillSink

    dataset = datasets.load_from_disk(config.data)
    if not {"input_ids", "loss_mask"} <= set(dataset.column_names):
        raise ValueError(f"--data {config.data} is not a prepared dataset (run `draftstream prepare` first)")
    dataset.set_format("torch", columns=["input_ids", "loss_mask"])
    layer_ids, hidden_size = _captured_layout(config)
    spill = Path(config.spill)
    spill.mkdir(parents=True, exist_ok=True)

    report = ProduceReport()
    selected = select_indices(len(dataset), max_samples=config.max_samples, world_size=config.world_size, rank=config.rank)
    report.num_selected = len(selected)
    report.num_partial_removed = clean_partial_files(spill, indices=selected)
    done = set(list_hs_indices(spill))
    todo = [i for i in selected if i not in done]
    report.num_already_done = report.num_selected - len(todo)
    log.info("%d rows for this rank, %d already on disk, %d to capture", len(selected), report.num_already_done, len(todo))

    sink = None
    skipped: set[int] = set()
    if todo and config.backend == "vllm":
        start = time.perf_counter()
        skipped = _spill_with_vllm(config, dataset, todo, spill, report, stop)
        report.seconds = time.perf_counter() - start
    elif todo:
        start = time.perf_counter()
        backend = HFCapture(
            CaptureConfig(
                model=config.model,
                dtype=config.dtype,
                device=config.device,
                layer_ids=layer_ids,
                max_batch_tokens=config.max_batch_tokens,
            )
        )
        log.info("target: %s", backend.describe())
        sink = SpillSink(SpillConfig(directory=str(spill), skip_nonfinite=config.skip_nonfinite))
        try:
            report.num_captured, report.num_tokens = run_producer(
                backend, iter_rows(dataset, todo), sink, total=len(todo), stop=stop
            )
        finally:
            try:
                sink.close()
            finally:
                backend.close()
        report.seconds = time.perf_counter() - start
        report.num_written = sink.stats.num_written
        report.num_skipped_nonfinite = sink.stats.num_skipped_nonfinite
        report.stopped_early = report.num_captured < len(todo)

    if config.validate:
        report.validation = validate_spill(spill, dataset, selected, num_slots=len(layer_ids), hidden_size=hidden_size)
        # Rows skipped on purpose (--skip-nonfinite) have no file: that is not a validation failure.
        skipped |= set(sink.stats.skipped_nonfinite_ids) if sink is not None else set()
        report.validation.missing = [i for i in report.validation.missing if i not in skipped]
    return report


def dataset_fingerprint(dataset) -> str:
    """datasets' own fingerprint of a saved dataset (the same for every copy of the folder)."""
    return str(getattr(dataset, "_fingerprint", "") or "")


def stream(config: ProduceConfig, *, stop: threading.Event | None = None) -> int:
    """Streaming run: serve the trainer ranks' grants until they end the stream; returns an exit code."""
    import datasets

    from producer.capture import CaptureConfig, HFCapture
    from producer.stream_client import StreamClientConfig, StreamProducer
    from protocol.sockets import CurveKeys, SocketConfig

    if bool(config.curve_secret_key) != bool(config.curve_server_key):
        raise ValueError("CURVE needs both --curve-secret-key (this producer's) and --curve-server-key (the trainer's public key)")

    dataset = datasets.load_from_disk(config.data)
    if not {"input_ids", "loss_mask"} <= set(dataset.column_names):
        raise ValueError(f"--data {config.data} is not a prepared dataset (run `draftstream prepare` first)")
    fingerprint = dataset_fingerprint(dataset)
    dataset.set_format("torch", columns=["input_ids", "loss_mask"])
    layer_ids, _ = _captured_layout(config)
    if config.backend == "vllm":
        backend = make_vllm_backend(config)
    else:
        backend = HFCapture(
            CaptureConfig(model=config.model, dtype=config.dtype, device=config.device, layer_ids=layer_ids, max_batch_tokens=config.max_batch_tokens)
        )
    log.info("target: %s", backend.describe())

    def row(sample_id: int) -> CaptureRow:
        if not 0 <= sample_id < len(dataset):
            raise ValueError(f"granted sample {sample_id} is outside the prepared dataset of {len(dataset)} rows")
        item = dataset[sample_id]
        return CaptureRow(sample_id, item["input_ids"], item["loss_mask"])

    client = StreamProducer(
        StreamClientConfig(
            producer_id=config.producer_id or f"producer-{socket.gethostname()}-{os.getpid()}",
            connect=list(config.connect or []),
            num_ranks=config.num_ranks,
            dataset_fingerprint=fingerprint,
            max_batch_tokens=config.max_batch_tokens,
            handshake_timeout_seconds=config.handshake_timeout,
            socket=SocketConfig(
                sndhwm=8,
                rcvhwm=64,
                curve=CurveKeys(secret_file=Path(config.curve_secret_key), server_public_file=Path(config.curve_server_key))
                if config.curve_secret_key
                else None,
            ),
        ),
        backend,
        row,
        stop=stop,
    )
    try:
        report = client.run()
    finally:
        backend.close()
    log.info("streamed %d samples (%.2f GB) in %d leases; %d samples failed", report.samples, report.bytes / 1e9, report.leases, report.failed_samples)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream produce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="target model: local folder or hub id")
    parser.add_argument("--data", required=True, help="prepared dataset folder (draftstream prepare --output)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spill", help="offline: folder for hs_{i}.safetensors files")
    mode.add_argument(
        "--connect", nargs="+", help="streaming: trainer stream endpoint(s), ipc://DIR or tcp://HOST:PORT (as the trainer's --stream-endpoint)"
    )
    parser.add_argument("--num-ranks", type=int, default=1, help="streaming: trainer ranks behind each --connect endpoint")
    parser.add_argument("--producer-id", default=None, help="streaming: a unique name (default: host and pid)")
    parser.add_argument("--handshake-timeout", type=float, default=600.0, help="streaming: seconds to wait for a trainer")
    parser.add_argument("--curve-secret-key", default=None, help="streaming: this producer's CURVE secret key file")
    parser.add_argument("--curve-server-key", default=None, help="streaming: the trainer's CURVE public key file")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N rows of the dataset")
    parser.add_argument("--backend", default="hf", choices=BACKENDS, help="capture backend: hf (transformers, default) or vllm")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="target dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--target-layer-ids", type=int, nargs="+", default=None, help="layer ids to capture (default: 2 N//2 N-3 N)"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward (default 8192)")
    parser.add_argument("--validate", action="store_true", help="re-read and check every file of this rank at the end")
    parser.add_argument("--world-size", type=int, default=1, help="number of producer processes sharing the rows")
    parser.add_argument("--rank", type=int, default=0, help="this producer's rank: takes rows with i %% world-size == rank")
    parser.add_argument("--skip-nonfinite", action="store_true", help="skip and count rows with NaN/Inf instead of failing")
    vllm = parser.add_argument_group("--backend vllm")
    vllm.add_argument("--endpoint", default=None, help="a running `draftstream launch-vllm` server, http://HOST:PORT (default: an in-process engine)")
    vllm.add_argument("--served-model-name", default=None, help="the server's model name (default: the first it lists)")
    vllm.add_argument("--concurrency", type=int, default=16, help="requests in flight against --endpoint (default 16)")
    vllm.add_argument("--report-endpoint", default=None, help="where vLLM's connector reports deliveries (default: ipc:// in a temp folder; tcp://THIS_HOST:PORT when vLLM runs elsewhere)")
    vllm.add_argument("--report-timeout", type=float, default=300.0, help="spill: seconds to wait for the last files to be reported written")
    vllm.add_argument("--vllm-engine-args", default=None, help='in-process engine: JSON of more vllm.LLM arguments, e.g. \'{"gpu_memory_utilization": 0.8}\'')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.producer_id or f"producer-{args.rank}"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        config = ProduceConfig(**vars(args))
        if config.connect:
            signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
            return stream(config, stop=stop)
        report = produce(config, stop=stop)
    except (ValueError, TimeoutError, ConnectionError) as e:
        print(f"draftstream produce: error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    failed = report.validation is not None and not report.validation.passed
    return 1 if failed or report.stopped_early else 0


if __name__ == "__main__":
    raise SystemExit(main())
