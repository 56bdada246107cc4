"""Fixtures for the vLLM tests (``make test-vllm``): one engine config per session, built on CPU.

vLLM imports and its configs, scheduler and connector classes work without a GPU; its engine does
not start. ``VLLM_TARGET_DEVICE=cpu`` must be set before vLLM picks its platform.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest

LAYER_IDS = [2, 4, 5, 8]  # the tiny 8-layer target's default capture
NUM_BLOCKS = 64


@pytest.fixture(scope="session")
def spill_root(tmp_path_factory):
    """The one folder the session's connector may spill under (kv_connector_extra_config spill_dirs)."""
    return tmp_path_factory.mktemp("vllm-spill")


@pytest.fixture(scope="session")
def vllm_config(tiny_qwen3, spill_root):
    """A real VllmConfig for the tiny bf16 Qwen3 target with launch-vllm's speculative and
    kv-transfer settings, built the way `vllm serve` builds it: through vLLM's own CLI parser."""
    from producer.vllm.launch import build_command, build_parser

    own = build_parser().parse_args([str(tiny_qwen3), "--spill-dir", str(spill_root)])
    config = engine_config_of(build_command(own, ["--max-model-len", "512", "--dtype", "bfloat16"]))
    config.cache_config.num_gpu_blocks = NUM_BLOCKS  # what profiling would have set on a GPU
    return config


def engine_config_of(command: list[str]):
    """The VllmConfig `vllm serve` builds from launch-vllm's ``command`` (``... serve MODEL args``),
    parsed by vLLM's own CLI parser. With vLLM importable, launch-vllm runs it through
    ``python -m producer.vllm.cli``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert command[:4] == [sys.executable, "-m", "producer.vllm.cli", "serve"]
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    # `vllm serve MODEL` hands its positional MODEL to the engine arguments as --model.
    args = parser.parse_args(["--model", command[4], *command[5:]])
    return AsyncEngineArgs.from_cli_args(args).create_engine_config()
