"""``draftstream prepare`` end to end on fixture conversations: the speculators-compatible output,
token frequencies, clipping and drops, pass-through rows, and an output that is never clobbered."""

from __future__ import annotations

import collections
import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from producer.conversation import ChatTemplateError
from producer.prepare import PrepareConfig, main, prepare_dataset
from producer.tiny_target import conversations, write_conversations

from .test_conversation import EOT, TRUNCATED_LAST, expected_spans, supervised_spans


def _prepare(model, data, output, **kwargs):
    kwargs.setdefault("num_workers", 1)
    return prepare_dataset(PrepareConfig(model=str(model), data=[str(d) for d in data], output=str(output), **kwargs))


@pytest.mark.parametrize("variant", ["llama", "qwen3-plain"])
def test_prepared_rows_supervise_exactly_the_assistant_turns_of_the_sources(tokenizer_dirs, tmp_path, variant):
    sharegpt = write_conversations(tmp_path / "a.jsonl", 20, seed=11)
    openai = write_conversations(tmp_path / "b.jsonl", 20, seed=12, style="openai")
    summary = _prepare(tokenizer_dirs[variant], [sharegpt, openai], tmp_path / "out", seq_length=4096)

    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(dataset.column_names) == ["input_ids", "loss_mask", "seq_len"]
    assert dataset.format["type"] == "torch" and len(dataset) == 40 == summary.num_rows_out
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[variant]))
    eot = EOT[variant.split("-")[0]]
    expected = collections.Counter(
        tuple(expected_spans(c, eot)) for c in [*conversations(20, seed=11), *conversations(20, seed=12)]
    )
    found = collections.Counter()
    for row in dataset:
        assert isinstance(row["input_ids"], torch.Tensor) and row["input_ids"].dtype == torch.int64
        assert isinstance(row["loss_mask"], torch.Tensor) and set(row["loss_mask"].tolist()) <= {0, 1}
        assert int(row["seq_len"]) == row["input_ids"].shape[0] == row["loss_mask"].shape[0]
        found[tuple(supervised_spans(tokenizer, row["input_ids"].tolist(), row["loss_mask"].tolist()))] += 1
    assert found == expected


def test_token_freq_counts_supervised_tokens_of_the_whole_set(tiny_llama, conversations_jsonl, tmp_path):
    summary = _prepare(tiny_llama, [conversations_jsonl], tmp_path / "out", seq_length=128)
    token_freq = torch.load(tmp_path / "out" / "token_freq.pt", weights_only=True)
    recount = collections.Counter()
    for row in datasets.load_from_disk(str(tmp_path / "out")):
        recount.update(row["input_ids"][row["loss_mask"] == 1].tolist())
    assert type(token_freq) is dict and all(type(k) is int and type(v) is int for k, v in token_freq.items())
    assert token_freq == dict(recount)
    assert summary.num_supervised_tokens == sum(recount.values())


def test_rows_are_clipped_and_rows_left_without_supervision_are_dropped_and_counted(tiny_llama, tmp_path):
    source = write_conversations(tmp_path / "c.jsonl", 40, seed=13)
    summary = _prepare(tiny_llama, [source], tmp_path / "out", seq_length=36, minimum_valid_tokens=4)

    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert all(int(r["seq_len"]) <= 36 and int(r["loss_mask"].sum()) >= 4 for r in dataset)
    assert summary.num_clipped > 0 and summary.dropped.get("no supervised token", 0) > 0
    assert summary.num_rows_in == 40 == summary.num_rows_out + sum(summary.dropped.values())
    assert summary.num_tokens == sum(int(r["seq_len"]) for r in dataset)
    text = summary.format()
    assert "clipped rows" in text and "dropped: no supervised token" in text and "[[" in text


def test_pretokenized_rows_pass_through_and_malformed_rows_are_counted(tiny_llama, tmp_path):
    pretokenized = tmp_path / "tokens.jsonl"
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]},
        {"input_ids": list(range(10, 40)), "loss_mask": [0] * 12 + [1] * 18},
    ]
    pretokenized.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]})
        + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."}]})
        + "\n"
    )
    summary = _prepare(tiny_llama, [pretokenized, broken], tmp_path / "out", seq_length=24)

    dataset = datasets.load_from_disk(str(tmp_path / "out")).with_format(None)
    kept = sorted((r["input_ids"], r["loss_mask"]) for r in dataset)
    assert ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]) in kept
    assert (list(range(10, 34)), [0] * 12 + [1] * 12) in kept  # clipped to 24
    assert len(kept) == 3 and summary.num_passthrough == 2 and summary.num_clipped == 1
    assert summary.dropped == {"no supervised token": 1, "malformed": 1}
    assert "narrator" in summary.drop_examples["malformed"]


