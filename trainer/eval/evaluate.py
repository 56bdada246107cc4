"""``draftstream eval``: acceptance length of a saved draft against its target (Hugging Face, or vLLM).

Greedy speculative decoding (``trainer/eval/speculate.py``) of held-out prompts: the draft proposes K
tokens per round, the target verifies them greedily, and the counters are vLLM's, so the figures
read like ``vllm serve``'s "SpecDecoding metrics" log line (mean acceptance length including the
bonus token, per-position acceptance rate)::

    draftstream eval --checkpoint ./out/checkpoints/checkpoint_best --data ./out/prepared \\
        --num-prompts 64 --max-new-tokens 256 --output acceptance.csv

Target and draft keep KV caches, and ``--batch-size`` prompts are decoded in lockstep (one target
forward per round for all of them); the counters are those of decoding each prompt alone.

``--backend vllm`` serves the checkpoint in vLLM instead (``trainer/eval/vllm_backend.py``: in-process
``vllm.LLM`` with the checkpoint as its ``eagle3`` speculator, P-EAGLE with parallel drafting), runs
the same prompts greedily with the same ``--max-new-tokens`` and reads vLLM's own counters
(``vllm:spec_decode_num_drafts``, ``_num_accepted_tokens``, ``_num_accepted_tokens_per_pos``): the
same table, CSV and JSON, from the engine that will serve the draft. ``--vllm-engine-args`` passes
more ``vllm.LLM`` arguments (JSON); it needs vLLM importable (``pip install 'draftstream[vllm]'``, or
the ``.venv-vllm`` environment), and on a CPU engine ``VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1``::

    draftstream eval --backend vllm --checkpoint ./out/checkpoints/checkpoint_best --data ./out/prepared \\
        --vllm-engine-args '{"gpu_memory_utilization": 0.5}'

Prompts (``--data``, repeatable; each source is one subset of the results, plus ``all``):

- a prepared dataset (``draftstream prepare`` output): each row's tokens up to its first supervised
  position, i.e. the conversation up to the first assistant answer, exactly as training saw it;
  ``--val-only`` keeps only the rows ``draftstream train`` held out for validation (same
  ``--val-ratio`` and ``--seed``);
- a ``.jsonl`` / ``.json`` file of conversations (``conversations`` or ``messages`` turns): the
  turns before the first assistant turn, rendered with the target tokenizer's chat template and
  ``add_generation_prompt``, as a chat request to ``vllm serve`` would be (rows that carry
  ``input_ids`` + ``loss_mask`` instead are cut like prepared rows).

Output: a table, a CSV (``--output``) with the columns vLLM-metrics tools read (``subset,
num_drafts, num_draft_tokens, num_accepted_tokens, acceptance_length, acceptance_at_pos_0..K-1``),
then the decoding speed (generated tokens per second and wall time, target and draft loading
excluded, as is vLLM's engine start), and one JSON line at the end of stdout (the rows plus
``backend``, ``seconds`` and ``tokens_per_second``). Exit status 2 for a usage or data error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
import types
from pathlib import Path

import torch

from protocol.dataset import PreparedDataset
from protocol.devices import resolve_device
from protocol.logs import setup_logging
from trainer.data.sources import VAL_RATIO, split_train_val
from trainer.eval.speculate import AcceptanceStats, HFTarget, generate_batch, stats_of
from trainer.models.export import load_draft
from trainer.training.config import LoopConfig

BACKENDS = ("hf", "vllm")

logger = logging.getLogger("trainer.eval.evaluate")

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}


def csv_columns(num_speculative_tokens: int) -> list[str]:
    base = ["subset", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "acceptance_length"]
    return base + [f"acceptance_at_pos_{p}" for p in range(num_speculative_tokens)]


def csv_row(subset: str, stats: AcceptanceStats) -> dict:
    row = {
        "subset": subset,
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "acceptance_length": round(stats.acceptance_length, 6),
    }
    for p, rate in enumerate(stats.acceptance_per_pos):
        row[f"acceptance_at_pos_{p}"] = round(rate, 6)
    return row


# --- prompts --------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class PromptSet:
    name: str  # the subset name in the results
    prompts: list[list[int]]
    num_skipped: int = 0  # rows without a usable prompt


def _subset_name(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix in (".json", ".jsonl") else path.name or spec


def prepared_prompts(path: Path, *, val_only: bool, val_ratio: float, seed: int) -> tuple[list[list[int]], int]:
    """Row tokens up to the first supervised position; rows with none (or none before it) skipped."""
    dataset = PreparedDataset(path)
    rows = split_train_val(len(dataset), val_ratio=val_ratio, seed=seed)[1] if val_only else range(len(dataset))
    prompts, skipped = [], 0
    for i in rows:
        ids, mask = dataset.row(i)
        prompt = _prefix_before_first_supervised(ids.tolist(), mask.tolist())
        skipped += prompt is None
        if prompt is not None:
            prompts.append(prompt)
    return prompts, skipped


def _read_rows(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("data") or data.get("rows") or []
    if not isinstance(data, list):
        raise ValueError(f"--data {path}: expected a list of rows")
    return data


def _prompt_turns(row: dict) -> list[dict[str, str]] | None:
    """The turns before the first assistant turn, with canonical roles; None when unusable."""
    turns = row.get("conversations") if row.get("conversations") is not None else row.get("messages")
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = _ROLES.get(str(turn.get("role") if turn.get("role") is not None else turn.get("from")).lower())
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None or not isinstance(content, str):
            return None
        if role == "assistant":
            break
        messages.append({"role": role, "content": content})
    return messages if any(m["role"] != "system" for m in messages) else None


def _prefix_before_first_supervised(ids: list[int], mask: list[int]) -> list[int] | None:
    first = next((i for i, m in enumerate(mask) if m), None)
    return list(ids[:first]) if first else None


def conversation_prompts(path: Path, tokenizer) -> tuple[list[list[int]], int]:
    """Prompts of a .json/.jsonl file: conversations rendered with the chat template, or
    already-tokenized rows (``input_ids`` + ``loss_mask``) cut before the first supervised token."""
    prompts, skipped = [], 0
    for row in _read_rows(path):
        if isinstance(row, dict) and "input_ids" in row and "loss_mask" in row:
            prompt = _prefix_before_first_supervised(row["input_ids"], row["loss_mask"])
            skipped += prompt is None
            if prompt is not None:
                prompts.append([int(t) for t in prompt])
            continue
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--data {path}: conversations need the target tokenizer's chat template, and it has none")
        turns = _prompt_turns(row) if isinstance(row, dict) else None
        if turns is None:
            skipped += 1
            continue
        encoded = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        prompts.append([int(t) for t in ids])
    return prompts, skipped


def load_prompts(spec: str, tokenizer, args: argparse.Namespace) -> PromptSet:
    path = Path(spec)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        prompts, skipped = conversation_prompts(path, tokenizer)
    elif path.is_dir():
        prompts, skipped = prepared_prompts(path, val_only=args.val_only, val_ratio=args.val_ratio, seed=args.seed)
    else:
        raise ValueError(f"--data {spec}: not a prepared dataset directory nor a .json/.jsonl file")
    prompts = prompts[args.skip_prompts : args.skip_prompts + args.num_prompts]
    if not prompts:
        raise ValueError(
            f"--data {spec}: no prompts left ({skipped} rows had none; --skip-prompts {args.skip_prompts})"
        )
    return PromptSet(name=_subset_name(spec), prompts=prompts, num_skipped=skipped)


# --- CLI ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftstream eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="saved draft directory (config.json + model.safetensors)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="hf",
        help="hf: our speculative decoding with the Hugging Face target; vllm: the checkpoint served in vLLM "
        "(in-process vllm.LLM), figures from vLLM's own spec-decode counters",
    )
    p.add_argument(
        "--verifier-name-or-path", default=None, help="target model; default: the one the checkpoint records"
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="prepared dataset directory or conversations .json/.jsonl; repeatable (one subset each)",
    )
    p.add_argument("--num-prompts", type=int, default=32, help="prompts per --data source")
    p.add_argument("--skip-prompts", type=int, default=0, help="skip this many prompts of each source first")
    p.add_argument(
        "--val-only", action="store_true", help="prepared datasets: only the rows `train` held out for validation"
    )
    p.add_argument("--val-ratio", type=float, default=VAL_RATIO, help="with --val-only: the training run's --val-ratio")
    p.add_argument("--seed", type=int, default=LoopConfig.seed, help="with --val-only: the training run's --seed")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="K tokens proposed per round; default: the checkpoint's speculative_tokens",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="--backend hf: prompts decoded in lockstep, one target forward per round for all; "
        "the figures do not depend on it (vLLM batches by itself)",
    )
    p.add_argument("--output", default=None, help="write the results as CSV here")
    p.add_argument(
        "--device", default="auto", help="--backend hf: auto, cpu, cuda or cuda:N (vLLM runs on its own platform)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="target dtype (vLLM: target and draft); auto = the checkpoint's (what training captured)",
    )
    p.add_argument(
        "--vllm-engine-args",
        default=None,
        help="--backend vllm: JSON of more vllm.LLM arguments, e.g. "
        '\'{"enforce_eager": true, "max_model_len": 4096, "gpu_memory_utilization": 0.5}\'; '
        "a speculative_config object is merged into the checkpoint's. Default: enforce_eager without CUDA, "
        "max_model_len = longest prompt + --max-new-tokens + K + 1",
    )
    return p


def _check_backend_args(args: argparse.Namespace) -> None:
    """The flags of one backend given to the other (before any file is read)."""
    backend = getattr(args, "backend", "hf")
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "vllm":
        if getattr(args, "vllm_engine_args", None):
            raise ValueError("--vllm-engine-args needs --backend vllm")
        return
    from trainer.eval.vllm_backend import parse_engine_args

    if args.device != "auto":
        raise ValueError(
            f"--device {args.device} applies to --backend hf; vLLM runs on its own platform "
            "(CUDA_VISIBLE_DEVICES, VLLM_TARGET_DEVICE=cpu)"
        )
    parse_engine_args(args.vllm_engine_args)  # validates the JSON and the keys it may set


def _check_args(args: argparse.Namespace) -> torch.device | None:
    _check_backend_args(args)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.skip_prompts < 0:
        raise ValueError(f"--skip-prompts must be >= 0, got {args.skip_prompts}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_speculative_tokens is not None and args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise ValueError(f"--checkpoint {args.checkpoint}: no config.json (give an epoch folder or checkpoint_best)")
    if getattr(args, "backend", "hf") == "vllm":
        from trainer.eval.vllm_backend import require_vllm

        require_vllm()
        return None
    return resolve_device(args.device)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _eos_ids_from_files(verifier: str, tokenizer) -> list[int]:
    """``_eos_ids`` without loading the target: its generation_config.json and config.json, as
    ``from_pretrained`` reads them (no generation config: the model config's EOS)."""
    from transformers import GenerationConfig

    from protocol.target import read_text_config

    config = types.SimpleNamespace(eos_token_id=read_text_config(verifier).get("eos_token_id"))
    try:
        generation = GenerationConfig.from_pretrained(verifier)
    except OSError:
        generation = types.SimpleNamespace(eos_token_id=None)
    return _eos_ids(types.SimpleNamespace(generation_config=generation, config=config), tokenizer)


def _load_tokenizer(verifier: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(verifier)
    except (OSError, ValueError):  # a target without tokenizer files still evaluates prepared data
        return None


def print_table(rows: list[dict], num_prompts: dict[str, int], k: int) -> None:
    head = f"{'subset':<20} {'prompts':>7} {'drafts':>7} {'drafted':>8} {'accepted':>8} {'acc.len':>7}"
    head += "".join(f" {'pos' + str(p):>6}" for p in range(k))
    print(head)
    print("-" * len(head))
    for row in rows:
        line = (
            f"{row['subset']:<20} {num_prompts[row['subset']]:>7} {row['num_drafts']:>7} {row['num_draft_tokens']:>8} "
        )
        line += f"{row['num_accepted_tokens']:>8} {row['acceptance_length']:>7.3f}"
        line += "".join(f" {row[f'acceptance_at_pos_{p}']:>6.3f}" for p in range(k))
        print(line)


@dataclasses.dataclass(kw_only=True)
class Decoded:
    """What a backend measured over the prompt sets: one row per set (``all`` not included)."""

    rows: list[dict]
    num_generated: int
    seconds: float  # decoding wall time, loading and engine start excluded
    total: AcceptanceStats
    extra: dict  # backend-specific fields of the JSON result


def _decode_hf(
    args: argparse.Namespace, device: torch.device, verifier: str, k: int, tokenizer, prompt_sets: list[PromptSet]
) -> Decoded:
    from transformers import AutoModelForCausalLM

    draft = load_draft(args.checkpoint, verifier_name_or_path=verifier, attention_backend="sdpa").to(device).eval()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=dtype).to(device)
    target_vocab = model.get_input_embeddings().num_embeddings
    if target_vocab != draft.layer_config.vocab_size:
        raise ValueError(
            f"target vocab {target_vocab} != the draft's {draft.layer_config.vocab_size}: "
            "is --verifier-name-or-path the model the draft was trained on?"
        )
    target = HFTarget(model, draft.config.aux_layer_ids)
    eos = _eos_ids(model, tokenizer)

    from tqdm import tqdm

    total = AcceptanceStats(k)
    rows, num_generated = [], 0
    start = time.perf_counter()
    try:
        for prompt_set in prompt_sets:
            generations = []
            prompts = prompt_set.prompts
            with tqdm(total=len(prompts), desc=f"eval {prompt_set.name}", file=sys.stderr, leave=False) as bar:
                for first in range(0, len(prompts), args.batch_size):
                    batch = prompts[first : first + args.batch_size]
                    generations += generate_batch(
                        target, draft, batch, max_new_tokens=args.max_new_tokens, num_speculative_tokens=k, eos_ids=eos
                    )
                    bar.update(len(batch))
            stats = stats_of(generations, k)
            total.merge(stats)
            num_generated += sum(len(g.output_ids) for g in generations)
            rows.append(csv_row(prompt_set.name, stats))
    finally:
        target.close()
    seconds = time.perf_counter() - start
    extra = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "device": str(device)}
    return Decoded(rows=rows, num_generated=num_generated, seconds=seconds, total=total, extra=extra)


