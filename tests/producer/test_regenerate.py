"""``draftstream regenerate``: the target's own greedy answers with the regenerated history in
context, truncated answers marked (and prepared without an end-of-turn token), an interrupted run
that resumes into the same file, and the vLLM backends' request side without vLLM."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from producer.conversation import ConversationEncoder, normalize_turns
from producer.generate import Generation, HFGenerator, Request, finish, stop_token_ids
from producer.prepare import PrepareConfig, prepare_dataset
from producer.regenerate import RegenerateConfig, index_path, main, regenerate
from producer.tiny_target import TinyTargetConfig, build_tiny_target, write_conversations

from .test_conversation import supervised_spans

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def chatty_target(tmp_path_factory):
    """A tiny Llama target that ends some answers within MAX_NEW_TOKENS: a random target almost
    never picks its end-of-turn token, so its lm_head row becomes 1.5 x the row of a token
    that greedy answers pick in some answers but not in most."""
    path = build_tiny_target(tmp_path_factory.mktemp("chatty"), TinyTargetConfig(arch="llama"))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    eot = tokenizer.eos_token_id
    answers = [_greedy(model, tokenizer, messages[:1], {eot}) for messages in _first_turns(tokenizer, 16)]
    seen = collections.Counter(t for ids, _ in answers for t in set(ids[3:]))
    token = next(t for t, n in seen.most_common() if 4 <= n <= 10)
    with torch.no_grad():
        model.lm_head.weight[eot] = model.lm_head.weight[token] * 1.5
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("regen-data") / "conversations.jsonl", 24, seed=21)


@pytest.fixture(scope="module")
def greedy_run(chatty_target, source, tmp_path_factory):
    """One greedy Hugging Face run over the 24 conversations: (output path, summary)."""
    output = tmp_path_factory.mktemp("regen-greedy") / "out.jsonl"
    summary = regenerate(_config(chatty_target, source, output, batch_size=4, chunk_size=5))
    return output, summary


def _config(model, data, output, **kwargs):
    kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    kwargs.setdefault("device", "cpu")
    return RegenerateConfig(model=str(model), data=[str(data)], output=str(output), **kwargs)


def _first_turns(tokenizer, num):
    from producer.tiny_target import conversations

    return [[m for m in c if m["role"] != "assistant"][:2] for c in conversations(num, seed=1)]


def _greedy(model, tokenizer, messages, stop_ids, max_new_tokens=MAX_NEW_TOKENS):
    """Single-prompt model.generate, greedy: ``(token ids before the stop token, truncated)``."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    generation = finish(new, stop_ids, truncated=len(new) >= max_new_tokens)
    return generation.token_ids, generation.truncated


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_equal_model_generate_with_the_regenerated_history_in_context(chatty_target, source, greedy_run):
    output, summary = greedy_run
    tokenizer = AutoTokenizer.from_pretrained(str(chatty_target))
    model = AutoModelForCausalLM.from_pretrained(str(chatty_target)).eval()
    stop_ids = stop_token_ids(str(chatty_target), tokenizer)
    sources = {row["id"]: normalize_turns(row["conversations"]) for row in _lines(source)}
    rows = _lines(output)
    assert [r["id"] for r in rows] == [f"conv-{i}" for i in range(24)]  # input order, other fields kept

    num_multi_turn = 0
    for row in rows:
        messages, original = row["messages"], sources[row["id"]]
        assert "conversations" not in row
        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        num_multi_turn += len(answers) > 1
        for k in answers:
            expected_ids, expected_truncated = _greedy(model, tokenizer, messages[:k], stop_ids)
            assert messages[k]["content"] == tokenizer.decode(expected_ids, skip_special_tokens=False)
            assert messages[k].get("truncated", False) == expected_truncated
            assert messages[k]["content"] != original[k]["content"]
        # Context turns are the source's; a truncated answer ends the conversation.
        assert [m for m in messages if m["role"] != "assistant"] == [
            m for m in original[: len(messages)] if m["role"] != "assistant"
        ]
        if messages[answers[-1]].get("truncated"):
            assert answers[-1] == len(messages) - 1
        else:
            assert len(messages) == len(original)
    assert num_multi_turn >= 2
    assert 0 < summary.num_truncated < summary.num_answers
    assert summary.num_rows_out == summary.num_rows_in == 24 and summary.num_tokens > 0
    assert "tokens/s" in summary.format()


