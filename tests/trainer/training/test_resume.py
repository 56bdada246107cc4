"""Exact resume: a real training process SIGTERMed halfway and started again ends where an
uninterrupted run ends: same weights, same samples at the same steps, none twice."""

from __future__ import annotations

import signal
import sys

import pytest

from protocol.dataset import PreparedDataset
from tests.trainer.resume_harness import run_resume_test
from trainer.data.plan import BatchPlan
from trainer.data.sources import split_train_val

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _flags(offline, save, *extra):
    model, data, hs = offline
    return [
        "--verifier-name-or-path",
        str(model),
        "--data-path",
        str(data),
        "--hidden-states-path",
        str(hs),
        "--save-path",
        str(save),
        "--draft-vocab-size",
        "256",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--total-seq-len",
        "64",
        "--on-missing",
        "raise",
        "--noise-std",
        "0.05",
        "--scheduler-type",
        "cosine",
        "--scheduler-warmup-steps",
        "3",
        "--no-progress",
        "--log-every",
        "1000",
        *extra,
    ]


def _train_ids_and_steps(offline, world_size):
    """What the runs below will train: the split's training ids, and the steps of 2 epochs
    (the plan is a pure function of the data and flags, so the test can make it too)."""
    dataset = PreparedDataset(offline[1])
    ids = split_train_val(len(dataset), val_ratio=0.1, seed=42)[0]
    plans = [
        BatchPlan.build(
            sample_ids=ids, lengths=dataset.lengths(ids), seed=42, epoch=e, world_size=world_size, total_seq_len=64
        )
        for e in range(2)
    ]
    return ids, sum(p.num_steps for p in plans)


def test_sigterm_halfway_then_restart_matches_an_uninterrupted_run(offline_dataset, tmp_path):
    ids, num_steps = _train_ids_and_steps(offline_dataset, 1)
    outcome = run_resume_test(
        lambda save: [sys.executable, "-m", "trainer.train", *_flags(offline_dataset, save)],
        tmp_path,
        stop_after_step=num_steps // 2,
    )
    assert outcome.interrupted_returncode == 128 + signal.SIGTERM
    outcome.assert_same_training(atol=1e-6, expected_ids=ids)


def test_two_rank_fsdp_run_resumes_exactly_after_sigterm(offline_dataset, tmp_path):
    """torchrun forwards the SIGTERM to both ranks; they agree on the step to stop after."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer.train",
    ]
    ids, num_steps = _train_ids_and_steps(offline_dataset, 2)
    outcome = run_resume_test(
        lambda save: [*torchrun, *_flags(offline_dataset, save, "--speculator-type", "peagle", "--num-depths", "3")],
        tmp_path,
        stop_after_step=num_steps // 2,
    )
    outcome.assert_same_training(atol=1e-5, expected_ids=ids)
