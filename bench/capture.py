"""Capture overhead: ``producer.capture.HFCapture`` against a bare forward of the same batches.

Regime: one process, one target, the same rows (random token ids, lengths uniform in
[--min-len, --max-len]) packed into the same right-padded batches of at most --max-batch-tokens.
"bare" is the decoder forward alone, exactly as HFCapture calls it (same inputs, no hooks, nothing
kept); "capture" is HFCapture end to end: batching and padding, the layer hooks, stacking the L
captured layers, one ``Sample`` per row (and on CUDA the pinned asynchronous copy to the host,
waited for). Every batch is measured both ways back to back, in alternating order, on the same
model; the overhead is the median over all such pairs of the ratio capture/bare, which shrugs off
load that drifts on shared cores. Warm-up repeats are excluded; times are medians. Target: <= 5 %.

By default the target is a tiny Llama built on the spot (hidden 256, 8 layers, random weights) so the
benchmark runs anywhere in about a minute on 2 CPU cores; --model measures a real checkpoint.

    python -m bench.capture [--device cuda --dtype bfloat16] [--model PATH]

``draftstream bench producer --backend vllm`` measures the vLLM producer path instead (``bench.vllm_capture``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

TARGET_OVERHEAD_PCT = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftstream bench capture", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["hf"], default="hf", help="hf: this benchmark; vllm: bench.vllm_capture (bench/cli.py)"
    )
    parser.add_argument("--model", default=None, help="existing target to measure (default: a tiny Llama built here)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default=None, help="float32 / bfloat16 / float16 (default: bfloat16 on CUDA, else float32)"
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--num-rows", type=int, default=24)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="repeats run first and not counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: less noise on shared cores)"
    )
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, model_path: str) -> dict:
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from producer.backend import CaptureRow, plan_batches
    from producer.capture import CaptureConfig, HFCapture, collate

    config = CaptureConfig(
        model=model_path, dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens
    )
    probe = HFCapture(config)  # loads the model once; the bare forward shares it
    model, device, info = probe.model, probe.device, probe.describe()
    probe.close()
    decoder = model.get_decoder()

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.num_rows,), generator=g).tolist()
    rows = [
        CaptureRow(i, torch.randint(0, info.vocab_size, (n,), generator=g), torch.ones(n, dtype=torch.int64))
        for i, n in enumerate(lengths)
    ]
    plan = list(plan_batches(rows, args.max_batch_tokens))
    inputs = [collate(batch, info.vocab_size)[:2] for batch in plan]

    @torch.no_grad()
    def bare(i: int) -> None:
        ids_BS, mask_BS = inputs[i]
        decoder(
            input_ids=ids_BS.to(device, non_blocking=True),
            attention_mask=mask_BS.to(device, non_blocking=True),
            use_cache=False,
        )

    def capture(i: int) -> None:
        for _ in backend.capture(plan[i]):
            pass

    def timed(fn, i: int) -> float:
        _sync(device)
        start = time.perf_counter()
        fn(i)
        _sync(device)
        return time.perf_counter() - start

    # Pairs of adjacent measurements of the same batch share the machine's load of the moment.
    backend = HFCapture(config, model=model)
    pairs: list[list[tuple[float, float]]] = []  # [repeat][batch] -> (bare s, capture s)
    for repeat in range(args.warmup + args.repeats):
        measured = []
        for i in range(len(plan)):
            if (repeat + i) % 2 == 0:
                bare_s = timed(bare, i)
                capture_s = timed(capture, i)
            else:
                capture_s = timed(capture, i)
                bare_s = timed(bare, i)
            measured.append((bare_s, capture_s))
        if repeat >= args.warmup:
            pairs.append(measured)
    backend.close()

    ratios = [c / b for measured in pairs for b, c in measured]
    overhead_pct = 100.0 * (statistics.median(ratios) - 1.0)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    bare_pass_s = [sum(b for b, _ in measured) for measured in pairs]
    capture_pass_s = [sum(c for _, c in measured) for measured in pairs]
    num_tokens = sum(lengths)
    return {
        "bench": "capture",
        "model": args.model or "tiny-llama",
        "device": str(device),
        "dtype": info.dtype,
        "hidden_size": info.hidden_size,
        "num_layers": probe.num_layers,
        "layer_ids": info.layer_ids,
        "num_rows": args.num_rows,
        "num_tokens": num_tokens,
        "num_batches": len(plan),
        "repeats": args.repeats,
        "num_pairs": len(ratios),
        "torch_threads": torch.get_num_threads(),
        "bare_pass_ms": round(1000 * statistics.median(bare_pass_s), 2),
        "capture_pass_ms": round(1000 * statistics.median(capture_pass_s), 2),
        "bare_pass_ms_min": round(1000 * min(bare_pass_s), 2),
        "capture_pass_ms_min": round(1000 * min(capture_pass_s), 2),
        "bare_tokens_per_s": round(num_tokens / statistics.median(bare_pass_s)),
        "capture_tokens_per_s": round(num_tokens / statistics.median(capture_pass_s)),
        "overhead_pct": round(overhead_pct, 2),
        "overhead_pct_q1": round(100.0 * (q1 - 1.0), 2),
        "overhead_pct_q3": round(100.0 * (q3 - 1.0), 2),
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "within_target": overhead_pct <= TARGET_OVERHEAD_PCT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or not 1 <= args.min_len <= args.max_len:
        parser.error("need --repeats >= 1, --warmup >= 0 and 1 <= --min-len <= --max-len")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.threads is not None or not on_cuda:
        torch.set_num_threads(args.threads or 1)
    if args.dtype is None:
        args.dtype = "bfloat16" if on_cuda else "float32"
    if args.model is not None:
        result = run(args, args.model)
    else:
        # Imported when this runs, not at the top: `draftstream bench --help` stays light.
        from producer.tiny_target import TinyTargetConfig, build_tiny_target

        with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
            target = TinyTargetConfig(
                arch="llama",
                num_layers=args.num_layers,
                hidden_size=args.hidden_size,
                intermediate_size=args.intermediate_size,
                num_heads=max(1, args.hidden_size // 64),
                num_kv_heads=max(1, args.hidden_size // 128),
            )
            result = run(args, str(build_tiny_target(tmp, target)))

    print(
        f"capture overhead: {result['model']} (hidden {result['hidden_size']}, {result['num_layers']} layers, "
        f"{result['dtype']}) on {result['device']}, {result['torch_threads']} threads; {result['num_rows']} rows, "
        f"{result['num_tokens']} tokens in {result['num_batches']} batches; layer ids {result['layer_ids']}; "
        f"{result['num_pairs']} paired batch measurements"
    )
    print(f"{'one pass':<14}{'median ms':>11}{'min ms':>10}{'tokens/s':>11}")
    for name, key in (("bare forward", "bare"), ("HFCapture", "capture")):
        row = (
            f"{result[key + '_pass_ms']:>11.1f}{result[key + '_pass_ms_min']:>10.1f}{result[key + '_tokens_per_s']:>11}"
        )
        print(f"{name:<14}{row}")
    verdict = "within" if result["within_target"] else "OVER"
    print(
        f"{'overhead':<14}{result['overhead_pct']:>+10.2f}%   median paired ratio, quartiles "
        f"[{result['overhead_pct_q1']:+.1f}%, {result['overhead_pct_q3']:+.1f}%] ({verdict} the {TARGET_OVERHEAD_PCT:.0f} % target)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
