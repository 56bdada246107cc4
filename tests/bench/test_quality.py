"""``draftstream bench quality``: the prompt source's topic split, and the whole recipe end to end on a
tiny local target (regenerate, prepare, streaming and offline training, held-out evaluation)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from bench import quality, quality_prompts
from bench.quality_prompts import FAMILIES, HELD_OUT_FAMILIES, HELD_OUT_WORDS, TRAIN_FAMILIES


def test_no_module_belongs_to_two_families_and_held_out_families_are_not_trained_on():
    modules = [m for family in FAMILIES.values() for m in family]
    assert len(modules) == len(set(modules))
    assert set(HELD_OUT_FAMILIES) <= set(FAMILIES)
    assert not set(HELD_OUT_FAMILIES) & set(TRAIN_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELD_OUT_FAMILIES) == set(FAMILIES)


def test_held_out_prompts_come_only_from_held_out_topics_and_training_prompts_never_mention_them():
    split = quality_prompts.build_prompts(num_train=400, num_held_out=60, seed=0)
    assert len(split.train) == 400 and len(split.held_out) == 60
    for p in split.train:
        assert p.family in TRAIN_FAMILIES and p.module in FAMILIES[p.family]
    for p in split.held_out:
        assert p.family in HELD_OUT_FAMILIES and p.module in FAMILIES[p.family]
    assert not {p.module for p in split.train} & {p.module for p in split.held_out}
    train_excerpts = quality_prompts.excerpts(TRAIN_FAMILIES)
    assert train_excerpts and not [e.name for e in train_excerpts if HELD_OUT_WORDS.search(e.text)]
    held_texts = {e.text for e in quality_prompts.excerpts(HELD_OUT_FAMILIES)}
    assert not held_texts & {e.text for e in train_excerpts}
    # Enough of both for the default run (256 training prompts, 60 held out).
    assert split.train_pool >= 256 and split.held_out_pool >= 60


def test_prompts_are_deterministic_for_a_seed_and_differ_across_seeds():
    def texts(seed):
        split = quality_prompts.build_prompts(num_train=32, num_held_out=8, seed=seed)
        return [p.text for p in split.train + split.held_out]

    assert texts(3) == texts(3)
    assert texts(3) != texts(4)


def test_prompts_are_instructions_around_an_excerpt_with_an_answer_slot(tmp_path):
    split = quality_prompts.build_prompts(num_train=20, num_held_out=5, seed=1)
    rows = [json.loads(line) for line in quality_prompts.write_jsonl(split.train, tmp_path / "t.jsonl").open()]
    assert len(rows) == 20
    for row, prompt in zip(rows, split.train):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": prompt.text} and assistant == {"role": "assistant", "content": ""}
        assert prompt.text == quality_prompts.TEMPLATES[prompt.template].format(name=prompt.name, text=prompt.excerpt)
        assert len(prompt.excerpt) >= quality_prompts.MIN_CHARS and row["source"].endswith(prompt.name)
    assert len({p.template for p in split.train}) > 1


def test_an_excerpt_is_cut_at_a_sentence_end_within_the_limit():
    doc = "First sentence here is long enough to count. " * 30
    text = quality_prompts.excerpt_of(doc, max_chars=200)
    assert len(text) <= 200 and text.endswith(".")
    assert quality_prompts.excerpt_of("Para one.\n\nPara two.", max_chars=600) == "Para one.\n\nPara two."


def test_asking_for_more_prompts_than_the_pool_names_the_flag():
    with pytest.raises(ValueError, match="--num-eval-prompts"):
        quality_prompts.build_prompts(num_train=8, num_held_out=100_000, seed=0)
    with pytest.raises(ValueError, match="--num-train-prompts"):
        quality_prompts.build_prompts(num_train=0, num_held_out=8, seed=0)


@pytest.mark.slow
@pytest.mark.multiproc
def test_quality_bench_runs_the_recipe_both_ways_and_reports_acceptance(tiny_llama, tmp_path, capsys):
    out = tmp_path / "quality"
    argv = [
        "--model",
        str(tiny_llama),
        "--budget-minutes",
        "0.4",
        "--num-train-prompts",
        "16",
        "--num-eval-prompts",
        "4",
        "--max-new-tokens",
        "24",
        "--eval-max-new-tokens",
        "16",
        "--out",
        str(out),
    ]
    assert quality.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    table = "\n".join(lines[:-1])
    assert "phase" in table and "held-out untrained -> trained" in table
    assert any(line.startswith("streaming") for line in lines) and any(line.startswith("offline") for line in lines)

    assert result["bench"] == "quality" and result["budget_s"] == pytest.approx(24.0)
    assert result["prompts"]["num_train"] == 16 and result["prompts"]["num_eval"] == 4
    assert result["prompts"]["held_out_families"] == list(HELD_OUT_FAMILIES)
    assert result["regenerate"]["num_answers"] == 16
    for phase in ("regenerate", "prepare", "eval untrained", "streaming", "offline produce", "offline train"):
        assert result["phases"][phase] > 0, phase
    assert result["phases"]["total"] >= sum(v for k, v in result["phases"].items() if k not in ("total", "target"))

    acceptance = result["acceptance"]
    assert set(acceptance) == {"untrained", "streaming", "offline"}
    assert all(1.0 <= a <= 1 + result["k"] for a in acceptance.values()), acceptance
    assert result["eval_untrained"]["num_prompts"] == 4 and result["eval_untrained"]["seconds"] > 0
    for way in quality.WAYS:
        figures = result["ways"][way]
        assert figures["steps"] > 0 and figures["time_budget_s"] >= quality.MIN_TRAIN_S
        for curve in (figures["curve"], figures["train_curve"]):
            assert curve and all(1.0 <= p["accept_len"] <= 1 + result["k"] for p in curve)
            assert all(0 < p["wall_s"] <= figures["wall_s"] for p in curve)
        assert figures["heldout"]["acceptance_length"] == acceptance[way]
        assert figures["heldout"]["seconds_per_60_prompts"] > 0
    assert result["ways"]["offline"]["hs_bytes"] > 0
    assert result["comparison"]["sooner"] in quality.WAYS
    assert isinstance(result["vllm_eval"], (str, dict))

    with open(result["curves_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["way"] for r in rows} == set(quality.WAYS)
    assert {r["kind"] for r in rows} == {"estimated", "estimated_train", "measured"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert result["plot"] and (out / "quality.png").is_file()


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_streaming_run_whose_budget_ends_mid_epoch_still_yields_a_checkpoint(tmp_path):
    """Long epochs (128 rows, --reuse 3) and a budget of a few seconds: the stop falls inside an
    epoch with most of it still scheduled. The trainer currently fails its final validation there;
    the bench then evaluates <save>/latest/. Either way there is a checkpoint and a training curve."""
    from bench.runs import prepare_inputs

    model, prepared = prepare_inputs(tmp_path / "inputs", 128)
    job = quality.Job(
        target=model,
        prepared=prepared,
        held_out=tmp_path / "unused.jsonl",
        speculator_type="eagle3",
        draft_vocab_size=256,
        k=3,
        lr=1e-3,
        seed=0,
        num_eval_prompts=1,
        eval_max_new_tokens=1,
        eval_batch_size=1,
    )
    result = quality.run_streaming(job, tmp_path / "streaming", share_s=quality.STARTUP_S + 6)
    assert (Path(result["checkpoint"]) / "config.json").is_file()
    assert result["steps"] > 0 and result["train_curve"]
    if result["failure"] is not None:
        assert quality.STREAM_STOP_BUG in result["failure"] and Path(result["checkpoint"]).name == "latest"
