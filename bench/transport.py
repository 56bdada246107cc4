"""Transport benchmark: sample-shaped messages through our codec vs raw pyzmq vs a memory copy.

Regime: one sender process -> one receiver process on this host, PUSH/PULL, over ``ipc://`` and
``tcp://127.0.0.1``. Messages are Eagle-3 samples of an 8B target: T tokens x 4 captured layers x
H=4096 in bf16 (32 KiB per token), T in {1K, 4K, 8K} by default.

- ``ours``: the sender builds a ``Sample`` and ``send_message``s it (encode is zero-copy, tensors
  chunked into ``--chunk-mib`` frames); the receiver ``recv_message``s and decodes with exactly one
  copy into storage it provides (a reused slab, as the replay buffer does).
- ``ours-fresh``: same, decoding into freshly allocated tensors (first-touch page faults included).
- ``raw``: the same frames, pre-encoded once, through ``send_multipart(copy=False)`` /
  ``recv_multipart(copy=False)`` with no decode at all: the transport ceiling for this frame layout.
- ``raw+copy``: raw, plus the one copy of the received bytes into reused storage that any consumer
  needs before it can batch them. ``ours`` / ``raw+copy`` isolates what the codec itself costs;
  ``ours`` / ``raw`` also counts that copy, which on a 2-core machine competes with the kernel's
  two socket copies for the same cores.
- ``memcpy``: one in-process tensor copy of the same bytes into reused storage.

Throughput is streamed (HWM 4 on both ends), warm-up messages excluded, median of ``--repeats``.
Latency (p50/p99) is measured separately one message at a time (send, wait for the receiver's
ack), so it is transfer latency, not queueing. Ends with one JSON line.

    python -m bench.transport [--tokens 1024 4096 8192] [--transports ipc tcp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
import zmq

from protocol.codec import DEFAULT_CHUNK_BYTES, encode
from protocol.messages import Sample
from protocol.sockets import SocketConfig, make_socket, recv_frames, recv_message, send_message

MODES = ["ours", "ours-fresh", "raw", "raw+copy"]
NUM_LAYERS = 4
HIDDEN = 4096


def make_sample(num_tokens: int, sample_id: int = 0) -> Sample:
    return Sample(
        sample_id=sample_id,
        epoch=0,
        lease_id=0,
        token_ids=torch.arange(num_tokens, dtype=torch.int64),
        loss_mask=torch.ones(num_tokens, dtype=torch.uint8),
        hidden_states=torch.full((num_tokens, NUM_LAYERS, HIDDEN), 0.5, dtype=torch.bfloat16),
    )


def _sender(endpoint: str, conn: Any) -> None:
    """Child process: runs send jobs described by the parent until told to stop."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PUSH, SocketConfig(sndhwm=4), connect=endpoint)
    while True:
        job = conn.recv()
        if job is None:
            break
        mode, num_tokens, count, chunk, pingpong = job
        sample = make_sample(num_tokens)
        frames = encode(sample, chunk_bytes=chunk)
        conn.send("ready")
        sent_at = []
        for i in range(count):
            if pingpong:
                conn.recv()  # the receiver is ready for the next one
            sent_at.append(time.perf_counter())
            if mode.startswith("raw"):
                sock.send_multipart(frames, copy=False)
            else:
                sample.sample_id = i
                send_message(sock, sample, chunk_bytes=chunk)
        conn.send(sent_at)
    sock.close(linger=1000)
    ctx.term()


