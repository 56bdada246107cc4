"""Shared fixtures: tiny local targets and conversations, built once per session, no model hub."""

from __future__ import annotations

import os

# Before anything imports transformers/datasets: never reach for a hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny fp32 Llama target directory (model + tokenizer with a marked chat template)."""
    from producer.tiny_target import TinyTargetConfig, build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-llama"), TinyTargetConfig(arch="llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A tiny bf16 Qwen3 target directory."""
    from producer.tiny_target import TinyTargetConfig, build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-qwen3"), TinyTargetConfig(arch="qwen3", dtype="bfloat16"))


@pytest.fixture(scope="session")
def conversations_jsonl(tmp_path_factory):
    """64 fixture conversations in ShareGPT style."""
    from producer.tiny_target import write_conversations

    return write_conversations(tmp_path_factory.mktemp("data") / "conversations.jsonl", 64)
