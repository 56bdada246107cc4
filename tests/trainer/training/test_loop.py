"""The training loop in one process on a real tiny Eagle-3 draft: steps, accounting, fillers,
validation without noise, schedules, --max-steps checkpoints, signals, Muon."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import torch

from trainer.data.batch import make_filler_batch
from trainer.data.sources import InMemorySampleSource, SampleSource
from trainer.models.config import DraftConfig
from trainer.models.export import build_draft, load_draft, save_draft
from trainer.training import checkpoint as ckpt
from trainer.training.accounting import read_accounting, trained_counts
from trainer.training.config import LoopConfig
from trainer.training.distributed import DistEnv
from trainer.training.loop import Trainer
from trainer.training.optim import lr_factor

HIDDEN = 64


@pytest.fixture(scope="module")
def captured(tiny_llama):
    from tests.trainer.tiny_capture import capture_samples

    return capture_samples(tiny_llama, 12, max_len=40)


def _model(verifier, seed=0, speculator_type="eagle3"):
    torch.manual_seed(seed)
    config = DraftConfig(
        speculator_type=speculator_type, verifier_name_or_path=str(verifier), aux_layer_ids=[2, 2, 1], num_depths=3
    )
    return build_draft(config, None)


def _trainer(model, samples, save_path, *, val=(), **overrides):
    kw = dict(
        save_path=str(save_path),
        epochs=1,
        lr=1e-3,
        total_seq_len=80,
        seed=3,
        scheduler_type="none",
        progress=False,
        log_every=1000,
        noise_std=0.0,
    )
    kw.update(overrides)
    source = InMemorySampleSource(samples)
    return Trainer(
        model=model,
        config=LoopConfig(**kw),
        env=DistEnv(),
        train_source=source,
        train_ids=[s.sample_id for s in samples if s.sample_id not in val],
        val_ids=list(val),
        filler=make_filler_batch(num_layers=4, hidden_size=HIDDEN, dtype=samples[0].hidden_states.dtype),
        save_draft=save_draft,
    )


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_lowers_the_loss_on_a_small_set(tiny_llama, captured, tmp_path):
    trainer = _trainer(_model(tiny_llama), captured[:4], tmp_path, epochs=12, lr=3e-3)
    result = trainer.fit()
    assert result.status == "completed"
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert {"full_acc_0", "cond_acc_2", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])


def test_accounting_lists_every_planned_sample_once_per_epoch(tiny_llama, captured, tmp_path):
    trainer = _trainer(_model(tiny_llama), captured, tmp_path, epochs=2, grad_accum_steps=2, val=[0, 1])
    trainer.fit()
    records = read_accounting(tmp_path)
    for epoch in range(2):
        ids = [sid for r in records if r["epoch"] == epoch for sid in r["sample_ids"]]
        assert sorted(ids) == list(range(2, 12))
        plan = trainer.plans[epoch]
        for r in (r for r in records if r["epoch"] == epoch):
            assert r["sample_ids"] == plan.batches_for(r["logical_rank"], r["step"])
    assert set(trained_counts(records).values()) == {2}
    assert (tmp_path / "0").is_dir() and (tmp_path / "1").is_dir()
    assert os.readlink(tmp_path / ckpt.BEST_LINK) in ("0", "1")


def test_an_empty_plan_slot_trains_like_it_was_not_there(tiny_llama, captured, tmp_path):
    """One batch planned on 2 logical ranks: rank 1 runs a zero-weight filler, and the update
    equals a 1-rank run of that batch alone."""
    one = captured[:1]
    alone = _trainer(_model(tiny_llama), one, tmp_path / "a", grad_accum_steps=1)
    alone.fit()
    padded = _trainer(_model(tiny_llama), one, tmp_path / "b", grad_accum_steps=2)
    assert padded.plans[0].batches_for(1, 0) == []
    padded.fit()
    a, b = _weights(alone.model), _weights(padded.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert [r["sample_ids"] for r in read_accounting(tmp_path / "b")] == [[0], []]


def test_validation_sees_no_noise(tiny_llama, captured, tmp_path):
    quiet = _trainer(_model(tiny_llama), captured, tmp_path / "q", val=[0, 1, 2], noise_std=0.0)
    loud = _trainer(_model(tiny_llama), captured, tmp_path / "l", val=[0, 1, 2], noise_std=5.0)
    assert quiet.validate() == loud.validate()
    micros = quiet.fetch_step(0, 0)
    quiet_step = quiet.run_step(0, 0, micros)
    loud_step = loud.run_step(0, 0, micros)
    assert quiet_step.loss != loud_step.loss  # the noise does reach training


def test_max_steps_mid_epoch_saves_the_cursor_and_a_later_run_continues(tiny_llama, captured, tmp_path):
    samples = captured[:10]
    straight = _trainer(_model(tiny_llama), samples, tmp_path / "s", max_steps=6)
    straight.fit()
    first = _trainer(_model(tiny_llama), samples, tmp_path / "r", max_steps=3)
    assert first.fit().status == "max_steps"
    state = ckpt.read_training_state(tmp_path / "r" / "0")
    assert (state["global_step"], state["step_in_epoch"], state["epoch_complete"]) == (3, 3, False)
    assert ckpt.find_resume_checkpoint(tmp_path / "r") == tmp_path / "r" / "0"

    model = load_draft(tmp_path / "r" / "0", verifier_name_or_path=str(tiny_llama))
    ckpt.load_master_weights(model, tmp_path / "r" / "0")
    second = _trainer(model, samples, tmp_path / "r", max_steps=6)
    second.restore(tmp_path / "r" / "0")
    second.fit()
    a, b = _weights(straight.model), _weights(second.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [(r["step"], r["sample_ids"]) for r in read_accounting(tmp_path / "r")]
    assert steps == [(r["step"], r["sample_ids"]) for r in read_accounting(tmp_path / "s")]


def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tiny_llama, captured, tmp_path):
    trainer = _trainer(_model(tiny_llama), captured, tmp_path, epochs=3, total_seq_len=40)
    inner = trainer.train_source
    calls = []

    class Signalling(SampleSource):
        def lengths(self, ids):
            return inner.lengths(ids)

        def fetch(self, ids):
            calls.append(ids)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # lands on the main thread's handler
            return inner.fetch(ids)

    trainer.train_source = Signalling()
    previous = signal.getsignal(signal.SIGTERM)
    result = trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert result.status == "interrupted" and result.signal == signal.SIGTERM
    state = ckpt.read_training_state(tmp_path / ckpt.MID_EPOCH_NAME)
    assert state["global_step"] == result.global_step < trainer.total_steps
    assert len(read_accounting(tmp_path)) == result.global_step
    assert threading.active_count() < 5  # the prefetch thread is gone


@pytest.mark.parametrize("kind", ["linear", "cosine", "none"])
def test_schedules_warm_up_then_decay(kind):
    factors = [lr_factor(s, kind=kind, warmup=4, total=20, cycles=0.5) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    if kind == "none":
        assert set(factors[4:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.2


def test_muon_trains_the_matrices_and_adamw_the_rest(tiny_llama, captured, tmp_path):
    trainer = _trainer(_model(tiny_llama), captured[:4], tmp_path, optimizer="muon", max_steps=2)
    assert [type(o).__name__ for o in trainer.optimizers] == ["Muon", "AdamW"]
    before = _weights(trainer.model)
    trainer.fit()
    after = _weights(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in ("fc.weight", "layers.0.self_attn.q_proj.weight"))
    sched = torch.load(tmp_path / "0" / ckpt.SCHEDULER_FILE, weights_only=True)
    assert len(sched["schedulers"]) == 2


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--scheduler-type"):
        LoopConfig(save_path="x", scheduler_type="step")
    with pytest.raises(ValueError, match="--grad-accum-steps"):
        LoopConfig(save_path="x", grad_accum_steps=0)
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="--tracker tensorboard.*pip install tensorboard"):
            LoopConfig(save_path="x", tracker="tensorboard")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="--tracker wandb"):
            LoopConfig(save_path="x", tracker="wandb")


def test_time_budget_fits_the_schedule_and_stops_near_the_budget(tiny_llama, captured, tmp_path):
    budget = 8.0
    trainer = _trainer(
        _model(tiny_llama),
        captured,
        tmp_path,
        val=[0, 1],
        epochs=200,  # far more than fits: the budget, not the plan, ends the run
        checkpoint_freq=1000,
        scheduler_type="linear",
        time_budget_seconds=budget,
    )
    started = time.monotonic()
    result = trainer.fit()
    took = time.monotonic() - started
    assert result.status == "time_budget"
    assert 0.5 * budget < took < budget + 4.0, took
    state = ckpt.read_training_state(ckpt.find_resume_checkpoint(tmp_path))
    assert state["global_step"] == state["schedule_steps"] == result.global_step < trainer.total_steps
    assert budget - 3.0 < state["train_seconds"] < budget + 3.0
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if r["kind"] == "train"]
    # The last step used the schedule's last lr (linear: 1/T of the peak), not a cut-off mid-schedule.
    assert lrs[-1] == pytest.approx(1e-3 / result.global_step, rel=1e-6)
    assert log[-1]["kind"] == "val"  # the end validates, like --max-steps

    # The same command again: the budget is spent, nothing more is trained.
    model = load_draft(ckpt.find_resume_checkpoint(tmp_path), verifier_name_or_path=str(tiny_llama))
    again = _trainer(
        model, captured, tmp_path, val=[0, 1], epochs=200, checkpoint_freq=1000, time_budget_seconds=budget
    )
    again.restore(ckpt.find_resume_checkpoint(tmp_path))
    assert again.fit().status == "time_budget"
    assert again.state.global_step == result.global_step
