"""`draftstream train` end to end on hidden-state files captured from the tiny target: the SPEC
checkpoint layout, the speculators tutorials' Step 5 command lines, automatic resume,
--from-pretrained, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import torch
from safetensors.torch import load_file

from protocol.hsfile import hs_path
from trainer.train import build_parser, main
from trainer.training import checkpoint as ckpt
from trainer.training.accounting import read_accounting

# Step 5 of the speculators offline tutorials (Eagle-3 with Llama-3.1-8B, P-EAGLE with Qwen3-8B),
# single GPU and torchrun FSDP, with `scripts/train.py` as the program. Paths and the draft vocab
# size get tiny values below; every flag stays as written.
EAGLE3_STEP5 = """--verifier-name-or-path meta-llama/Llama-3.1-8B-Instruct --data-path ./output
  --hidden-states-path ./output/hidden_states --save-path ./output/checkpoints --draft-vocab-size 32000
  --epochs 5 --lr 1e-4 --total-seq-len 8192 --on-missing raise"""
PEAGLE_STEP5 = """--verifier-name-or-path Qwen/Qwen3-8B --data-path ./output/peagle_qwen3_8b_sharegpt
  --hidden-states-path ./output/peagle_qwen3_8b_sharegpt/hidden_states
  --save-path ./output/peagle_qwen3_8b_sharegpt/checkpoints --speculator-type peagle --num-layers 4
  --num-depths 4 --down-sample-ratio 0.7 --down-sample-ratio-min 0.2 --no-norm-before-residual
  --scheduler-type cosine --epochs 5 --lr 6e-4 --total-seq-len 4096 --on-missing raise"""
TORCHRUN = "torchrun --standalone --nproc_per_node 2 scripts/train.py "


def _tiny(command: str, offline, save) -> list[str]:
    model, data, hs = offline
    values = {
        "--verifier-name-or-path": str(model),
        "--data-path": str(data),
        "--hidden-states-path": str(hs),
        "--save-path": str(save),
        "--draft-vocab-size": "256",
    }
    argv = shlex.split(command)
    return [values.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)] + ["--no-progress"]


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
        "96",
        "--no-progress",
        *extra,
    ]


def test_train_writes_the_spec_checkpoint_layout(offline_dataset, tmp_path):
    save = tmp_path / "ckpt"
    assert main(_flags(offline_dataset, save)) == 0
    for epoch in ("0", "1"):
        names = {p.name for p in (save / epoch).iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "optimizer_state_dict.pt",
            "scheduler_state_dict.pt",
            ckpt.TRAINING_STATE_FILE,
            ckpt.MASTER_WEIGHTS_FILE,
            "rng_state_0.pt",
        } <= names
    best = save / ckpt.BEST_LINK
    assert best.is_symlink() and os.readlink(best) in ("0", "1")  # relative, to an epoch folder
    state = ckpt.read_training_state(best)
    assert state["val_history"][os.readlink(best)] == min(state["val_history"].values())
    config = json.loads((save / "1" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 256
    tensors = load_file(str(save / "1" / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["d2t"].dtype == torch.int64
    for name in ("optimizer_state_dict.pt", "scheduler_state_dict.pt", ckpt.TRAINING_STATE_FILE):
        torch.load(save / "1" / name, weights_only=True)  # plain tensors and containers only
    assert not (save / ckpt.MID_EPOCH_NAME).exists()
    log = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [0, 1]


def test_a_finished_run_started_again_trains_nothing_more(offline_dataset, tmp_path):
    save = tmp_path / "ckpt"
    assert main(_flags(offline_dataset, save, "--max-steps", "5")) == 0
    records = read_accounting(save)
    assert len(records) == 5
    assert main(_flags(offline_dataset, save, "--max-steps", "5")) == 0
    assert read_accounting(save) == records
    # A larger --max-steps continues from the saved cursor.
    assert main(_flags(offline_dataset, save, "--max-steps", "7")) == 0
    assert [r["global_step"] for r in read_accounting(save)] == list(range(1, 8))


def test_resuming_with_other_model_flags_is_refused(offline_dataset, tmp_path, caplog):
    save = tmp_path / "ckpt"
    assert main(_flags(offline_dataset, save, "--max-steps", "2")) == 0
    records = read_accounting(save)
    assert (
        main(_flags(offline_dataset, save, "--max-steps", "4", "--num-layers", "2", "--no-norm-before-residual")) == 2
    )
    assert (
        "--num-layers 2, checkpoint 1" in caplog.text and "--norm-before-residual False, checkpoint True" in caplog.text
    )
    assert "--no-resume-from-checkpoint" in caplog.text and read_accounting(save) == records  # nothing trained
    # Objective knobs may change between runs; the same architecture resumes.
    assert main(_flags(offline_dataset, save, "--max-steps", "4", "--ttt-step-loss-decay", "0.8")) == 0
    assert [r["global_step"] for r in read_accounting(save)] == [1, 2, 3, 4]


@pytest.mark.parametrize("command", [EAGLE3_STEP5, PEAGLE_STEP5], ids=["eagle3", "peagle"])
def test_tutorial_step5_command_runs_unchanged(offline_dataset, tmp_path, command):
    save = tmp_path / "ckpt"
    assert main(_tiny(command, offline_dataset, save)) == 0
    config = json.loads((save / "4" / "config.json").read_text())
    if "peagle" in command:
        assert config["speculators_model_type"] == "peagle" and config["norm_before_residual"] is False
        assert config["transformer_layer_config"]["num_hidden_layers"] == 4
        assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    else:
        assert config["speculators_model_type"] == "eagle3"


@pytest.mark.parametrize("command", [EAGLE3_STEP5, PEAGLE_STEP5], ids=["eagle3", "peagle"])
def test_tutorial_torchrun_command_lines_parse(command):
    argv = shlex.split(TORCHRUN + command)
    args = build_parser().parse_args(argv[argv.index("scripts/train.py") + 1 :])
    assert args.on_missing == "raise" and args.epochs == 5


def test_target_layer_ids_take_three_or_four_ids(offline_dataset, tmp_path):
    assert (
        main(_flags(offline_dataset, tmp_path / "a", "--target-layer-ids", "2", "4", "5", "8", "--max-steps", "1")) == 0
    )
    config = json.loads((tmp_path / "a" / "0" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert main(_flags(offline_dataset, tmp_path / "b", "--target-layer-ids", "1", "2", "3", "7")) == 2


def test_from_pretrained_starts_from_the_saved_weights(offline_dataset, tmp_path):
    first = tmp_path / "first"
    assert main(_flags(offline_dataset, first, "--max-steps", "3")) == 0
    tuned = tmp_path / "tuned"
    assert (
        main(
            _flags(
                offline_dataset,
                tuned,
                "--from-pretrained",
                str(first / "0"),
                "--max-steps",
                "1",
                "--lr",
                "1e-12",
                "--noise-std",
                "0",
            )
        )
        == 0
    )
    a = load_file(str(first / "0" / "model.safetensors"))
    b = load_file(str(tuned / "0" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert ckpt.read_training_state(tuned / "0")["global_step"] == 1


def test_missing_hidden_states_fail_before_training(offline_dataset, tmp_path, caplog):
    model, data, hs = offline_dataset
    local = tmp_path / "hs"
    local.mkdir()
    for p in hs.iterdir():
        (local / p.name).symlink_to(p)
    hs_path(local, 7).unlink()
    argv = _flags((model, data, local), tmp_path / "ckpt")
    assert main(argv) == 2
    assert "--on-missing" in caplog.text and "hs_7.safetensors" in caplog.text
    assert main([*argv, "--on-missing", "skip", "--max-steps", "2"]) == 0
    trained = {sid for r in read_accounting(tmp_path / "ckpt") for sid in r["sample_ids"]}
    assert 7 not in trained


def test_usage_errors_name_the_flag(offline_dataset, tmp_path, caplog):
    assert main(_flags(offline_dataset, tmp_path / "c", "--lr", "0")) == 2
    assert "--lr" in caplog.text
    model, data, _ = offline_dataset
    assert main(_flags((model, data, tmp_path / "nowhere"), tmp_path / "d")) == 2
    assert "--hidden-states-path" in caplog.text
    with pytest.raises(SystemExit):
        main(["--data-path", str(data)])  # no --verifier-name-or-path


def test_flags_map_onto_the_configs_with_their_defaults():
    """Every loop knob has a flag whose default is the LoopConfig field's (one default each), and
    model flags left out mean "the DraftConfig default"."""
    import dataclasses

    from trainer.models.config import DraftConfig
    from trainer.train import _draft_kwargs, config_from_args
    from trainer.training.config import LoopConfig

    args = build_parser().parse_args(["--verifier-name-or-path", "m"])
    flagless = {"progress", "prefetch_depth"}  # --no-progress is inverted; prefetch depth is not a flag
    assert {f.name for f in dataclasses.fields(LoopConfig)} - flagless <= set(vars(args))
    assert config_from_args(LoopConfig, args, progress=True) == LoopConfig(save_path=args.save_path)
    assert args.noise_std == LoopConfig(save_path="x").noise_std == 0.05
    assert _draft_kwargs(args) == {"num_layers": DraftConfig.num_layers}
    given = build_parser().parse_args(["--verifier-name-or-path", "m", "--ttt-steps", "5", "--no-fc-norm"])
    assert _draft_kwargs(given) == {"num_layers": 1, "ttt_steps": 5, "fc_norm": False}


def _stream_flags(offline, save, endpoint, *extra):
    model, data, _ = offline
    return [
        "--verifier-name-or-path",
        str(model),
        "--data-path",
        str(data),
        "--save-path",
        str(save),
        "--stream-endpoint",
        f"ipc://{endpoint}",
        "--draft-vocab-size",
        "256",
        "--total-seq-len",
        "96",
        "--no-progress",
        *extra,
    ]


def test_buffer_bytes_default_fits_reuse_and_a_smaller_one_is_refused_up_front(offline_dataset, tmp_path, caplog):
    from protocol.target import sample_nbytes
    from trainer.stream.config import BATCHES_BUFFERED
    from trainer.train import check_stream_flags

    argv = _stream_flags(offline_dataset, tmp_path / "ckpt", tmp_path / "ep", "--reuse", "3")
    check_stream_flags(argv, world_size=2)  # no --buffer-bytes: the default holds the plan
    with pytest.raises(ValueError, match="rank 0: samples waiting for their next use need .* --buffer-bytes is"):
        check_stream_flags([*argv, "--buffer-bytes", "100000"], world_size=2)
    # `train` refuses it the same way, in one line, before binding a socket a producer could reach.
    assert main([*argv, "--buffer-bytes", "100000"]) == 2
    assert "--buffer-bytes is 0.1 MB" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "ep").exists() or not any((tmp_path / "ep").iterdir())
    # What --reuse 3 keeps waiting is more than the fixed default (BATCHES_BUFFERED batches), which
    # is what made such runs fail when they started training.
    need_mb = float(re.search(r"need ([\d.]+) MB", caplog.text).group(1))
    fixed = BATCHES_BUFFERED * sample_nbytes(96, 4, 64, torch.float32)
    assert need_mb * 1e6 > fixed


def test_sigterm_ends_a_trainer_waiting_for_data_with_a_checkpoint(offline_dataset, tmp_path):
    """No producer ever connects: the loop waits in fetch; SIGTERM writes latest/ and returns 143
    within seconds instead of waiting for --stall-timeout. (--reuse 3 with the default buffer.)"""
    import signal
    import threading
    import time

    from protocol import signals

    save = tmp_path / "ckpt"
    argv = _stream_flags(offline_dataset, save, tmp_path / "ep", "--reuse", "3", "--stall-timeout", "600")
    sent = []

    def stop_when_waiting():
        deadline = time.monotonic() + 120
        while not signals._active and time.monotonic() < deadline:  # the loop's handlers are in place
            time.sleep(0.05)
        time.sleep(1.0)  # the loop is waiting for its first batch
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a signal too early must not end pytest
    try:
        threading.Thread(target=stop_when_waiting, daemon=True).start()
        code = main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert sent and time.monotonic() - sent[0] < 8
    state = ckpt.read_training_state(save / ckpt.MID_EPOCH_NAME)
    assert state["global_step"] == 0 and state["step_in_epoch"] == 0
