"""Offline training inputs built inside tests: a prepared dataset (the ``draftstream prepare``
format: input_ids, loss_mask, seq_len, torch format, token_freq.pt) and ``hs_{i}.safetensors``
files captured from a tiny target with vLLM's layer-id semantics (``tiny_capture``).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from protocol.hsfile import write_hs_file
from trainer.data.batch import TrainSample


def write_prepared_dataset(directory: str | Path, samples: list[TrainSample]) -> Path:
    """Rows in sample-id order (sample ids must be 0..n-1), plus token_freq.pt."""
    import datasets

    directory = Path(directory)
    rows = sorted(samples, key=lambda s: s.sample_id)
    assert [s.sample_id for s in rows] == list(range(len(rows)))
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [s.token_ids.tolist() for s in rows],
            "loss_mask": [s.loss_mask.int().tolist() for s in rows],
            "seq_len": [int(s.token_ids.shape[0]) for s in rows],
        }
    )
    ds.set_format("torch")
    ds.save_to_disk(str(directory))
    freq = collections.Counter()
    for s in rows:
        freq.update(s.token_ids[s.loss_mask.bool()].tolist())
    torch.save({int(k): int(v) for k, v in freq.items()}, directory / "token_freq.pt")
    return directory


def write_hidden_state_files(directory: str | Path, samples: list[TrainSample]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for s in samples:
        write_hs_file(directory, s.sample_id, s.token_ids, s.hidden_states, fsync=False)
    return directory


def make_offline_data(root: str | Path, model_dir: str | Path, num: int = 24, max_len: int = 48) -> tuple[Path, Path]:
    """(data_path, hidden_states_path) under ``root`` for ``num`` captured conversations."""
    from tests.trainer.tiny_capture import capture_samples

    samples = capture_samples(model_dir, num, max_len=max_len)
    root = Path(root)
    data = write_prepared_dataset(root / "data", samples)
    hs = write_hidden_state_files(root / "data" / "hidden_states", samples)
    return data, hs


@pytest.fixture(scope="session")
def offline_dataset(tiny_llama, tmp_path_factory):
    """32 captured conversations of the tiny Llama as a prepared dataset + hs files:
    ``(model_dir, data_path, hidden_states_path)``. Import it into a test module to use it; the
    modules that do share one copy per session (kept under the session's base temp dir)."""
    root = tmp_path_factory.getbasetemp() / "offline-dataset"
    if not (root / "ready").is_file():
        make_offline_data(root, tiny_llama, num=32, max_len=40)
        (root / "ready").touch()
    return tiny_llama, root / "data", root / "data" / "hidden_states"