def test_max_samples_and_seed_select_the_same_rows_every_time(tiny_llama, conversations_jsonl, tmp_path):
    a = _prepare(tiny_llama, [conversations_jsonl], tmp_path / "a", max_samples=10, seed=3)
    _prepare(tiny_llama, [conversations_jsonl], tmp_path / "b", max_samples=10, seed=3)
    first, second = (datasets.load_from_disk(str(tmp_path / n)).with_format(None)["input_ids"] for n in "ab")
    assert a.num_rows_out == 10 and list(first) == list(second)


def test_existing_output_is_left_alone_unless_overwrite(tiny_llama, conversations_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    _prepare(tiny_llama, [conversations_jsonl], out, max_samples=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code = main(
        ["--model", str(tiny_llama), "--data", str(conversations_jsonl), "--output", str(out), "--num-workers", "1"]
    )
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    argv = ["--model", str(tiny_llama), "--data", str(conversations_jsonl), "--output", str(out), "--num-workers", "1"]
    assert main([*argv, "--max-samples", "6", "--overwrite"]) == 0
    assert len(datasets.load_from_disk(str(out))) == 6
    assert "rows out            6" in capsys.readouterr().out


def test_overwrite_refuses_to_delete_a_folder_that_is_not_a_prepared_dataset(tiny_llama, conversations_jsonl, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not look like a prepared dataset"):
        _prepare(tiny_llama, [conversations_jsonl], precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_template_with_empty_assistant_mask_stops_prepare(tokenizer_dirs, conversations_jsonl, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama"]))
    marked = "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    tokenizer.chat_template = tokenizer.chat_template.replace(
        marked, "{%- generation %}{%- endgeneration %}{{- message['content'] | trim + '<|eot_id|>' }}"
    )
    tokenizer.save_pretrained(str(tmp_path / "broken"))
    with pytest.raises(ChatTemplateError, match="empty assistant mask"):
        _prepare(tmp_path / "broken", [conversations_jsonl], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_template_that_does_not_parse_stops_prepare(tokenizer_dirs, conversations_jsonl, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3-plain"]))
    tokenizer.chat_template = tokenizer.chat_template + "{%- if %}"
    tokenizer.save_pretrained(str(tmp_path / "broken"))
    with pytest.raises(ChatTemplateError, match="does not parse"):
        _prepare(tmp_path / "broken", [conversations_jsonl], tmp_path / "out")


def test_unknown_source_and_bad_flags_name_the_flag(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="--data"):
        _prepare(tiny_llama, ["not-a-preset"], tmp_path / "out")
    with pytest.raises(ValueError, match="--seq-length"):
        PrepareConfig(model="m", data=["x"], output="o", seq_length=0)
    with pytest.raises(ValueError, match="--data"):
        PrepareConfig(model="m", data=[], output="o")


@pytest.mark.parametrize("variant", ["llama", "qwen3-plain"])
def test_truncated_answers_are_prepared_without_an_end_of_turn(tokenizer_dirs, tmp_path, variant):
    closed = [{k: v for k, v in m.items() if k != "truncated"} for m in TRUNCATED_LAST]
    source = tmp_path / "regenerated.jsonl"
    source.write_text(json.dumps({"messages": TRUNCATED_LAST}) + "\n" + json.dumps({"messages": closed}) + "\n")
    _prepare(tokenizer_dirs[variant], [source], tmp_path / "out")

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[variant]))
    eot = EOT[variant.split("-")[0]]
    rows = sorted(datasets.load_from_disk(str(tmp_path / "out")).with_format(None), key=lambda r: r["seq_len"])
    cut, whole = rows
    assert cut["input_ids"] == whole["input_ids"][: cut["seq_len"]]
    assert tokenizer.convert_tokens_to_ids(eot) not in cut["input_ids"][-3:]
    assert supervised_spans(tokenizer, cut["input_ids"], cut["loss_mask"]) == [
        "Not yet." + eot,
        "The stream runs at 42 tokens per",
    ]
    assert supervised_spans(tokenizer, whole["input_ids"], whole["loss_mask"])[-1].endswith("per" + eot)