def test_truncated_answers_are_marked_and_prepared_without_an_end_of_turn(chatty_target, greedy_run, tmp_path):
    output, _ = greedy_run
    tokenizer = AutoTokenizer.from_pretrained(str(chatty_target))
    eot = tokenizer.eos_token_id
    encoder = ConversationEncoder(tokenizer)
    ends = collections.Counter()
    for row in _lines(output):
        messages = normalize_turns(row["messages"])
        truncated = messages[-1].get("truncated", False)
        input_ids, loss_mask = encoder.encode(messages)
        assert (input_ids[-1] == eot) != truncated
        expected = [m["content"].strip() + ("" if m.get("truncated") else "<|eot_id|>") for m in messages]
        assert supervised_spans(tokenizer, input_ids, loss_mask) == [
            e for e, m in zip(expected, messages) if m["role"] == "assistant"
        ]
        ends[truncated] += 1
    assert ends[True] and ends[False]

    prepare_dataset(
        PrepareConfig(model=str(chatty_target), data=[str(output)], output=str(tmp_path / "p"), num_workers=1)
    )
    prepared = datasets.load_from_disk(str(tmp_path / "p")).with_format(None)
    assert collections.Counter(r["input_ids"][-1] == eot for r in prepared) == {True: ends[False], False: ends[True]}


class _Interrupt(Exception):
    pass


class _StopAfter:
    """Wraps a generator; raises on its ``calls``-th generate call, as a killed run would stop."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def generate(self, requests, *, seed):
        self.calls -= 1
        if self.calls == 0:
            raise _Interrupt
        yield from self.inner.generate(requests, seed=seed)

    def close(self):
        pass


def test_resume_after_interruption_writes_the_same_file(chatty_target, source, tmp_path):
    settings = dict(temperature=0.9, top_p=0.95, seed=5, chunk_size=4, batch_size=3)
    whole = tmp_path / "whole.jsonl"
    regenerate(_config(chatty_target, source, whole, **settings))

    resumed = tmp_path / "resumed.jsonl"
    config = _config(chatty_target, source, resumed, **settings)
    tokenizer = AutoTokenizer.from_pretrained(str(chatty_target))
    generator = HFGenerator(
        str(chatty_target),
        dtype="auto",
        device="cpu",
        batch_size=3,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=0.9,
        top_p=0.95,
        stop_ids=stop_token_ids(str(chatty_target), tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    with pytest.raises(_Interrupt):
        regenerate(config, generator=_StopAfter(generator, calls=4))  # a chunk runs a round per turn
    index = json.loads(index_path(resumed).read_text())
    done = index["rows_done"]
    assert done in (4, 8, 12) and index["bytes"] == resumed.stat().st_size > 0
    with resumed.open("a") as f:  # a chunk half written when the run was killed
        f.write('{"messages": [{"role": "user", "content": "cut he')

    summary = regenerate(config)

    assert resumed.read_bytes() == whole.read_bytes()
    assert summary.num_rows_resumed == done and summary.num_rows_in == 24
    assert regenerate(config).num_rows_in == 24 and resumed.read_bytes() == whole.read_bytes()  # done: no-op
    other_seed = tmp_path / "other.jsonl"
    regenerate(_config(chatty_target, source, other_seed, **{**settings, "seed": 6}))
    assert other_seed.read_bytes() != whole.read_bytes()


def test_changed_settings_refuse_to_resume_and_overwrite_starts_again(chatty_target, source, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(chatty_target), "--data", str(source), "--output", str(output), "--device", "cpu"]
    argv += ["--max-samples", "3", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert "rows out            3" in capsys.readouterr().out

    assert main([*argv, "--temperature", "0.5"]) == 1
    assert "temperature" in capsys.readouterr().err and len(_lines(output)) == 3
    assert main([*argv, "--temperature", "0.5", "--overwrite", "--max-samples", "2"]) == 0
    assert len(_lines(output)) == 2

    precious = tmp_path / "mine.jsonl"
    precious.write_text('{"keep": 1}\n')
    assert main([*argv[:4], "--output", str(precious), "--overwrite"]) == 1
    assert "refuses to replace" in capsys.readouterr().err and precious.read_text() == '{"keep": 1}\n'
    assert main([*argv[:4], "--output", str(precious)]) == 1
    assert "left alone" in capsys.readouterr().err and precious.read_text() == '{"keep": 1}\n'


class _FixedAnswer:
    """Answers every request with ``token_ids``, ended by a stop token."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def generate(self, requests, *, seed):
        for i in range(len(requests)):
            yield i, Generation(self.token_ids, None, False, len(self.token_ids) + 1)

    def close(self):
        pass


