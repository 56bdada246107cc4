"""Training data from files: the prepared dataset, hs files, --on-missing, token checks, the
train/validation split and the training-only noise."""

from __future__ import annotations

import logging

import pytest
import torch

from protocol.dataset import PreparedDataset
from protocol.hsfile import HiddenStateFileError, hs_path, write_hs_file
from tests.trainer.offline_data import write_hidden_state_files, write_prepared_dataset
from trainer.data.batch import TrainSample, pack
from trainer.data.sources import (
    FileSampleSource,
    InMemorySampleSource,
    TokenMismatchError,
    add_aux_noise_,
    split_train_val,
)


def _samples(num=6, layers=4, hidden=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(num):
        n = 5 + 3 * i
        out.append(
            TrainSample(
                sample_id=i,
                token_ids=torch.randint(0, 100, (n,), generator=g),
                loss_mask=torch.arange(n) >= 2,
                hidden_states=torch.randn(n, layers, hidden, generator=g).to(dtype),
            )
        )
    return out


@pytest.fixture
def offline(tmp_path):
    samples = _samples()
    data = write_prepared_dataset(tmp_path / "data", samples)
    hs = write_hidden_state_files(tmp_path / "hs", samples)
    return samples, PreparedDataset(data), hs


def test_file_source_returns_what_was_written(offline):
    samples, dataset, hs = offline
    source = FileSampleSource(dataset, hs)
    result = source.fetch([3, 1])
    assert [s.sample_id for s in result.samples] == [3, 1] and result.skipped == []
    for got, want in zip(result.samples, [samples[3], samples[1]]):
        assert torch.equal(got.token_ids, want.token_ids)
        assert torch.equal(got.loss_mask, want.loss_mask)
        assert torch.equal(got.hidden_states, want.hidden_states)
    assert source.lengths([0, 5]) == [5, 20]
    assert source.peek(2) == ((11, 4, 8), torch.bfloat16)


def test_missing_files_raise_before_training_by_default(offline):
    _, dataset, hs = offline
    hs_path(hs, 2).unlink()
    hs_path(hs, 4).unlink()
    with pytest.raises(HiddenStateFileError, match=r"2 of 6 hidden-state files missing.*hs_2.*--on-missing"):
        FileSampleSource(dataset, hs).available(list(range(6)))


def test_skip_leaves_missing_files_out_of_the_plan_silently(offline, caplog):
    _, dataset, hs = offline
    hs_path(hs, 2).unlink()
    with caplog.at_level(logging.WARNING):
        assert FileSampleSource(dataset, hs, on_missing="skip").available(list(range(6))) == [0, 1, 3, 4, 5]
    assert not caplog.records


def test_warn_leaves_missing_files_out_with_a_warning(offline, caplog):
    _, dataset, hs = offline
    hs_path(hs, 2).unlink()
    with caplog.at_level(logging.WARNING):
        assert FileSampleSource(dataset, hs, on_missing="warn").available(list(range(6))) == [0, 1, 3, 4, 5]
    assert "hs_2.safetensors" in caplog.text


def test_a_file_lost_after_planning_follows_on_missing(offline, caplog):
    _, dataset, hs = offline
    hs_path(hs, 1).unlink()
    with pytest.raises(HiddenStateFileError, match="--on-missing skip"):
        FileSampleSource(dataset, hs).fetch([0, 1])
    result = FileSampleSource(dataset, hs, on_missing="skip").fetch([0, 1, 2])
    assert [s.sample_id for s in result.samples] == [0, 2] and result.skipped == [1]
    with caplog.at_level(logging.WARNING):
        result = FileSampleSource(dataset, hs, on_missing="warn").fetch([1, 2])
    assert result.skipped == [1] and "skipping sample 1" in caplog.text


def test_truncated_and_non_finite_files_count_as_unreadable(offline):
    samples, dataset, hs = offline
    path = hs_path(hs, 3)
    path.write_bytes(path.read_bytes()[:100])
    bad = samples[4].hidden_states.clone()
    bad[0, 0, 0] = float("nan")
    write_hs_file(hs, 4, samples[4].token_ids, bad, fsync=False)
    with pytest.raises(HiddenStateFileError, match="unreadable"):
        FileSampleSource(dataset, hs).fetch([3])
    with pytest.raises(HiddenStateFileError, match="NaN"):
        FileSampleSource(dataset, hs).fetch([4])
    result = FileSampleSource(dataset, hs, on_missing="skip").fetch([3, 4, 5])
    assert result.skipped == [3, 4] and [s.sample_id for s in result.samples] == [5]


def test_token_mismatch_is_an_error_even_when_skipping(offline):
    samples, dataset, hs = offline
    wrong = samples[2].token_ids.clone()
    wrong[4] += 1
    write_hs_file(hs, 2, wrong, samples[2].hidden_states, fsync=False)
    with pytest.raises(TokenMismatchError, match="first difference at position 4"):
        FileSampleSource(dataset, hs, on_missing="skip").fetch([2])
    # A file from a row of another length.
    write_hs_file(hs, 1, samples[3].token_ids, samples[3].hidden_states, fsync=False)
    with pytest.raises(TokenMismatchError, match="14 tokens in the file, 8 in the row"):
        FileSampleSource(dataset, hs, on_missing="warn").fetch([1])


def test_bad_paths_name_the_flag(tmp_path, offline):
    _, dataset, _ = offline
    with pytest.raises(ValueError, match="--data-path"):
        PreparedDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--hidden-states-path"):
        FileSampleSource(dataset, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--on-missing"):
        FileSampleSource(dataset, tmp_path, on_missing="generate")


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_train_val(100, val_ratio=0.1, seed=7)
    assert (train, val) == split_train_val(100, val_ratio=0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_train_val(100, val_ratio=0.1, seed=8)[1] != val
    assert split_train_val(5, val_ratio=0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_train_val(2, val_ratio=0.9, seed=0)[0]) == 1  # one training row always stays
    with pytest.raises(ValueError, match="--val-ratio"):
        split_train_val(10, val_ratio=1.0, seed=0)


def test_noise_touches_only_aux_layers_within_bounds():
    samples = _samples(3, dtype=torch.float32)
    batch = pack(samples, 100)
    clean = batch.hidden_states.clone()
    add_aux_noise_(batch, std=0.05, seed=1, epoch=0)
    delta = batch.hidden_states - clean
    assert torch.equal(delta[..., -1, :], torch.zeros_like(delta[..., -1, :]))  # last layer = the target
    real = batch.document_ids[0] >= 0
    assert delta[0, real, :-1].abs().max() <= 0.05
    assert delta[0, real, :-1].abs().mean() > 0.01
    assert torch.equal(delta[0, ~real], torch.zeros_like(delta[0, ~real]))


def test_noise_depends_on_sample_and_epoch_not_on_packing():
    samples = _samples(3, dtype=torch.float32)
    a = pack([samples[0], samples[1]], 100)
    b = pack([samples[2], samples[1]], 100)
    add_aux_noise_(a, std=0.1, seed=5, epoch=2)
    add_aux_noise_(b, std=0.1, seed=5, epoch=2)
    n0, n1, n2 = (s.token_ids.shape[0] for s in samples)
    assert torch.equal(a.hidden_states[0, n0 : n0 + n1], b.hidden_states[0, n2 : n2 + n1])
    c = pack([samples[1]], 100)
    add_aux_noise_(c, std=0.1, seed=5, epoch=3)
    assert not torch.equal(c.hidden_states[0, :n1], a.hidden_states[0, n0 : n0 + n1])


def test_each_reuse_of_a_sample_draws_other_noise_and_the_first_use_the_usual_noise():
    samples = _samples(2, dtype=torch.float32)
    n0 = samples[0].token_ids.shape[0]
    noised = {}
    for use in (None, 0, 1, 2):
        batch = pack(samples, 100)
        add_aux_noise_(batch, std=0.1, seed=5, epoch=2, uses=None if use is None else {samples[0].sample_id: use})
        noised[use] = batch.hidden_states[0, :n0]
    assert torch.equal(noised[None], noised[0])  # without --reuse nothing changes
    assert not torch.equal(noised[0], noised[1]) and not torch.equal(noised[1], noised[2])


def test_zero_noise_changes_nothing():
    batch = pack(_samples(2), 100)
    clean = batch.hidden_states.clone()
    add_aux_noise_(batch, std=0.0, seed=1, epoch=0)
    assert torch.equal(batch.hidden_states, clean)


def test_in_memory_source_serves_by_id():
    samples = _samples(4)
    source = InMemorySampleSource(samples)
    assert [s.sample_id for s in source.fetch([2, 0]).samples] == [2, 0]
    assert source.lengths([1, 3]) == [8, 14]


def test_pack_copies_framed_samples_like_plain_ones_including_truncation():
    """Streamed samples arrive as FramedTensors (views of received frames); pack() is their one copy."""
    from protocol.codec import FramedTensor

    g = torch.Generator().manual_seed(0)
    plain = [
        TrainSample(
            sample_id=i,
            token_ids=torch.arange(n),
            loss_mask=torch.ones(n, dtype=torch.bool),
            hidden_states=torch.randn(n, 3, 8, generator=g),
        )
        for i, n in enumerate([10, 7, 30])
    ]
    framed = [
        TrainSample(
            sample_id=s.sample_id,
            token_ids=s.token_ids,
            loss_mask=s.loss_mask,
            hidden_states=FramedTensor(list(s.hidden_states.reshape(-1).split(13)), s.hidden_states.shape),
        )
        for s in plain
    ]
    cases = [(plain, framed, 64, 50), (plain[2:], framed[2:], 25, None)]  # the second truncates 30 tokens to 25
    for samples_plain, samples_framed, total_seq_len, pad_to in cases:
        expected = pack(samples_plain, total_seq_len, pad_to=pad_to)
        got = pack(samples_framed, total_seq_len, pad_to=pad_to)
        for name in ("input_ids", "hidden_states", "loss_mask", "position_ids", "document_ids"):
            assert torch.equal(getattr(expected, name), getattr(got, name)), name
