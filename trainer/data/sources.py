"""Where training samples come from: the prepared dataset, hidden-state files, and the pluggable
*sample source* that the loop asks for "the samples with these ids".

The loop never opens files itself. For each step it takes the plan's sample ids for its rank and
calls ``source.fetch(ids)``; a ``FileSampleSource`` reads ``hs_{i}.safetensors`` files (offline
training), an ``InMemorySampleSource`` serves tensors it already holds (tests, benchmarks), and the
streaming trainer plugs in its replay buffer with the same two methods. A source returns the
samples in the order asked, minus the ones it had to skip (reported, so the accounting record says
exactly what was trained).

``--on-missing`` decides what happens to a file that is absent, unreadable (truncated, not
safetensors, wrong tensors) or holds NaN/Inf: ``raise`` (default) stops with a clear error,
``skip`` drops the sample silently, ``warn`` drops it with a warning. Absent files are found when
the plan is made (one directory listing), so ``raise`` fails before the first step rather than
hours in. A file whose ``token_ids`` differ from the row's ``input_ids`` is always an error: it
means the files belong to another dataset or tokenizer, and skipping would hide that.

Noise (``--noise-std``) is uniform in [-std, std) on the auxiliary layers only (never the last
layer, which defines the target distribution), training only, drawn from a generator derived
from (seed, epoch, sample id, use index under ``--reuse``): the same sample gets the same noise
whichever rank trains it and whether or not the run was resumed in between.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from protocol.dataset import PreparedDataset
from protocol.hsfile import HIDDEN_STATES, HiddenStateFileError, hs_path, list_hs_indices, read_hs_file
from trainer.data.batch import PackedBatch, TrainSample
from trainer.data.plan import derive_seed

logger = logging.getLogger(__name__)

ON_MISSING = ("raise", "skip", "warn")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class TokenMismatchError(ValueError):
    """A hidden-state file whose token_ids are not its dataset row's input_ids."""


@dataclasses.dataclass(kw_only=True)
class FetchResult:
    samples: list[TrainSample]  # in the order asked, skipped ones left out
    skipped: list[int] = dataclasses.field(default_factory=list)


class SampleSource:
    """What the training loop needs from wherever samples come from. ``fetch`` and ``lengths``
    are the source's own; ``schedule``, ``snapshot`` and ``close`` matter to a streaming source
    (it must know ahead what will be fetched, reports live figures, and owns sockets) and are
    no-ops for sources that hold or read their samples."""

    def fetch(self, sample_ids: Sequence[int]) -> FetchResult:
        """The samples with these ids, in this order. May block until they are available."""
        raise NotImplementedError

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        """Token counts of these samples (what the batch plan packs by), without loading them."""
        raise NotImplementedError

    def schedule(self, epoch: int, sample_ids: Sequence[int]) -> None:
        """This process will fetch these samples of ``epoch`` next, in this order."""

    def abandon(self, epoch: int) -> None:
        """The rest of ``epoch``'s training fetches will not come (a time budget ended it); its
        validation fetches still will."""

    def snapshot(self) -> dict[str, float] | None:
        """Live figures for the log line (rates, buffer fill, leases); None: nothing to report."""
        return None

    def close(self, reason: str = "training finished") -> None:
        """Release what the source holds; idempotent."""


VAL_RATIO = 0.1  # --val-ratio default of `draftstream train` (and `draftstream eval --val-only`)


