"""What the loop reports: one vocabulary of metric names for Eagle-3 and P-EAGLE, the expected
acceptance length they imply, and console lines that say what the loss sums."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from trainer.data.batch import make_filler_batch, pack
from trainer.data.sources import InMemorySampleSource
from trainer.models.config import DraftConfig
from trainer.models.export import build_draft, save_draft
from trainer.models.losses import ChainAccuracy
from trainer.training.config import LoopConfig
from trainer.training.distributed import DistEnv
from trainer.training.loop import Trainer
from trainer.training.metrics import (
    STEP_METRICS,
    describe_loss,
    expected_acceptance_length,
    per_step,
    step_metric_names,
)

K = 3


@pytest.fixture(scope="module")
def captured(tiny_llama):
    from tests.trainer.tiny_capture import capture_samples

    return capture_samples(tiny_llama, 8, max_len=40)


def _draft(verifier, speculator_type):
    torch.manual_seed(0)
    config = DraftConfig(
        speculator_type=speculator_type,
        verifier_name_or_path=str(verifier),
        aux_layer_ids=[2, 2, 1],
        ttt_steps=K,
        num_depths=K,
    )
    return build_draft(config, None)


def test_expected_acceptance_length_of_a_hand_computed_case():
    # 1 (the verifier's bonus token) + 0.5 + 0.5*0.4 + 0.5*0.4*0.25
    assert expected_acceptance_length([0.5, 0.4, 0.25]) == pytest.approx(1.75)
    assert expected_acceptance_length([]) == 1.0
    assert expected_acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert expected_acceptance_length([0.0, 0.9]) == 1.0


def test_chain_accuracy_conditions_each_step_on_the_steps_before():
    """Four chains over three steps; chain 3 is unsupervised at step 1 and leaves the counts."""
    chains = ChainAccuracy(4, torch.device("cpu"))
    label = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    right = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    m = {}
    for k in range(3):
        m.update(chains.add(k, label[k], right[k]))
    assert [float(m[f"acc_{k}"]) for k in range(3)] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    # chains 0..2 stay supervised: right through step 0: {0, 1}; through 1: {0}; through 2: {0}
    assert [float(m[f"full_acc_{k}"]) for k in range(3)] == pytest.approx([3 / 4, 1 / 3, 1 / 3])
    assert [float(m[f"cond_acc_{k}"]) for k in range(3)] == pytest.approx([3 / 4, 1 / 2, 1.0])


def test_both_drafts_report_the_same_metric_names(tiny_llama, captured):
    batch = pack(captured, 400)
    eagle = _draft(tiny_llama, "eagle3")(batch).metrics
    peagle = _draft(tiny_llama, "peagle")(batch, generator=torch.Generator().manual_seed(0)).metrics
    expected = sorted(f"{name}_{k}" for name in STEP_METRICS for k in range(K))
    assert step_metric_names(eagle) == step_metric_names(peagle) == expected
    for k in range(K):  # P-EAGLE's earlier per-depth name is the same figure
        assert float(peagle[f"acc_{k}"]) == pytest.approx(float(peagle[f"position_{k}_acc"]))
    for metrics in (eagle, peagle):  # every chain is supervised at step 0: no condition yet
        assert float(metrics["full_acc_0"]) == pytest.approx(float(metrics["acc_0"]))
        assert float(metrics["cond_acc_0"]) == pytest.approx(float(metrics["acc_0"]))
        for k in range(1, K):
            assert 0.0 <= float(metrics[f"full_acc_{k}"]) <= float(metrics[f"full_acc_{k - 1}"]) + 1e-6


@pytest.mark.parametrize("speculator_type", ["eagle3", "peagle"])
def test_validation_logs_the_expected_acceptance_length(tiny_llama, captured, tmp_path, caplog, speculator_type):
    model = _draft(tiny_llama, speculator_type)
    trainer = Trainer(
        model=model,
        config=LoopConfig(
            save_path=str(tmp_path), epochs=1, lr=1e-3, total_seq_len=80, progress=False, log_every=1, noise_std=0.0
        ),
        env=DistEnv(),
        train_source=InMemorySampleSource(captured),
        train_ids=[s.sample_id for s in captured[2:]],
        val_ids=[0, 1],
        filler=make_filler_batch(num_layers=4, hidden_size=64, dtype=captured[0].hidden_states.dtype),
        save_draft=save_draft,
    )
    with caplog.at_level(logging.INFO, logger="trainer.training.metrics"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train, [val] = [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "val"]
    cond_acc = per_step({k[4:]: v for k, v in val.items()}, "cond_acc")
    assert len(cond_acc) == K
    assert val["val_accept_len"] == pytest.approx(expected_acceptance_length(cond_acc))
    names = {f"{name}_{k}" for name in STEP_METRICS for k in range(K)}
    assert names <= set(train[0]) and {f"val_{n}" for n in names} <= set(val)
    assert not {"full_acc", "position_0_acc"} & set(train[0])  # P-EAGLE's earlier names stay out of the log
    label, unit = describe_loss(model.config)
    assert f"validation: {label}" in caplog.text and "expected acceptance length" in caplog.text
    assert f"{label} " in caplog.text and f"per {unit} " in caplog.text


def test_the_console_says_what_the_loss_sums(tiny_llama):
    eagle = _draft(tiny_llama, "eagle3").config
    assert describe_loss(eagle) == ("loss (sum over 3 TTT steps)", "TTT step")
    decayed = DraftConfig(
        speculator_type="eagle3", verifier_name_or_path="x", aux_layer_ids=[2, 2, 1], ttt_step_loss_decay=0.8
    )
    assert describe_loss(decayed)[0] == "loss (sum over 3 TTT steps, step s weighted 0.8^s)"
    peagle = _draft(tiny_llama, "peagle").config
    assert describe_loss(peagle) == ("loss (mean over the sampled positions of 3 depths)", "depth")