def _decode_vllm(
    args: argparse.Namespace, checkpoint: dict, verifier: str, k: int, tokenizer, prompt_sets: list[PromptSet]
) -> Decoded:
    from protocol.target import read_text_config
    from trainer.eval.vllm_backend import VLLMSpeculator, parse_engine_args

    target_vocab = read_text_config(verifier).get("vocab_size")
    draft_vocab = (checkpoint.get("transformer_layer_config") or {}).get("vocab_size")
    if target_vocab is not None and draft_vocab is not None and int(target_vocab) != int(draft_vocab):
        raise ValueError(
            f"target vocab {target_vocab} != the draft's {draft_vocab}: "
            "is --verifier-name-or-path the model the draft was trained on?"
        )
    eos = _eos_ids_from_files(verifier, tokenizer)
    engine = VLLMSpeculator(
        checkpoint=args.checkpoint,
        verifier=verifier,
        num_speculative_tokens=k,
        parallel_drafting=checkpoint.get("speculators_model_type") == "peagle",
        dtype=args.dtype,
        longest_prompt=max(len(p) for s in prompt_sets for p in s.prompts),
        max_new_tokens=args.max_new_tokens,
        engine_args=parse_engine_args(args.vllm_engine_args),
        skip_tokenizer_init=tokenizer is None,
    )
    logger.info("vLLM engine started in %.1f s (%s, %s)", engine.start_seconds, engine.platform, engine.dtype)
    total = AcceptanceStats(k)
    rows, num_generated = [], 0
    start = time.perf_counter()
    try:
        for prompt_set in prompt_sets:
            stats, outputs = engine.generate(prompt_set.prompts, max_new_tokens=args.max_new_tokens, eos_ids=eos)
            total.merge(stats)
            num_generated += sum(len(o) for o in outputs)
            rows.append(csv_row(prompt_set.name, stats))
    finally:
        seconds = time.perf_counter() - start
        engine.close()
    extra = {
        "batch_size": None,
        "device": engine.platform,
        "dtype": engine.dtype,
        "parallel_drafting": engine.parallel_drafting,
        "engine_start_seconds": round(engine.start_seconds, 3),
        "vllm_engine_args": engine.engine_args,
    }
    return Decoded(rows=rows, num_generated=num_generated, seconds=seconds, total=total, extra=extra)


