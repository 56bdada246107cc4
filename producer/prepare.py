"""``draftstream prepare``: conversations -> the prepared training dataset + ``token_freq.pt``.

The output is what the speculators tools read: a ``datasets.Dataset`` saved with ``save_to_disk``
(``torch`` format set) with columns ``input_ids`` (list of int), ``loss_mask`` (list of 0/1) and
``seq_len`` (int), and beside it ``token_freq.pt``, a ``torch.save``d ``dict[int, int]`` counting
the token ids at supervised positions over the whole set. Row ``i`` of this dataset is sample id
``i`` everywhere downstream (``hs_{i}.safetensors``, producer grants).

Sources (``--data``, repeatable): local ``.json``/``.jsonl`` files or folders of them, a folder
written by ``save_to_disk``, the presets ``sharegpt`` / ``ultrachat``, or ``hf:<id>[:<split>]``.
Rows carry ``conversations`` or ``messages`` (tokenized with the target's chat template, see
``producer.conversation``), or already ``input_ids`` + ``loss_mask`` (passed through). An assistant
turn marked ``"truncated": true`` (``draftstream regenerate``'s answers cut at ``--max-new-tokens``)
gets no end-of-turn token in its loss mask, nor in the tokens when it ends the row. Each source
is shuffled with ``--seed``; rows are clipped to ``--seq-length``; rows left with no supervised
token, or fewer than ``--minimum-valid-tokens``, are dropped and counted, as are malformed rows
(unknown role, non-text content, a template that refuses the conversation). Then all sources are
concatenated, shuffled again and cut to ``--max-samples``.

The dataset is written to a temporary sibling folder and renamed into place, so ``--output`` holds
either nothing new or a complete dataset; an existing output is left alone unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from producer.conversation import ChatTemplateError, ConversationEncoder, MalformedConversation, normalize_turns
from protocol.logs import setup_logging

log = logging.getLogger(__name__)

# name -> (hub dataset id, split); both are ShareGPT/OpenAI-style conversations.
PRESETS = {
    "sharegpt": ("Aeala/ShareGPT_Vicuna_unfiltered", "train"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
}
TOKEN_FREQ_FILE = "token_freq.pt"
# How many raw rows per source to tokenize when --max-samples is set: drops leave room to spare.
_SOURCE_SLACK = 3

DROP_MALFORMED = "malformed"
DROP_UNSUPERVISED = "no supervised token"
DROP_BELOW_MINIMUM = "below --minimum-valid-tokens"


@dataclasses.dataclass(kw_only=True)
class PrepareConfig:
    model: str
    data: list[str]
    output: str
    max_samples: int | None = None
    seq_length: int = 8192
    seed: int = 0
    minimum_valid_tokens: int = 1
    num_workers: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one source")
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.minimum_valid_tokens < 0:
            raise ValueError(f"--minimum-valid-tokens must be >= 0, got {self.minimum_valid_tokens}")
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {self.num_workers}")


@dataclasses.dataclass(kw_only=True)
class PrepareSummary:
    """Counts of one prepare run, plus one rendered row as ``(text, supervised)`` segments."""

    output: str
    num_rows_in: int = 0
    num_rows_out: int = 0
    num_tokens: int = 0
    num_supervised_tokens: int = 0
    num_clipped: int = 0
    num_passthrough: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    drop_examples: dict[str, str] = dataclasses.field(default_factory=dict)
    example: list[tuple[str, bool]] = dataclasses.field(default_factory=list)

    @property
    def supervised_fraction(self) -> float:
        return self.num_supervised_tokens / self.num_tokens if self.num_tokens else 0.0

    def format(self, *, color: bool = False) -> str:
        lines = [
            f"prepared dataset -> {self.output}",
            f"  rows in             {self.num_rows_in}",
            f"  rows out            {self.num_rows_out}"
            + (f"  ({self.num_passthrough} pre-tokenized)" if self.num_passthrough else ""),
            f"  tokens              {self.num_tokens}",
            f"  supervised tokens   {self.num_supervised_tokens}  ({self.supervised_fraction:.1%})",
            f"  clipped rows        {self.num_clipped}  (kept, cut at --seq-length)",
        ]
        for reason, count in sorted(self.dropped.items()):
            example = f"  e.g. {self.drop_examples[reason]}" if reason in self.drop_examples else ""
            lines.append(f"  dropped: {reason:<28} {count}{example}")
        if self.example:
            on, off = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
            rendered = "".join(f"{on}{text}{off}" if supervised else text for text, supervised in self.example)
            lines += ["", f"row 0 (supervised part between {'green' if color else '[[ ]]'}):", rendered]
        return "\n".join(lines)


def _features():
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence  # List is datasets>=4
    return datasets.Features(
        {
            "input_ids": seq(datasets.Value("int64")),
            "loss_mask": seq(datasets.Value("int64")),
            "seq_len": datasets.Value("int64"),
            "drop": datasets.Value("string"),
            "clipped": datasets.Value("bool"),
        }
    )


def load_source(spec: str):
    """One ``--data`` entry as a ``datasets.Dataset``."""
    import datasets

    path = Path(spec)
    if spec.endswith((".json", ".jsonl")):
        if not path.is_file():
            raise ValueError(f"--data {spec}: no such file")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if path.is_dir():
        if (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        files = sorted(str(p) for p in (*path.rglob("*.json"), *path.rglob("*.jsonl")))
        if not files:
            raise ValueError(f"--data {spec}: folder holds no .json/.jsonl files")
        return datasets.load_dataset("json", data_files=files, split="train")
    if spec in PRESETS:
        hub_id, split = PRESETS[spec]
        return datasets.load_dataset(hub_id, split=split)
    if spec.startswith("hf:"):
        hub_id, _, split = spec[3:].partition(":")
        if not hub_id:
            raise ValueError(f"--data {spec}: expected hf:<dataset id>[:<split>]")
        return datasets.load_dataset(hub_id, split=split or "train")
    raise ValueError(
        f"--data {spec!r}: not a .json/.jsonl file, a folder of them, a saved dataset, a preset "
        f"({', '.join(sorted(PRESETS))}) or hf:<id>[:<split>]"
    )


def _row(out: dict, ids: list[int], mask: list[int], *, seq_length: int, minimum: int, drop: str = "") -> None:
    clipped = len(ids) > seq_length
    ids, mask = ids[:seq_length], mask[:seq_length]
    if not drop:
        num_supervised = sum(mask)
        if num_supervised == 0:
            drop = DROP_UNSUPERVISED
        elif num_supervised < minimum:
            drop = DROP_BELOW_MINIMUM
    if drop:  # keep dropped rows tiny: only the reason survives to the summary
        ids, mask, clipped = [], [], False
    out["input_ids"].append(ids)
    out["loss_mask"].append(mask)
    out["seq_len"].append(len(ids))
    out["drop"].append(drop)
    out["clipped"].append(clipped)


def _tokenize_batch(
    examples: dict, *, column: str, encoder: ConversationEncoder, seq_length: int, minimum: int
) -> dict:
    from jinja2 import TemplateError

    out: dict[str, list] = {name: [] for name in ("input_ids", "loss_mask", "seq_len", "drop", "clipped")}
    for turns in examples[column]:
        try:
            ids, mask = encoder.encode(normalize_turns(turns))
        except ChatTemplateError:
            raise
        except (MalformedConversation, TemplateError) as e:  # a template may refuse, e.g. on role order
            _row(out, [], [], seq_length=seq_length, minimum=minimum, drop=f"{DROP_MALFORMED}: {e}")
            continue
        _row(out, ids, mask, seq_length=seq_length, minimum=minimum)
    return out


def _passthrough_batch(examples: dict, *, seq_length: int, minimum: int) -> dict:
    out: dict[str, list] = {name: [] for name in ("input_ids", "loss_mask", "seq_len", "drop", "clipped")}
    for ids, mask in zip(examples["input_ids"], examples["loss_mask"]):
        if len(ids) != len(mask):
            raise ValueError(f"pre-tokenized row has {len(ids)} input_ids but {len(mask)} loss_mask values")
        _row(out, [int(x) for x in ids], [1 if x else 0 for x in mask], seq_length=seq_length, minimum=minimum)
    return out


def count_token_freq(dataset) -> dict[int, int]:
    """``{token id: count}`` over supervised positions of the whole dataset."""
    counts = np.zeros(0, dtype=np.int64)
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
        mask = table.column("loss_mask").combine_chunks().flatten().to_numpy()
        batch = np.bincount(ids[mask == 1])
        if batch.shape[0] > counts.shape[0]:
            counts = np.pad(counts, (0, batch.shape[0] - counts.shape[0]))
        counts[: batch.shape[0]] += batch
    return {int(i): int(counts[i]) for i in np.flatnonzero(counts)}


def _render(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            segments.append((tokenizer.decode(ids[start:t]), bool(mask[start])))
            start = t
    return segments


def _looks_prepared(path: Path) -> bool:
    return any((path / name).exists() for name in ("state.json", "dataset_info.json", TOKEN_FREQ_FILE))


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not overwrite:
        raise ValueError(
            f"--output {output} already exists and is not empty; it is left alone. Pass --overwrite to replace it"
        )
    if not output.is_dir() or not _looks_prepared(output):
        raise ValueError(f"--overwrite refuses to delete {output}: it does not look like a prepared dataset")


def prepare_dataset(config: PrepareConfig) -> PrepareSummary:
    """Run the whole preparation (see the module docstring) and return its summary."""
    import datasets
    from transformers import AutoTokenizer

    output = Path(config.output)
    _check_output(output, config.overwrite)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    encoder: ConversationEncoder | None = None
    summary = PrepareSummary(output=str(output))
    limits = dict(seq_length=config.seq_length, minimum=max(1, config.minimum_valid_tokens))
    parts = []
    for spec in config.data:
        raw = load_source(spec).shuffle(seed=config.seed)
        if config.max_samples is not None and len(raw) > _SOURCE_SLACK * config.max_samples:
            raw = raw.select(range(_SOURCE_SLACK * config.max_samples))
        columns = set(raw.column_names)
        if {"input_ids", "loss_mask"} <= columns:
            fn, kwargs = _passthrough_batch, dict(limits)
        else:
            column = "conversations" if "conversations" in columns else "messages" if "messages" in columns else None
            if column is None:
                raise ValueError(
                    f"--data {spec}: rows need a conversations or messages column, or input_ids + loss_mask; "
                    f"found {sorted(columns)}"
                )
            encoder = encoder or ConversationEncoder(tokenizer, model_name=config.model)
            fn, kwargs = _tokenize_batch, dict(limits, column=column, encoder=encoder)
        mapped = raw.map(
            fn,
            fn_kwargs=kwargs,
            batched=True,
            batch_size=256,
            num_proc=min(config.num_workers, len(raw)) if config.num_workers > 1 and len(raw) > 1 else None,
            remove_columns=raw.column_names,
            features=_features(),
            keep_in_memory=True,
            desc=f"tokenize {spec}",
        )
        drops = mapped["drop"]
        keep = [i for i, reason in enumerate(drops) if not reason]
        for reason in filter(None, drops):
            category, _, detail = reason.partition(": ")
            summary.dropped[category] = summary.dropped.get(category, 0) + 1
            if detail:
                summary.drop_examples.setdefault(category, detail)
        summary.num_rows_in += len(raw)
        if fn is _passthrough_batch:
            summary.num_passthrough += len(keep)
        parts.append(mapped.select(keep))
        log.info("%s: %d rows read, %d kept", spec, len(raw), len(keep))

    dataset = datasets.concatenate_datasets(parts).shuffle(seed=config.seed)
    if config.max_samples is not None and len(dataset) > config.max_samples:
        dataset = dataset.select(range(config.max_samples))
    if len(dataset) == 0:
        reasons = "; ".join(
            f"{n} {why} (e.g. {summary.drop_examples.get(why, '-')})" for why, n in summary.dropped.items()
        )
        raise ValueError(f"no rows left to write: {reasons or 'the sources hold no rows'}")
    summary.num_clipped = sum(dataset["clipped"])
    dataset = dataset.remove_columns(["drop", "clipped"])
    dataset.set_format("torch")  # the speculators readers compare rows as tensors
    token_freq = count_token_freq(dataset)
    summary.num_rows_out = len(dataset)
    summary.num_tokens = sum(dataset.with_format(None)["seq_len"])
    summary.num_supervised_tokens = sum(token_freq.values())
    first = dataset.with_format(None)[0]
    summary.example = _render(tokenizer, first["input_ids"], first["loss_mask"])

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        dataset.save_to_disk(str(tmp))
        torch.save(token_freq, tmp / TOKEN_FREQ_FILE)
        _check_output(output, config.overwrite)  # somebody may have written it meanwhile
        if output.is_dir():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="target model (local folder or hub id): its tokenizer and chat template"
    )
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        help="source, repeatable: .json/.jsonl file or folder, saved dataset, sharegpt, ultrachat, hf:<id>[:<split>]",
    )
    parser.add_argument("--output", required=True, help="folder to write the prepared dataset and token_freq.pt into")
    parser.add_argument("--max-samples", type=int, default=None, help="keep at most this many rows (after shuffling)")
    parser.add_argument("--seq-length", type=int, default=8192, help="clip rows to this many tokens (default 8192)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument(
        "--minimum-valid-tokens", type=int, default=1, help="drop rows with fewer supervised tokens (default 1)"
    )
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("prepare")
    try:
        summary = prepare_dataset(PrepareConfig(**vars(args)))
    except ValueError as e:
        print(f"draftstream prepare: error: {e}", file=sys.stderr)
        return 1
    print(summary.format(color=sys.stdout.isatty()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