def test_long_prompts_end_conversations_and_unusable_rows_are_dropped(chatty_target, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(chatty_target))
    short = [{"role": "user", "content": "What is a stream?"}]
    budget = len(tokenizer.apply_chat_template(short, add_generation_prompt=True, tokenize=True)) + 8 + 20
    long_question = " ".join(["Explain the buffer and the stream."] * 10)
    rows = [
        {
            "messages": [
                *short,
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": long_question},
                {"role": "assistant", "content": "y"},
            ]
        },
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "z"}]},
        {"messages": short},
        {"messages": [{"role": "narrator", "content": "once"}, {"role": "assistant", "content": "z"}]},
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    config = _config(chatty_target, data, tmp_path / "out.jsonl", max_new_tokens=8, max_length=budget)
    summary = regenerate(config, generator=_FixedAnswer(tokenizer.encode("Fine.", add_special_tokens=False)))

    (out,) = _lines(tmp_path / "out.jsonl")
    assert out["messages"] == [*short, {"role": "assistant", "content": "Fine."}]
    assert summary.num_ended_early == 1 and summary.num_rows_out == 1
    assert summary.dropped == {"first prompt over --max-length": 1, "no assistant turn": 1, "malformed": 1}


def test_config_errors_name_the_flag():
    base = dict(model="m", data=["d.jsonl"], output="o.jsonl")
    for kwargs, flag in [
        (dict(temperature=-1.0), "--temperature"),
        (dict(top_p=0.0), "--top-p"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(max_length=8, max_new_tokens=8), "--max-length"),
        (dict(endpoint="http://localhost:1"), "--backend vllm"),
        (dict(backend="vllm", endpoint="localhost:1"), "--endpoint"),
        (dict(backend="vllm", vllm_engine_args="[1]"), "--vllm-engine-args"),
        (dict(data=[]), "--data"),
    ]:
        with pytest.raises(ValueError, match=flag):
            RegenerateConfig(**{**base, **kwargs})


# ---- the vLLM backends, without vLLM --------------------------------------------------------------


