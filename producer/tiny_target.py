"""Tiny local targets for tests, the demo and benchmarks: no model hub, everything built offline.

``build_tiny_target`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load like any hub checkpoint: a Llama or Qwen3 causal LM with
random weights, and a byte-level BPE tokenizer trained on the spot on the fixture conversations,
with a chat template (Llama-3 style for Llama, ChatML for Qwen3) that carries ``{% generation %}``
markers so assistant masks come straight from ``apply_chat_template``. ``generation_markers=False``
writes the same template without markers, to exercise the offset-based mask fallback.

``write_conversations`` writes a small deterministic conversations dataset (single- and multi-turn,
with and without system prompts) as jsonl, in ShareGPT (``conversations``/``from``/``value``) or
OpenAI (``messages``/``role``/``content``) style.

CLI: ``draftstream make-tiny-target --out DIR [--arch qwen3] [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

_WORDS = (
    "the a model token draft target layer hidden state stream buffer train sample batch epoch "
    "speculative decoding verifier accept reject parallel chain tree attention head query key value "
    "vector matrix gradient loss step rate warm cosine linear schedule memory bound socket frame "
    "producer trainer lease grant budget checkpoint resume shard rank world gloo nccl fast slow "
    "river mountain city garden music story number letter colour window kitchen market island"
).split()
_QUESTIONS = (
    "What is {a} {b}?",
    "Explain how {a} relates to {b}.",
    "Write a short note about {a} and {b}.",
    "Why does the {a} need a {b}?",
    "List three facts about {a}.",
    "Can you compare {a} with {b}?",
)
_SYSTEMS = (
    "You are a helpful assistant.",
    "You answer briefly and precisely.",
    "You are an expert on {a}.",
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SPECIALS = {
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|pad|>",
    ],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
}


@dataclasses.dataclass(kw_only=True)
class TinyTargetConfig:
    """Shape of the tiny target. 8 layers is the smallest depth whose default capture
    ``[2, N//2, N-3, N]`` = ``[2, 4, 5, 8]`` has distinct, ordered ids, as real targets have.
    Two heads of 32 (one KV head): vLLM's CPU attention takes head_dim 32 and up, not 16."""

    arch: str = "llama"
    num_layers: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 2
    num_kv_heads: int = 1
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    # Larger than the usual 0.02 so the random target's next-token distributions are peaked
    # enough for a draft to learn something measurable.
    initializer_range: float = 0.2
    generation_markers: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in _SPECIALS:
            raise ValueError(f"--arch must be one of {sorted(_SPECIALS)}, got {self.arch!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("--hidden-size must divide by heads, and heads by kv heads")
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")


def conversations(num: int, seed: int = 0) -> Iterator[list[dict[str, str]]]:
    """Deterministic conversations as OpenAI-style turn lists; every third has a system prompt."""
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    for i in range(num):
        turns: list[dict[str, str]] = []
        topic = {"a": rng.choice(_WORDS), "b": rng.choice(_WORDS)}
        if i % 3 == 0:
            turns.append({"role": "system", "content": rng.choice(_SYSTEMS).format(**topic)})
        for _ in range(1 if i % 2 == 0 else rng.randint(2, 3)):
            turns.append({"role": "user", "content": rng.choice(_QUESTIONS).format(**topic)})
            answer = " ".join(sentence(rng.randint(4, 12)) for _ in range(rng.randint(1, 4)))
            turns.append({"role": "assistant", "content": answer})
            topic = {"a": rng.choice(_WORDS), "b": topic["a"]}
        yield turns


def write_conversations(path: str | Path, num: int = 64, *, seed: int = 0, style: str = "sharegpt") -> Path:
    """Write ``num`` conversations as jsonl; ``style`` is ``sharegpt`` or ``openai``."""
    if style not in ("sharegpt", "openai"):
        raise ValueError(f"style must be sharegpt or openai, got {style!r}")
    sharegpt_role = {"user": "human", "assistant": "gpt", "system": "system"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, turns in enumerate(conversations(num, seed)):
            if style == "sharegpt":
                row = {
                    "id": f"conv-{i}",
                    "conversations": [{"from": sharegpt_role[t["role"]], "value": t["content"]} for t in turns],
                }
            else:
                row = {"id": f"conv-{i}", "messages": turns}
            f.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(out_dir: str | Path, config: TinyTargetConfig):
    """Train a byte-level BPE tokenizer on the fixture text and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[config.arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t["content"] for turns in conversations(400, seed=config.seed + 1) for t in turns]
    corpus += [q.format(a=w, b=w) for q in _QUESTIONS for w in _WORDS] + list(_SYSTEMS)
    tok.train_from_iterator(corpus, trainer=trainer)

    template = LLAMA3_TEMPLATE if config.arch == "llama" else CHATML_TEMPLATE
    if not config.generation_markers:
        template = template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    if config.arch == "llama":
        names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>"}
    else:
        names = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in names.items() if v})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_target(out_dir: str | Path, config: TinyTargetConfig | None = None) -> Path:
    """Write a loadable tiny target (model + tokenizer) to ``out_dir`` and return the path."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config = config or TinyTargetConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, config)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.arch == "llama":
        model_config, model_cls = LlamaConfig(**common, rope_theta=500000.0), LlamaForCausalLM
    else:
        head_dim = config.hidden_size // config.num_heads
        model_config, model_cls = Qwen3Config(**common, head_dim=head_dim, rope_theta=1000000.0), Qwen3ForCausalLM
    torch.manual_seed(config.seed)
    model = model_cls(model_config).to(getattr(torch, config.dtype)).eval()
    model.config.dtype = config.dtype
    model.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftstream make-tiny-target", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write model/ and conversations.jsonl into")
    parser.add_argument("--arch", default="llama", choices=sorted(_SPECIALS))
    parser.add_argument("--num-layers", type=int, default=8, help="8 gives distinct default capture ids [2, 4, 5, 8]")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=2, help="head_dim = hidden / heads: vLLM on CPU needs >= 32")
    parser.add_argument("--num-kv-heads", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--no-generation-markers", action="store_true", help="chat template without {%% generation %%} markers"
    )
    parser.add_argument("--num-conversations", type=int, default=64)
    parser.add_argument("--style", default="sharegpt", choices=["sharegpt", "openai"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = TinyTargetConfig(
        arch=args.arch,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
        generation_markers=not args.no_generation_markers,
        seed=args.seed,
    )
    out = Path(args.out)
    model_dir = build_tiny_target(out / "model", config)
    data = write_conversations(out / "conversations.jsonl", args.num_conversations, seed=args.seed, style=args.style)
    print(f"tiny {config.arch} target -> {model_dir}\nconversations -> {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
