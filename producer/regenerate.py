"""``draftstream regenerate``: replace a conversation dataset's assistant turns with the target's own answers.

A draft learns to predict its target. Trained on the answers some other model wrote, it learns that
other model's text; trained on the target's own answers it learns what it will be asked to draft.
This command keeps the system, user and tool turns of each conversation and has the target answer
every assistant turn, in order: turn k is answered with the regenerated turns before it in context.

    --data (json/jsonl/folder/saved dataset/preset, the sources prepare reads)
        |  rows in order, --chunk-size rows at a time
        v
    round k of a chunk: each conversation's k-th assistant turn
        prompt = chat template(context so far, add_generation_prompt)  -> token ids
        |
        v
    backend: hf (model.generate, left-padded batches of --batch-size, longest first, KV cache)
             vllm (vllm.LLM in this process, or --endpoint http://HOST:PORT with --concurrency N)
        |
        v
    answer = generated tokens up to the first stop token, decoded
             (cut at --max-new-tokens: "truncated": true, and the conversation ends there)
        |
        v
    --output FILE.jsonl: one line per conversation ({... other fields, "messages": [...]}),
    appended and fsynced per chunk; FILE.jsonl.index.json says how many input rows are done

The output is what ``draftstream prepare --data FILE.jsonl`` reads; prepare gives a truncated
answer no end-of-turn token (``producer.conversation``). Greedy by default; ``--temperature T``
samples (with ``--top-p``), seeded by ``--seed``: per chunk and turn for the Hugging Face backend
(chunks start at multiples of ``--chunk-size``, so a resumed run draws what an uninterrupted one
would; a ``--max-samples`` that ends inside a chunk changes that chunk's draws), per request for vLLM. The target's generation_config sampling settings (top_k, repetition penalty)
are not applied. Resumable: running the same command again continues after the last complete chunk
(a partly written chunk is cut off), and refuses if the settings that shape the answers changed.
Conversations are dropped and counted when malformed, when they have no assistant turn, or when the
first turn's prompt plus ``--max-new-tokens`` exceeds ``--max-length``; a later turn over it ends the
conversation before that turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producer.backend import DTYPE_CHOICES
from producer.conversation import ASSISTANT, MalformedConversation, normalize_turns
from producer.generate import Generator, HFGenerator, Request, stop_token_ids
from producer.prepare import load_source
from protocol.cli import DefaultsHelpFormatter, config_defaults
from protocol.logs import setup_logging
from protocol.target import read_text_config

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
INDEX_SUFFIX = ".index.json"
# Settings that shape the answers: a resumed run must have the same ones.
_RESUME_KEYS = (
    "model",
    "data",
    "backend",
    "dtype",
    "max_new_tokens",
    "max_length",
    "temperature",
    "top_p",
    "seed",
    "chunk_size",
)

DROP_MALFORMED = "malformed"
DROP_NO_ASSISTANT = "no assistant turn"
DROP_TOO_LONG = "first prompt over --max-length"


@dataclasses.dataclass(kw_only=True)
class RegenerateConfig:
    model: str
    data: list[str]
    output: str
    backend: str = "hf"
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_samples: int | None = None
    max_length: int | None = None  # prompt + answer tokens; None: the target's max_position_embeddings
    chunk_size: int = 256
    dtype: str = "auto"
    # --backend hf:
    device: str = "auto"
    batch_size: int = 16
    # --backend vllm:
    endpoint: str | None = None
    served_model_name: str | None = None
    concurrency: int = 16
    request_timeout: float = 600.0
    vllm_engine_args: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one source")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        for flag, value in (
            ("--max-new-tokens", self.max_new_tokens),
            ("--chunk-size", self.chunk_size),
            ("--batch-size", self.batch_size),
            ("--concurrency", self.concurrency),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.max_length is not None and self.max_length <= self.max_new_tokens:
            raise ValueError(f"--max-length ({self.max_length}) must exceed --max-new-tokens ({self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.backend != "vllm":
            given = [f for f, v in (("--endpoint", self.endpoint), ("--vllm-engine-args", self.vllm_engine_args)) if v]
            if given:
                raise ValueError(f"{', '.join(given)} need --backend vllm")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be http://HOST:PORT, got {self.endpoint!r}")
        if self.endpoint is not None and self.vllm_engine_args:
            raise ValueError("--vllm-engine-args apply to the in-process engine, not to --endpoint")
        self.engine_args()  # validates the JSON

    def engine_args(self) -> dict[str, Any]:
        if not self.vllm_engine_args:
            return {}
        try:
            args = json.loads(self.vllm_engine_args)
        except json.JSONDecodeError as e:
            raise ValueError(f"--vllm-engine-args is not JSON: {e}") from None
        if not isinstance(args, dict):
            raise ValueError("--vllm-engine-args must be a JSON object")
        return args

    def resume_settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _RESUME_KEYS}


# ---- conversations -------------------------------------------------------------------------------


class _Conversation:
    """One row being regenerated: its source messages, and the regenerated ones so far."""

    def __init__(self, index: int, fields: dict[str, Any], messages: list[dict[str, Any]]):
        self.index = index
        self.fields = fields
        self.source = messages
        self.out: list[dict[str, Any]] = []
        self.cursor = 0  # next source message to copy or answer
        self.done = False
        self.num_answers = 0
        self.ended = ""  # why it ended before its last assistant turn, if it did

    def next_prompt(self) -> list[dict[str, Any]] | None:
        """Copy context up to the next assistant turn; the messages to answer, or None when done."""
        while not self.done and self.cursor < len(self.source) and self.source[self.cursor]["role"] != ASSISTANT:
            self.out.append({"role": self.source[self.cursor]["role"], "content": self.source[self.cursor]["content"]})
            self.cursor += 1
        if self.cursor >= len(self.source):
            self.done = True
        return None if self.done else self.out

    def end(self, reason: str) -> None:
        """Stop before the next answer: the context copied for it goes too."""
        self.done = True
        self.ended = reason
        while self.out and self.out[-1]["role"] != ASSISTANT:
            self.out.pop()

    def answer(self, content: str, truncated: bool) -> None:
        message: dict[str, Any] = {"role": ASSISTANT, "content": content}
        if truncated:  # the target would have gone on: no later turn can follow it faithfully
            message["truncated"] = True
            self.done = True
        self.out.append(message)
        self.cursor += 1
        self.num_answers += 1

    def row(self) -> dict[str, Any]:
        return {**self.fields, "messages": self.out}


@dataclasses.dataclass(kw_only=True)
class RegenerateSummary:
    output: str
    num_rows_in: int = 0  # input rows read, earlier runs included
    num_rows_resumed: int = 0  # of which done by earlier runs
    num_rows_out: int = 0
    num_answers: int = 0
    num_truncated: int = 0
    num_ended_early: int = 0  # conversations ended before a turn whose prompt was over --max-length
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    num_tokens: int = 0  # this run
    seconds: float = 0.0  # this run, generation

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    def counts(self) -> dict[str, Any]:
        keys = ("num_rows_in", "num_rows_out", "num_answers", "num_truncated", "num_ended_early", "dropped")
        return {key: getattr(self, key) for key in keys}

    def format(self) -> str:
        lines = [
            f"regenerated -> {self.output}",
            f"  rows in             {self.num_rows_in}"
            + (f"  ({self.num_rows_resumed} by an earlier run)" if self.num_rows_resumed else ""),
            f"  rows out            {self.num_rows_out}",
            f"  answers             {self.num_answers}  ({self.num_truncated} truncated at --max-new-tokens)",
        ]
        if self.num_ended_early:
            lines.append(f"  ended early         {self.num_ended_early}  (a later prompt over --max-length)")
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped: {reason:<28} {count}")
        lines.append(
            f"  this run            {self.num_tokens} tokens in {self.seconds:.1f} s: {self.tokens_per_second:.1f} tokens/s"
        )
        return "\n".join(lines)


def request_seed(seed: int, row: int, turn: int) -> int:
    """A per-request seed that depends only on the run's seed and the request's place in the data."""
    return random.Random(f"{seed}:{row}:{turn}").getrandbits(31)


# ---- output and resume ---------------------------------------------------------------------------


def index_path(output: Path) -> Path:
    return output.with_name(output.name + INDEX_SUFFIX)


def _read_index(output: Path) -> dict[str, Any] | None:
    path = index_path(output)
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); remove it and {output} to start again") from None
    return index


def _write_index(output: Path, index: dict[str, Any]) -> None:
    path = index_path(output)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_output(config: RegenerateConfig, summary: RegenerateSummary) -> tuple[Any, int]:
    """The output file opened for appending at the end of its complete chunks, and the input rows
    already done (0 for a new run)."""
    output = Path(config.output)
    index = _read_index(output)
    if config.overwrite:
        if index is None and output.exists() and output.stat().st_size:
            raise ValueError(
                f"--overwrite refuses to replace {output}: it has no {INDEX_SUFFIX}, regenerate did not write it"
            )
        output.unlink(missing_ok=True)
        index_path(output).unlink(missing_ok=True)
        index = None
    if index is None:
        if output.exists() and output.stat().st_size:
            raise ValueError(f"{output} exists and has no {INDEX_SUFFIX}: it is left alone. Pick another --output")
        output.parent.mkdir(parents=True, exist_ok=True)
        index_path(output).unlink(missing_ok=True)
        _write_index(output, {"settings": config.resume_settings(), "rows_done": 0, "bytes": 0, "counts": {}})
        return output.open("wb"), 0
    if index.get("settings") != config.resume_settings():
        changed = sorted(k for k in _RESUME_KEYS if index.get("settings", {}).get(k) != config.resume_settings()[k])
        raise ValueError(
            f"{output} was started with other settings ({', '.join(changed)} differ); run with the same "
            f"ones to resume, or pass --overwrite to start again"
        )
    if not output.exists() or output.stat().st_size < index["bytes"]:
        raise ValueError(f"{output} is shorter than its {INDEX_SUFFIX} says; pass --overwrite to start again")
    f = output.open("r+b")
    f.truncate(index["bytes"])  # a chunk being written when the last run stopped
    f.seek(index["bytes"])
    counts = index.get("counts", {})
    for key, value in counts.items():
        setattr(summary, key, dict(value) if isinstance(value, dict) else value)
    summary.num_rows_resumed = index["rows_done"]
    return f, index["rows_done"]


# ---- the run -------------------------------------------------------------------------------------


def _sources(config: RegenerateConfig) -> list[tuple[Any, str]]:
    sources = []
    for spec in config.data:
        dataset = load_source(spec)
        columns = set(dataset.column_names)
        column = "conversations" if "conversations" in columns else "messages" if "messages" in columns else None
        if column is None:
            raise ValueError(f"--data {spec}: rows need a conversations or messages column; found {sorted(columns)}")
        sources.append((dataset, column))
    return sources


def _rows(sources: list[tuple[Any, str]], start: int, stop: int) -> Iterator[tuple[int, dict[str, Any], str]]:
    """``(row index, row, conversation column)`` of rows ``start <= index < stop``, in order."""
    offset = 0
    for dataset, column in sources:
        first, last = max(start - offset, 0), min(stop - offset, len(dataset))
        if first < last:
            for n, row in enumerate(dataset.select(range(first, last))):
                yield offset + first + n, row, column
        offset += len(dataset)


def _chunks(rows: Iterator[tuple[int, dict[str, Any], str]], size: int) -> Iterator[list]:
    """Rows cut at multiples of ``size`` of their index: a chunk holds the same rows (so gets the
    same batches and seeds) whichever row a run started at."""
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if (row[0] + 1) % size == 0:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


class Regenerator:
    """Regenerates chunks of rows with ``generator`` (see the module docstring)."""

    def __init__(self, config: RegenerateConfig, tokenizer, generator: Generator, *, max_length: int, progress=None):
        self.config = config
        self.tokenizer = tokenizer
        self.generator = generator
        self.max_length = max_length
        self.progress = progress

    def chunk(self, rows: list[tuple[int, dict[str, Any], str]], summary: RegenerateSummary) -> list[dict[str, Any]]:
        from jinja2 import TemplateError

        conversations: list[_Conversation] = []
        for index, row, column in rows:
            try:
                messages = normalize_turns(row[column])
            except MalformedConversation:
                summary.dropped[DROP_MALFORMED] = summary.dropped.get(DROP_MALFORMED, 0) + 1
                continue
            if not any(m["role"] == ASSISTANT for m in messages):
                summary.dropped[DROP_NO_ASSISTANT] = summary.dropped.get(DROP_NO_ASSISTANT, 0) + 1
                continue
            fields = {k: v for k, v in row.items() if k not in ("conversations", "messages")}
            conversations.append(_Conversation(index, fields, messages))

        first_row = rows[0][0]
        for turn in range(max((sum(m["role"] == ASSISTANT for m in c.source) for c in conversations), default=0)):
            asking, requests = [], []
            for conversation in conversations:
                messages = conversation.next_prompt()
                if messages is None:
                    continue
                try:
                    ids = _prompt_ids(self.tokenizer, messages)
                except TemplateError:  # the template refuses this conversation (e.g. role order)
                    conversation.end(DROP_MALFORMED)
                    continue
                if len(ids) + self.config.max_new_tokens > self.max_length:
                    conversation.end(DROP_TOO_LONG)
                    summary.num_ended_early += conversation.num_answers > 0
                    continue
                asking.append(conversation)
                requests.append(Request(ids, request_seed(self.config.seed, conversation.index, turn)))
            if not requests:
                break
            started = time.perf_counter()
            for i, generation in self.generator.generate(
                requests, seed=request_seed(self.config.seed, first_row, turn)
            ):
                text = generation.text
                if generation.token_ids is not None:
                    text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=False)
                asking[i].answer(text, generation.truncated)
                summary.num_answers += 1
                summary.num_truncated += generation.truncated
                summary.num_tokens += generation.num_tokens
                if self.progress is not None:
                    rate = summary.num_tokens / max(summary.seconds + time.perf_counter() - started, 1e-9)
                    self.progress.set_postfix(answers=summary.num_answers, tok_s=f"{rate:.1f}")
            summary.seconds += time.perf_counter() - started

        out = []
        for conversation in conversations:
            conversation.next_prompt()  # trailing context (a last user turn) of conversations that ran to the end
            if conversation.num_answers:
                out.append(conversation.row())
            else:
                summary.dropped[conversation.ended] = summary.dropped.get(conversation.ended, 0) + 1
        return out


def _make_generator(config: RegenerateConfig, tokenizer, stop_ids: set[int]) -> Generator:
    if config.backend == "hf":
        return HFGenerator(
            config.model,
            dtype=config.dtype,
            device=config.device,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stop_ids=stop_ids,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids),
        )
    from producer.vllm.generate import EndpointGenerator, InProcessGenerator

    if config.endpoint is not None:
        return EndpointGenerator(config, stop_ids=stop_ids)
    return InProcessGenerator(config, stop_ids=stop_ids)


def _max_length(config: RegenerateConfig, generator: Generator) -> int:
    """Prompt + answer tokens: --max-length, else the target's max_position_embeddings; never more
    than the engine's own limit (a vLLM server's --max-model-len)."""
    limits = [config.max_length or int(read_text_config(config.model).get("max_position_embeddings") or 1 << 62)]
    engine_limit = getattr(generator, "max_model_len", None)
    if engine_limit:
        limits.append(int(engine_limit))
    return min(limits)


def regenerate(config: RegenerateConfig, *, generator: Generator | None = None) -> RegenerateSummary:
    """Run (or resume) the whole regeneration; ``generator`` replaces the one ``config`` names."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    sources = _sources(config)
    total = sum(len(dataset) for dataset, _ in sources)
    if config.max_samples is not None:
        total = min(total, config.max_samples)
    summary = RegenerateSummary(output=config.output)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    output, rows_done = _open_output(config, summary)
    try:
        if rows_done >= total:
            return summary
        stop_ids = stop_token_ids(config.model, tokenizer)
        owned = generator is None
        generator = generator or _make_generator(config, tokenizer, stop_ids)
        progress = tqdm(
            total=total, initial=rows_done, unit="conv", desc="regenerate", dynamic_ncols=True, disable=None
        )
        try:
            regenerator = Regenerator(
                config, tokenizer, generator, max_length=_max_length(config, generator), progress=progress
            )
            for chunk in _chunks(_rows(sources, rows_done, total), config.chunk_size):
                rows = regenerator.chunk(chunk, summary)
                output.write(
                    b"".join(json.dumps(row, ensure_ascii=False, default=str).encode() + b"\n" for row in rows)
                )
                output.flush()
                os.fsync(output.fileno())
                rows_done = chunk[-1][0] + 1
                summary.num_rows_in = rows_done
                summary.num_rows_out += len(rows)
                index = {"settings": config.resume_settings(), "rows_done": rows_done, "bytes": output.tell()}
                _write_index(Path(config.output), {**index, "counts": summary.counts()})
                progress.update(len(chunk))
                log.info(
                    "rows %d/%d, %d answers (%d truncated), %.1f tokens/s",
                    rows_done,
                    total,
                    summary.num_answers,
                    summary.num_truncated,
                    summary.tokens_per_second,
                )
        finally:
            progress.close()
            if owned:
                generator.close()
    finally:
        output.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream regenerate",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="target model folder (or hub id): answers and chat template")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        help="conversations, repeatable: .json/.jsonl file or folder, saved dataset, sharegpt, ultrachat, hf:<id>[:<split>]",
    )
    parser.add_argument(
        "--output", required=True, help="the .jsonl file to write (and resume); FILE.index.json beside it"
    )
    parser.add_argument("--backend", choices=BACKENDS, help="hf (transformers) or vllm")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer; longer ones are cut and marked truncated")
    parser.add_argument("--temperature", type=float, help="0: greedy; > 0: sampled")
    parser.add_argument("--top-p", type=float, help="nucleus sampling when --temperature > 0")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--max-samples", type=int, help="only the first N rows")
    parser.add_argument(
        "--max-length", type=int, help="prompt + answer tokens (default: the target's max_position_embeddings)"
    )
    parser.add_argument("--chunk-size", type=int, help="conversations per round trip and per resumable write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="target dtype (auto: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing an --output regenerate wrote")
    hf = parser.add_argument_group("--backend hf")
    hf.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    hf.add_argument("--batch-size", type=int, help="prompts per model.generate call")
    vllm = parser.add_argument_group("--backend vllm")
    vllm.add_argument("--endpoint", help="a running vLLM server, http://HOST:PORT (default: an in-process engine)")
    vllm.add_argument("--served-model-name", help="the server's model name (default: the first it lists)")
    vllm.add_argument("--concurrency", type=int, help="requests in flight against --endpoint")
    vllm.add_argument("--request-timeout", type=float, help="seconds one --endpoint request may take")
    vllm.add_argument(
        "--vllm-engine-args",
        help='in-process engine: JSON of more vllm.LLM arguments, e.g. \'{"enforce_eager": true, "max_model_len": 4096}\'',
    )
    parser.set_defaults(**config_defaults(RegenerateConfig))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("regenerate")
    try:
        summary = regenerate(RegenerateConfig(**vars(args)))
    except (ValueError, ConnectionError) as e:
        print(f"draftstream regenerate: error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":  # the guard matters for --backend vllm: vLLM spawns its engine core
    raise SystemExit(main())
