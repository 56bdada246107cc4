"""Producer-side fixtures: template variants and a small prepared dataset, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, tiny_llama, tiny_qwen3):
    """Tokenizer folders by name: the fixture targets' (with generation markers) and marker-less twins."""
    from producer.tiny_target import TinyTargetConfig, build_tokenizer

    dirs = {"llama": tiny_llama, "qwen3": tiny_qwen3}
    for arch in ("llama", "qwen3"):
        out = tmp_path_factory.mktemp(f"{arch}-plain")
        build_tokenizer(out, TinyTargetConfig(arch=arch, generation_markers=False))
        dirs[f"{arch}-plain"] = out
    return dirs


@pytest.fixture(scope="session")
def prepared_llama(tmp_path_factory, tiny_llama, conversations_jsonl):
    """The 64 fixture conversations prepared for the tiny Llama target (seq length 256)."""
    from producer.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "llama"
    prepare_dataset(
        PrepareConfig(
            model=str(tiny_llama), data=[str(conversations_jsonl)], output=str(out), num_workers=1, seq_length=256
        )
    )
    return out