class _Pool:
    """Reused destination storage, as the replay buffer provides it."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            t = self.tensors[name] = torch.empty(shape, dtype=dtype)
        return t


def _receive(sock: zmq.Socket, mode: str, pool: _Pool) -> None:
    if mode == "raw":
        recv_frames(sock)
    elif mode == "raw+copy":
        frames = recv_frames(sock)
        total = sum(len(f.buffer) for f in frames)
        dst = pool("raw", torch.uint8, (total,)).numpy()
        offset = 0
        for f in frames:
            n = len(f.buffer)
            dst[offset : offset + n] = np.frombuffer(f.buffer, dtype=np.uint8)
            offset += n
    else:
        recv_message(sock, alloc=pool if mode == "ours" else None, max_message_bytes=1 << 30)


def run_stream(sock, conn, mode: str, num_tokens: int, count: int, warmup: int, chunk: int) -> float:
    """Seconds to receive ``count`` messages after ``warmup`` ones."""
    pool = _Pool()
    conn.send((mode, num_tokens, warmup + count, chunk, False))
    assert conn.recv() == "ready"
    for _ in range(warmup):
        _receive(sock, mode, pool)
    start = time.perf_counter()
    for _ in range(count):
        _receive(sock, mode, pool)
    elapsed = time.perf_counter() - start
    conn.recv()  # sender's timestamps, unused here
    return elapsed


def run_pingpong(sock, conn, mode: str, num_tokens: int, count: int, chunk: int) -> list[float]:
    """Per-message latency in seconds, one message in flight at a time."""
    pool = _Pool()
    conn.send((mode, num_tokens, count + 1, chunk, True))
    assert conn.recv() == "ready"
    done = []
    for _ in range(count + 1):
        conn.send("go")
        _receive(sock, mode, pool)
        done.append(time.perf_counter())
    sent = conn.recv()
    return [d - s for d, s in zip(done[1:], sent[1:])]


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftstream bench transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--transports", nargs="+", default=["ipc", "tcp"], choices=["ipc", "tcp"])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--bytes-per-run-mib", type=int, default=1024, help="data moved per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-messages", type=int, default=10)
    parser.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20))
    args = parser.parse_args(argv)
    chunk = int(args.chunk_mib * (1 << 20))
    torch.set_num_threads(1)

    rows: list[dict[str, Any]] = []
    workdir = tempfile.mkdtemp(prefix="draftstream-bench-")
    mpctx = mp.get_context("spawn")
    for transport in args.transports:
        ctx = zmq.Context()
        if transport == "ipc":
            endpoint = f"ipc://{workdir}/transport.sock"
            pull = make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=4), bind=endpoint)
        else:
            pull = make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=4), bind="tcp://127.0.0.1:0")
            endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        parent, child = mpctx.Pipe()
        sender = mpctx.Process(target=_sender, args=(endpoint, child), name="bench-sender", daemon=True)
        sender.start()
        try:
            for num_tokens in args.tokens:
                nbytes = make_sample(num_tokens).nbytes
                count = max(4, (args.bytes_per_run_mib << 20) // nbytes)
                for mode in args.modes:
                    times = [run_stream(pull, parent, mode, num_tokens, count, warmup=2, chunk=chunk) for _ in range(args.repeats)]
                    elapsed = statistics.median(times)
                    lat = sorted(run_pingpong(pull, parent, mode, num_tokens, args.latency_messages, chunk))
                    rows.append(
                        dict(
                            transport=transport,
                            tokens=num_tokens,
                            mode=mode,
                            message_mib=round(nbytes / (1 << 20), 1),
                            gbps=round(count * nbytes / elapsed / 1e9, 3),
                            msgs_per_s=round(count / elapsed, 2),
                            p50_ms=round(1e3 * lat[len(lat) // 2], 2),
                            p99_ms=round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                        )
                    )
                    print(_format_row(rows[-1]), flush=True)
        finally:
            parent.send(None)
            sender.join(30)
            pull.close(linger=0)
            ctx.term()

    copy_rates = {n: round(memcpy_gbps(make_sample(n).nbytes, args.repeats + 2), 2) for n in args.tokens}
    ratios = {}
    for row in rows:
        for base in ("raw", "raw+copy"):
            ref = [r for r in rows if r["mode"] == base and r["transport"] == row["transport"] and r["tokens"] == row["tokens"]]
            if row["mode"].startswith("ours") and ref:
                key = "ratio_vs_" + base.replace("+", "_")
                row[key] = round(row["gbps"] / ref[0]["gbps"], 3)
                ratios[f"{row['mode']}/{base}/{row['transport']}/{row['tokens']}"] = row[key]

    print()
    print(
        f"{'transport':<9} {'tokens':>6} {'mode':<10} {'MiB/msg':>8} {'GB/s':>7} {'msg/s':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'/raw':>6} {'/raw+copy':>9}"
    )
    for row in rows:
        print(_format_row(row))
    print("memcpy GB/s (same bytes, reused storage): " + ", ".join(f"{n} tokens: {g}" for n, g in copy_rates.items()))
    ours = [r["ratio_vs_raw"] for r in rows if r["mode"] == "ours" and "ratio_vs_raw" in r]
    ours_copy = [r["ratio_vs_raw_copy"] for r in rows if r["mode"] == "ours" and "ratio_vs_raw_copy" in r]
    summary = {
        "bench": "transport",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}",
        "chunk_bytes": chunk,
        "rows": rows,
        "memcpy_gbps": copy_rates,
        "min_ours_vs_raw": min(ours) if ours else None,
        "min_ours_vs_raw_copy": min(ours_copy) if ours_copy else None,
        "ratios": ratios,
    }
    print(json.dumps(summary))
    return 0


def _format_row(row: dict[str, Any]) -> str:
    raw = f"{row['ratio_vs_raw']:.2f}" if "ratio_vs_raw" in row else ""
    raw_copy = f"{row['ratio_vs_raw_copy']:.2f}" if "ratio_vs_raw_copy" in row else ""
    return (
        f"{row['transport']:<9} {row['tokens']:>6} {row['mode']:<10} {row['message_mib']:>8} {row['gbps']:>7} "
        f"{row['msgs_per_s']:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} {raw:>6} {raw_copy:>9}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