class _FakeCompletionsServer:
    """An OpenAI completions route answering like vLLM from a Hugging Face model: greedy, token ids
    back (the stop token included, as vLLM returns it), finish reason ``stop`` or ``length``."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.bodies: list[dict] = []
        self.max_in_flight = self._in_flight = 0
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply({"data": [{"id": "tiny-served", "max_model_len": 512}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(server.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def complete(self, body):
        with self._lock:
            self.bodies.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            ids = torch.tensor([body["prompt"]])
            with self._model_lock:
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    eos_token_id=body["stop_token_ids"],
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = out[0, ids.shape[1] :].tolist()
            stops = [n for n, t in enumerate(new) if t in body["stop_token_ids"]]
            new = new[: stops[0] + 1] if stops else new
            reason = "stop" if stops else "length"
            return {"choices": [{"text": "ignored", "token_ids": new, "finish_reason": reason}]}
        finally:
            with self._lock:
                self._in_flight -= 1

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_endpoint_backend_answers_like_the_hf_backend(chatty_target, source, greedy_run, tmp_path):
    server = _FakeCompletionsServer(chatty_target)
    try:
        output = tmp_path / "endpoint.jsonl"
        config = _config(
            chatty_target, source, output, backend="vllm", endpoint=server.url, concurrency=3, chunk_size=5
        )
        summary = regenerate(config)
    finally:
        server.close()

    assert _lines(output) == _lines(greedy_run[0])
    assert summary.num_answers == len(server.bodies) == greedy_run[1].num_answers
    assert 1 < server.max_in_flight <= 3
    tokenizer = AutoTokenizer.from_pretrained(str(chatty_target))
    body = server.bodies[0]
    assert body["model"] == "tiny-served" and all(isinstance(t, int) for t in body["prompt"])
    assert body["max_tokens"] == MAX_NEW_TOKENS and body["temperature"] == 0.0 and "seed" not in body
    assert body["stop_token_ids"] == [tokenizer.eos_token_id] and body["return_token_ids"] is True


def test_endpoint_model_name_and_context_limit_come_from_the_server(chatty_target):
    from producer.regenerate import _max_length
    from producer.vllm.generate import EndpointGenerator

    server = _FakeCompletionsServer(chatty_target)
    try:
        config = _config(chatty_target, "d.jsonl", "o.jsonl", backend="vllm", endpoint=server.url)
        generator = EndpointGenerator(config, stop_ids={2})
        assert (generator.model, generator.max_model_len) == ("tiny-served", 512)
        assert _max_length(config, generator) == 512  # under the target's max_position_embeddings (4096)
        with pytest.raises(ValueError, match="not --served-model-name 'other'"):
            EndpointGenerator(dataclasses.replace(config, served_model_name="other"), stop_ids={2})
        generator.close()
    finally:
        server.close()


def test_in_process_vllm_generator_sends_token_prompts_seeds_and_reads_finish_reasons(monkeypatch):
    """``InProcessGenerator`` against a stand-in ``vllm`` module: what it asks of vLLM and how it reads
    the answers (stop token cut, ``length`` = truncated). The real engine runs in the vLLM lane."""
    made = {}

    class LLM:
        def __init__(self, **kwargs):
            made["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            made["params"] = params
            answers = [([7, 8, 2, 9], "stop"), ([5, 6, 7], "length")]
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=why)])
                for (ids, why), _ in zip(answers, prompts)
            ]

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.SamplingParams = lambda **kwargs: kwargs
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    from producer.vllm.generate import InProcessGenerator

    config = RegenerateConfig(
        model="m",
        dtype="bfloat16",
        data=["d"],
        output="o",
        backend="vllm",
        temperature=0.7,
        max_new_tokens=3,
        vllm_engine_args='{"enforce_eager": true, "max_model_len": 512}',
    )
    generator = InProcessGenerator(config, stop_ids={2})
    answers = dict(generator.generate([Request([1, 2, 3], 11), Request([4], 12)], seed=0))

    assert made["llm"] == dict(model="m", dtype="bfloat16", seed=0, enforce_eager=True, max_model_len=512)
    assert [p["seed"] for p in made["params"]] == [11, 12]
    assert all(p["max_tokens"] == 3 and p["stop_token_ids"] == [2] and p["top_k"] == 0 for p in made["params"])
    assert answers[0] == (([7, 8], None, False, 3)) and answers[1] == ([5, 6, 7], None, True, 3)
    with pytest.raises(ValueError, match="--vllm-engine-args may not set model"):
        InProcessGenerator(
            RegenerateConfig(model="m", data=["d"], output="o", backend="vllm", vllm_engine_args='{"model": "x"}'),
            stop_ids={2},
        )
