"""Run draft checkpoints in the real vLLM engine (``vllm.LLM(model=<checkpoint>)``) and report what
it generated and its speculative-decoding counters, as JSON.

    python -m tests.vllm.engine.serve_engine SPEC.json OUT.json

SPEC: ``{"checkpoints": {name: dir}, "prompts": [[ids]], "max_tokens": N, "engine_args": {...}}``.
Each checkpoint gets one engine, one after the other in this process (engine start-up is the cost:
the import is paid once). vLLM's Prometheus counters are process-wide, so each run reports the
difference between the counters after and before its ``generate``. The engine core is spawned: the
``__main__`` guard is required.
"""

from __future__ import annotations

import gc
import json
import sys
import time

COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def spec_counters(llm) -> dict:
    """The spec-decode counters of ``llm.get_metrics()`` (summed over engines), names without ``vllm:``."""
    from vllm.v1.metrics.reader import Counter, Vector

    out: dict = {name.removeprefix("vllm:"): 0 for name in COUNTERS}
    out[PER_POS.removeprefix("vllm:")] = []
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in COUNTERS:
            out[metric.name.removeprefix("vllm:")] += int(metric.value)
        elif isinstance(metric, Vector) and metric.name == PER_POS:
            per_pos = out[PER_POS.removeprefix("vllm:")]
            per_pos.extend([0] * (len(metric.values) - len(per_pos)))
            for p, v in enumerate(metric.values):
                per_pos[p] += int(v)
    return out


def _difference(after: dict, before: dict) -> dict:
    out = {}
    for key, value in after.items():
        if isinstance(value, list):
            old = before.get(key) or [0] * len(value)
            out[key] = [v - (old[p] if p < len(old) else 0) for p, v in enumerate(value)]
        else:
            out[key] = value - before.get(key, 0)
    return out


def run_one(checkpoint: str, prompts: list[list[int]], max_tokens: int, engine_args: dict) -> dict:
    import vllm
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = vllm.LLM(model=checkpoint, **{"disable_log_stats": False, **engine_args})  # counters need stats on
    started = time.perf_counter()
    config = llm.llm_engine.vllm_config
    spec = config.speculative_config
    before = spec_counters(llm)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        use_tqdm=False,
    )
    generated = time.perf_counter()
    result = {
        "checkpoint": checkpoint,
        "target": config.model_config.model,
        "target_dtype": str(config.model_config.dtype),
        "method": spec.method if spec else None,
        "num_speculative_tokens": spec.num_speculative_tokens if spec else None,
        "parallel_drafting": bool(getattr(spec, "parallel_drafting", False)) if spec else None,
        "draft_dtype": str(spec.draft_model_config.dtype) if spec else None,
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "counters": _difference(spec_counters(llm), before),
        "start_seconds": round(started - start, 1),
        "generate_seconds": round(generated - started, 1),
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(open(spec_path).read())
    results = {
        name: run_one(ckpt, spec["prompts"], spec["max_tokens"], spec.get("engine_args", {}))
        for name, ckpt in spec["checkpoints"].items()
    }
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
