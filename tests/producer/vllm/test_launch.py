"""``draftstream launch-vllm --dry-run``: the `vllm serve` command it builds (no vLLM needed; the
vLLM tests parse the same command with vLLM's own argument parser): layer ids and dtype from the
checkpoint's config, the connector's settings, and which vLLM executable runs."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from producer.vllm import launch
from producer.vllm.launch import main
from protocol.cli import main as draftstream


@pytest.fixture(autouse=True)
def no_vllm_here(monkeypatch):
    """The commands below are those of an environment without vLLM (`vllm` on PATH), wherever the
    tests run; the tests that need the other case say so."""
    monkeypatch.setattr(launch, "vllm_importable", lambda: False)


def dry_run(capsys, *argv: str) -> list[str]:
    assert main([argv[0], "--dry-run", *argv[1:]]) == 0
    return shlex.split(capsys.readouterr().out)


def option(command: list[str], flag: str) -> dict:
    return json.loads(command[command.index(flag) + 1])


def test_default_layer_ids_come_from_the_models_config_and_end_with_the_last(capsys, tiny_llama):
    command = dry_run(capsys, str(tiny_llama), "--", "--port", "8123", "--max-model-len", "4096")
    assert command[:5] == ["vllm", "serve", str(tiny_llama), "--dtype", "float32"]
    assert option(command, "--speculative-config") == {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [2, 4, 5, 8]}},
    }
    assert option(command, "--kv-transfer-config") == {
        "kv_connector": "DraftstreamConnector",
        "kv_role": "kv_producer",
        "kv_connector_module_path": "producer.vllm.connector",
        "kv_connector_extra_config": {},
    }
    assert command[-4:] == ["--port", "8123", "--max-model-len", "4096"]


def test_connector_options_go_into_kv_connector_extra_config(capsys, tmp_path, tiny_llama):
    secret, server = tmp_path / "producer.key_secret", tmp_path / "trainer.key"
    command = dry_run(
        capsys,
        str(tiny_llama),
        "--target-layer-ids",
        "1",
        "3",
        "8",
        "--spill-dir",
        str(tmp_path / "hs"),
        "--max-pending-bytes",
        "1000000",
        "--send-timeout",
        "5",
        "--curve-secret-key",
        str(secret),
        "--curve-server-key",
        str(server),
        "--vllm",
        "/opt/vllm/bin/vllm",
    )
    assert command[0] == "/opt/vllm/bin/vllm"
    assert option(command, "--speculative-config")["draft_model_config"]["hf_config"][
        "eagle_aux_hidden_state_layer_ids"
    ] == [1, 3, 8]
    assert option(command, "--kv-transfer-config")["kv_connector_extra_config"] == {
        "spill_dirs": [str(tmp_path / "hs")],
        "max_pending_bytes": 1000000,
        "send_timeout_seconds": 5.0,
        "curve_secret_key": str(secret),
        "curve_server_key": str(server),
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target-layer-ids", "2", "4", "5"], "must end with the last layer id 8"),
        (["--target-layer-ids", "2", "9"], "out of range"),
        (["--curve-secret-key", "k"], "CURVE needs both"),
        (["--", "--speculative-config", "{}"], "--speculative-config is set by launch-vllm"),
        (["--", "--kv-transfer-config={}"], "--kv-transfer-config is set by launch-vllm"),
    ],
)
def test_bad_options_are_refused_with_the_flag_to_change(capsys, tiny_llama, argv, message):
    assert main([str(tiny_llama), "--dry-run", *argv]) == 1
    assert message in capsys.readouterr().err


def test_layer_count_of_a_multimodal_config_is_read_from_its_text_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {"num_hidden_layers": 32}}))
    command = dry_run(capsys, str(tmp_path))
    assert option(command, "--speculative-config")["draft_model_config"]["hf_config"][
        "eagle_aux_hidden_state_layer_ids"
    ] == [2, 16, 29, 32]


def test_draftstream_dispatches_launch_vllm(capsys, tiny_llama):
    assert draftstream(["launch-vllm", str(tiny_llama), "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out)[:2] == ["vllm", "serve"]


def test_missing_vllm_executable_is_a_clear_error(capsys, tiny_llama):
    assert main([str(tiny_llama), "--vllm", "/nonexistent/vllm"]) == 1
    assert "not found; install vLLM or pass --vllm PATH" in capsys.readouterr().err


# ---- the dtype: the checkpoint's, as `produce --dtype auto` announces it ------------------------


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, "float32"),  # transformers 5 writes dtype
        ({}, "float32"),  # no dtype named: what produce --dtype auto assumes
        ({"text_config": {"num_hidden_layers": 8}, "dtype": "bfloat16"}, "bfloat16"),  # multimodal: top level
    ],
)
def test_vllm_runs_the_checkpoints_dtype_not_its_own_auto(capsys, tmp_path, config, dtype):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 8, **config}))
    command = dry_run(capsys, str(tmp_path), "--", "--port", "8000")
    assert command[command.index("serve") + 1 :][:3] == [str(tmp_path), "--dtype", dtype]
    assert command.count("--dtype") == 1


def test_the_tiny_fp32_target_is_served_in_fp32(capsys, tiny_llama):
    command = dry_run(capsys, str(tiny_llama))
    assert option_value(command, "--dtype") == "float32"


@pytest.mark.parametrize("serve_args", [["--dtype", "bfloat16"], ["--dtype=bfloat16"]])
def test_a_dtype_among_the_serve_arguments_wins(capsys, tiny_llama, serve_args):
    command = dry_run(capsys, str(tiny_llama), "--", *serve_args)
    assert command[-len(serve_args) :] == serve_args
    assert sum(arg.startswith("--dtype") for arg in command) == 1


def test_a_dtype_vllm_does_not_take_is_left_to_vllm(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 8, "dtype": "float8_e4m3fn"}))
    assert "--dtype" not in dry_run(capsys, str(tmp_path))


def option_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# ---- which vLLM runs: this interpreter's through producer.vllm.cli, else `vllm` on PATH ----------


def test_with_vllm_importable_the_server_runs_in_this_interpreter_through_the_cli_stand_in(
    capsys, tiny_llama, monkeypatch
):
    monkeypatch.setattr(launch, "vllm_importable", lambda: True)
    command = dry_run(capsys, str(tiny_llama), "--", "--port", "8000")
    assert command[:5] == [sys.executable, "-m", "producer.vllm.cli", "serve", str(tiny_llama)]
    assert command[-2:] == ["--port", "8000"]


def test_without_vllm_here_the_vllm_on_path_runs_and_vllm_overrides_both(capsys, tiny_llama, monkeypatch):
    monkeypatch.setattr(launch, "vllm_importable", lambda: False)
    assert dry_run(capsys, str(tiny_llama))[:2] == ["vllm", "serve"]
    monkeypatch.setattr(launch, "vllm_importable", lambda: True)
    assert dry_run(capsys, str(tiny_llama), "--vllm", "/opt/v/bin/vllm")[:2] == ["/opt/v/bin/vllm", "serve"]