def run(args: argparse.Namespace) -> dict:
    device = _check_args(args)
    backend = getattr(args, "backend", "hf")
    checkpoint = json.loads((Path(args.checkpoint) / "config.json").read_text())
    verifier = args.verifier_name_or_path or checkpoint["speculators_config"]["verifier"]["name_or_path"]
    trained_k = int(checkpoint["speculators_config"]["proposal_methods"][0]["speculative_tokens"])
    k = args.num_speculative_tokens or trained_k
    if checkpoint.get("speculators_model_type") == "peagle" and k > trained_k:
        logger.warning(
            "P-EAGLE draft trained for %d depths, evaluated with K=%d: deeper depths were never trained", trained_k, k
        )

    tokenizer = _load_tokenizer(verifier)
    prompt_sets = [load_prompts(spec, tokenizer, args) for spec in args.data]
    for s in prompt_sets:
        logger.info("%s: %d prompts (%d rows without a prompt skipped)", s.name, len(s.prompts), s.num_skipped)
    names = [s.name for s in prompt_sets]
    if len(set(names)) != len(names) or "all" in names:
        raise ValueError(f"--data sources need distinct names other than 'all' (got {names}): rename a file or folder")

    if backend == "vllm":
        decoded = _decode_vllm(args, checkpoint, verifier, k, tokenizer, prompt_sets)
    else:
        decoded = _decode_hf(args, device, verifier, k, tokenizer, prompt_sets)
    rows, num_generated, seconds = decoded.rows, decoded.num_generated, decoded.seconds
    num_prompts = {s.name: len(s.prompts) for s in prompt_sets}
    rows.append(csv_row("all", decoded.total))
    num_prompts["all"] = sum(len(s.prompts) for s in prompt_sets)

    print_table(rows, num_prompts, k)
    tokens_per_second = num_generated / seconds if seconds > 0 else float("nan")
    print(
        f"generated {num_generated} tokens for {num_prompts['all']} prompts in {seconds:.1f} s: "
        f"{tokens_per_second:.1f} tokens/s, {seconds / num_prompts['all']:.2f} s per prompt"
        + (f" (vLLM, engine start {decoded.extra['engine_start_seconds']:.1f} s)" if backend == "vllm" else "")
    )
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=csv_columns(k))
            writer.writeheader()
            writer.writerows(rows)
    return {
        "eval": "acceptance",
        "backend": backend,
        "checkpoint": str(args.checkpoint),
        "verifier": str(verifier),
        "speculator_type": checkpoint.get("speculators_model_type"),
        "num_speculative_tokens": k,
        "max_new_tokens": args.max_new_tokens,
        "num_prompts": num_prompts["all"],
        "num_generated_tokens": num_generated,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_per_second, 3),
        **decoded.extra,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("eval")
    try:
        result = run(args)
    except ValueError as e:
        print(f"draftstream eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