def split_train_val(num_rows: int, *, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split of row ids 0..num_rows-1 by ``seed``: (train ids, validation ids), each
    sorted. ``round(num_rows * val_ratio)`` rows go to validation, at least one training row stays."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if num_rows < 1:
        raise ValueError("the dataset is empty")
    num_val = min(round(num_rows * val_ratio), num_rows - 1)
    g = torch.Generator().manual_seed(derive_seed("split", seed))
    perm = torch.randperm(num_rows, generator=g).tolist()
    return sorted(perm[num_val:]), sorted(perm[:num_val])


class FileSampleSource(SampleSource):
    """Samples from ``hs_{i}.safetensors`` files beside a prepared dataset."""

    def __init__(
        self,
        dataset: PreparedDataset,
        hidden_states_path: str | os.PathLike,
        *,
        on_missing: str = "raise",
        check_finite: bool = True,
    ):
        if on_missing not in ON_MISSING:
            raise ValueError(f"--on-missing must be one of {ON_MISSING}, got {on_missing!r}")
        self.dataset = dataset
        self.directory = Path(hidden_states_path)
        if not self.directory.is_dir():
            raise ValueError(f"--hidden-states-path {self.directory}: no such directory")
        self.on_missing = on_missing
        self.check_finite = check_finite

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return self.dataset.lengths(sample_ids)

    def available(self, sample_ids: Sequence[int]) -> list[int]:
        """The ids whose files exist, applying ``--on-missing`` to the others (call once, before
        planning, so the plan holds only trainable samples)."""
        present = set(list_hs_indices(self.directory))
        missing = [i for i in sample_ids if i not in present]
        if missing:
            shown = ", ".join(hs_path(self.directory, i).name for i in missing[:5])
            message = (
                f"{len(missing)} of {len(sample_ids)} hidden-state files missing in {self.directory} (first: {shown})"
            )
            if self.on_missing == "raise":
                raise HiddenStateFileError(f"{message}; generate them or pass --on-missing skip|warn")
            if self.on_missing == "warn":
                logger.warning("%s; leaving them out of the plan", message)
        return [i for i in sample_ids if i in present]

    def peek(self, sample_id: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape [T, L, H] and dtype of a file's hidden states, from its header only."""
        path = hs_path(self.directory, sample_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(HIDDEN_STATES)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        except (SafetensorError, OSError, RuntimeError) as e:
            raise HiddenStateFileError(f"{path}: unreadable ({e})") from e
        return shape, _SAFETENSORS_DTYPES[dtype]

    def load(self, sample_id: int) -> TrainSample:
        """Read and check one sample; raises ``HiddenStateFileError`` or ``TokenMismatchError``."""
        input_ids, loss_mask = self.dataset.row(sample_id)
        path = hs_path(self.directory, sample_id)
        token_ids, hidden_states = read_hs_file(path, check_finite=self.check_finite)
        if not torch.equal(token_ids, input_ids):
            if token_ids.shape != input_ids.shape:
                detail = f"{token_ids.shape[0]} tokens in the file, {input_ids.shape[0]} in the row"
            else:
                first = int((token_ids != input_ids).nonzero()[0, 0])
                detail = f"first difference at position {first}"
            raise TokenMismatchError(
                f"{path}: token_ids differ from row {sample_id} of {self.dataset.path} ({detail}); "
                "the files were made from another dataset or tokenizer"
            )
        return TrainSample(sample_id=sample_id, token_ids=token_ids, loss_mask=loss_mask, hidden_states=hidden_states)

    def fetch(self, sample_ids: Sequence[int]) -> FetchResult:
        samples, skipped = [], []
        for sid in sample_ids:
            try:
                samples.append(self.load(sid))
            except TokenMismatchError:
                raise
            except HiddenStateFileError as e:
                if self.on_missing == "raise":
                    raise HiddenStateFileError(f"{e}; pass --on-missing skip|warn to train without it") from e
                if self.on_missing == "warn":
                    logger.warning("skipping sample %d: %s", sid, e)
                skipped.append(sid)
        return FetchResult(samples=samples, skipped=skipped)


class InMemorySampleSource(SampleSource):
    """Samples held in memory, by id (tests, benchmarks)."""

    def __init__(self, samples: Sequence[TrainSample]):
        self._samples = {s.sample_id: s for s in samples}

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return [int(self._samples[i].token_ids.shape[0]) for i in sample_ids]

    def fetch(self, sample_ids: Sequence[int]) -> FetchResult:
        return FetchResult(samples=[self._samples[i] for i in sample_ids])


def add_aux_noise_(
    batch: PackedBatch, *, std: float, seed: int, epoch: int, uses: Mapping[int, int] | None = None
) -> None:
    """Add uniform noise in [-std, std) to the auxiliary layers (all but the last) of every
    document of a packed batch, in place. Each document's noise comes from a generator derived
    from (seed, epoch, sample id) and, for a sample trained on again in the same epoch
    (``--reuse``), its use index (``uses[sample id]``, from ``BatchPlan.uses_at``), so every use
    sees other noise. Drawn on the batch's device."""
    if std == 0.0:
        return
    hidden_BNLH = batch.hidden_states
    device = hidden_BNLH.device
    doc_ids = batch.document_ids[0]
    for doc, sid in enumerate(batch.sample_ids):
        positions = (doc_ids == doc).nonzero().flatten()
        if positions.numel() == 0:
            continue
        start, end = int(positions[0]), int(positions[-1]) + 1
        aux = hidden_BNLH[0, start:end, :-1]
        use = uses.get(sid, 0) if uses is not None else 0
        parts = ("noise", seed, epoch, sid) if use == 0 else ("noise", seed, epoch, sid, use)  # use 0: as without reuse
        g = torch.Generator(device=device).manual_seed(derive_seed(*parts))
        noise = torch.rand(aux.shape, generator=g, device=device, dtype=torch.float32)
        hidden_BNLH[0, start:end, :-1] = (aux.float() + (2.0 * noise - 1.0) * std).to(aux.dtype)
