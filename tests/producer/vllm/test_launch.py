"""``draftstream launch-vllm --dry-run``: the `vllm serve` command it builds (no vLLM needed; the
vLLM tests parse the same command with vLLM's own argument parser)."""

from __future__ import annotations

import json
import shlex

import pytest

from producer.vllm.launch import main
from protocol.cli import main as draftstream


def dry_run(capsys, *argv: str) -> list[str]:
    assert main([argv[0], "--dry-run", *argv[1:]]) == 0
    return shlex.split(capsys.readouterr().out)


def option(command: list[str], flag: str) -> dict:
    return json.loads(command[command.index(flag) + 1])


def test_default_layer_ids_come_from_the_models_config_and_end_with_the_last(capsys, tiny_llama):
    command = dry_run(capsys, str(tiny_llama), "--", "--port", "8123", "--max-model-len", "4096")
    assert command[:3] == ["vllm", "serve", str(tiny_llama)]
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
