"""``draftstream produce --spill DIR``: capture this rank's rows of a prepared dataset into files.

::

    prepared dataset (Arrow)            one producer process (rank R of W)
      row i, i % W == R  ──────────>  backend: HFCapture               SpillSink ── queue ──> SpillWriter thread
      not yet on disk                   batch ─> forward + hooks ───>    (bounded)            hs_{i}.safetensors
                                        Sample(i, token_ids, mask,
                                               hidden [T, L, H])
                          ──────────>  backend: VLLMBackend (--backend vllm) ─> vLLM's DraftstreamConnector
                                        rows + file://DIR                         writes hs_{i}.safetensors itself

With ``--backend hf`` the loop (``run_producer``) hands each sample to the spill sink
(``producer.spill.SpillSink``); with ``--backend vllm`` the engine's connector writes the files and
this process only submits rows and collects delivery reports (``spill_rows``, a few batches in flight).
Runs are resumable: indices whose ``hs_{i}.safetensors`` is complete are skipped, temporaries of
killed writers are removed (only this rank's), and ``--validate`` re-reads every file of this rank
against the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from producer.backend import CaptureBackend, CaptureRow, PushJob, plan_batches
from producer.run_config import ProduceConfig, captured_layout, make_backend
from producer.spill import SpillConfig, SpillSink
from protocol.dataset import PreparedDataset
from protocol.hsfile import HiddenStateFileError, clean_partial_files, hs_path, list_hs_indices, read_hs_file

if TYPE_CHECKING:
    from producer.vllm.backend import VLLMBackend

log = logging.getLogger(__name__)


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


def iter_rows(data: PreparedDataset, indices: Iterable[int]) -> Iterator[CaptureRow]:
    """Prepared rows as ``CaptureRow``s, ``sample_id`` = dataset row index."""
    for i in indices:
        yield CaptureRow(i, *data.row(i))


def run_producer(
    backend: CaptureBackend,
    rows: Iterable[CaptureRow],
    sink: SpillSink,
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


def validate_spill(
    directory: str | Path, data: PreparedDataset, indices: Iterable[int], *, num_slots: int, hidden_size: int
) -> ValidationReport:
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
            input_ids, _ = data.row(i)
            _, hidden_TLH = read_hs_file(hs_path(directory, i), expected_token_ids=input_ids)
            if tuple(hidden_TLH.shape[1:]) != (num_slots, hidden_size):
                raise HiddenStateFileError(
                    f"hidden_states {tuple(hidden_TLH.shape)}, expected [T, {num_slots}, {hidden_size}]"
                )
        except HiddenStateFileError as e:
            report.bad[i] = str(e)
            continue
        report.num_ok += 1
    return report


def _spill_with_vllm(
    config: ProduceConfig,
    data: PreparedDataset,
    todo: list[int],
    spill: Path,
    report: ProduceReport,
    *,
    layer_ids: list[int],
    stop,
) -> set[int]:
    """``--backend vllm --spill``: vLLM's connector writes the files; returns the rows skipped for NaN/Inf."""
    from tqdm import tqdm

    backend = make_backend(config, layer_ids=layer_ids, spill_dir=spill)
    log.info("target: %s", backend.describe())
    try:
        with tqdm(total=len(todo), unit="row", desc="capture (vllm)", dynamic_ncols=True) as bar:
            stats = spill_rows(
                backend,
                iter_rows(data, todo),
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
        stats.failed.update(
            {
                i: "hidden states contain NaN or Inf (pass --skip-nonfinite to skip and count such rows)"
                for i in stats.nonfinite_ids
            }
        )
    if stats.failed:
        first = sorted(stats.failed.items())[:5]
        raise ValueError(
            f"{len(stats.failed)} rows were not written; first: " + "; ".join(f"row {i}: {why}" for i, why in first)
        )
    return set(stats.nonfinite_ids)


def produce(config: ProduceConfig, *, stop: threading.Event | None = None) -> ProduceReport:
    """Spill run: capture this rank's missing rows into ``config.spill``, then optionally validate."""
    data = PreparedDataset(config.data, flag="--data")
    layer_ids, hidden_size = captured_layout(config)
    spill = Path(config.spill)
    spill.mkdir(parents=True, exist_ok=True)

    report = ProduceReport()
    selected = select_indices(len(data), max_samples=config.max_samples, world_size=config.world_size, rank=config.rank)
    report.num_selected = len(selected)
    report.num_partial_removed = clean_partial_files(spill, indices=selected)
    done = set(list_hs_indices(spill))
    todo = [i for i in selected if i not in done]
    report.num_already_done = report.num_selected - len(todo)
    log.info(
        "%d rows for this rank, %d already on disk, %d to capture", len(selected), report.num_already_done, len(todo)
    )

    sink = None
    skipped: set[int] = set()
    if todo and config.backend == "vllm":
        start = time.perf_counter()
        skipped = _spill_with_vllm(config, data, todo, spill, report, layer_ids=layer_ids, stop=stop)
        report.seconds = time.perf_counter() - start
    elif todo:
        start = time.perf_counter()
        backend = make_backend(config, layer_ids=layer_ids)
        log.info("target: %s", backend.describe())
        sink = SpillSink(SpillConfig(directory=str(spill), skip_nonfinite=config.skip_nonfinite))
        try:
            report.num_captured, report.num_tokens = run_producer(
                backend, iter_rows(data, todo), sink, total=len(todo), stop=stop
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
        report.validation = validate_spill(spill, data, selected, num_slots=len(layer_ids), hidden_size=hidden_size)
        # Rows skipped on purpose (--skip-nonfinite) have no file: that is not a validation failure.
        skipped |= set(sink.stats.skipped_nonfinite_ids) if sink is not None else set()
        report.validation.missing = [i for i in report.validation.missing if i not in skipped]
    return report


# ---- spill through vLLM: the connector writes the files --------------------------------------

SPILL_DEPTH = 4  # batches of --max-batch-tokens a vLLM spill keeps in flight


@dataclasses.dataclass
class PushSpillStats:
    num_submitted: int = 0  # rows the engine ran
    num_tokens: int = 0
    num_written: int = 0
    num_nonfinite: int = 0
    nonfinite_ids: list[int] = dataclasses.field(default_factory=list)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)  # sample id -> why
    stopped_early: bool = False


def spill_rows(
    backend: VLLMBackend,
    rows: Iterable[CaptureRow],
    directory: str | os.PathLike,
    *,
    max_batch_tokens: int,
    depth: int = SPILL_DEPTH,
    report_timeout_seconds: float = 300.0,
    stop: threading.Event | None = None,
    progress=None,
) -> PushSpillStats:
    """Submit rows with destination ``file://DIRECTORY``, up to ``depth`` batches of
    ``max_batch_tokens`` in flight (the engine runs the next while we take the last one's results),
    and wait until the connector has reported every file written (or failed), at most
    ``report_timeout_seconds`` after the last result. ``stop``: submit no more, finish what runs."""
    destination = "file://" + str(Path(directory).resolve())
    stats = PushSpillStats()

    def collect(reports) -> None:
        for report in reports:
            if report.sample_id in stats.failed:
                continue  # refused on submission; its file is removed below
            if report.ok:
                stats.num_written += 1
            elif "NaN or Inf" in report.reason:
                stats.num_nonfinite += 1
                stats.nonfinite_ids.append(report.sample_id)
            else:
                stats.failed[report.sample_id] = report.reason
            if progress is not None:
                progress.update(1)

    batches = plan_batches(rows, max_batch_tokens, padded=False)  # vLLM packs without padding
    batch = next(batches, None)
    in_flight = 0  # tokens submitted whose result is not back
    while batch is not None or backend.num_in_flight:
        if batch is not None and stop is not None and stop.is_set():
            stats.stopped_early, batch = True, None
        while batch is not None and (not in_flight or in_flight + _tokens(batch) <= depth * max_batch_tokens):
            backend.submit([PushJob(row=row, destination=destination) for row in batch])
            in_flight += _tokens(batch)
            batch = next(batches, None)
        for result in backend.poll_results(timeout_seconds=0.05):
            stats.num_submitted += 1
            stats.num_tokens += len(result.job.row.input_ids)
            in_flight -= len(result.job.row.input_ids)
            if result.error:
                stats.failed[int(result.job.row.sample_id)] = result.error
                if progress is not None:
                    progress.update(1)
        collect(backend.poll_reports())
    deadline = time.monotonic() + report_timeout_seconds
    while backend.num_unreported and time.monotonic() < deadline:
        collect(backend.poll_reports(timeout_seconds=min(1.0, max(0.01, deadline - time.monotonic()))))
    for sample_id in backend.forget_unreported():
        stats.failed.setdefault(
            sample_id,
            f"no delivery report within {report_timeout_seconds:.0f}s (--report-timeout); can the connector reach "
            f"{backend.report_endpoint} (--report-endpoint)?",
        )
    # A resumed run skips rows whose file exists: a failed row must not leave one behind.
    for sample_id in stats.failed:
        hs_path(directory, sample_id).unlink(missing_ok=True)
    return stats


def _tokens(batch: list[CaptureRow]) -> int:
    return sum(len(row.input_ids) for row in batch)
