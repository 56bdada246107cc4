"""Transport benchmark: sample-shaped messages through our codec vs raw pyzmq vs a memory copy.

Regime: one sender process -> one receiver process on this host, PUSH/PULL, over ``ipc://`` and
``tcp://127.0.0.1``. Messages are Eagle-3 samples of an 8B target: T tokens x 4 captured layers x
H=4096 in bf16 (32 KiB per token), T in {1K, 4K, 8K} by default.

- ``ours``: the sender builds a ``Sample`` and ``send_message``s it (encode is zero-copy, tensors
  chunked into ``--chunk-mib`` frames); the receiver ``recv_message(copy=False)``s it, which
  validates everything and leaves the hidden states in the frames they arrived in, exactly as the
  trainer's stream source does (its one copy comes later, when ``pack`` builds a batch).
- ``ours+copy``: same, decoding with one copy into storage the receiver provides and reuses.
- ``raw``: the same frames, pre-encoded once, through ``send_multipart(copy=False)`` /
  ``recv_multipart(copy=False)`` with no decode at all: the transport ceiling for this frame layout.
- ``raw+copy``: raw, plus one copy of the received bytes into reused storage. ``ours+copy`` /
  ``raw+copy`` isolates what the codec costs when a copy is made.
- ``memcpy``: one in-process tensor copy of the same bytes into reused storage.

Throughput is streamed (HWM 4 on both ends) after ``--hold`` + 2 warm-up messages: the median of
``--repeats`` rounds, each round running every mode once, and a ratio is the median of the
per-round ratios. In the two uncopied modes the receiver keeps the last ``--hold`` messages alive,
as a replay buffer keeps samples, so frame buffers are not simply recycled message after message;
the receiver tunes malloc as the trainer does (``protocol/allocator.py``) unless
``--default-malloc``. Latency (p50/p99) is measured separately, one message at a time (send, wait
for the receiver's ack), so it is transfer latency, not queueing. Ends with one JSON line.

    draftstream bench transport [--tokens 1024 4096 8192] [--transports ipc tcp] [--repeats 7] [--hold 8]
"""

from __future__ import annotations

import argparse
import collections
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

from protocol.allocator import keep_freed_frames
from protocol.codec import DEFAULT_CHUNK_BYTES, encode
from protocol.messages import Sample
from protocol.sockets import SocketConfig, make_socket, recv_frames, recv_message, send_message

MODES = ["ours", "ours+copy", "raw", "raw+copy"]
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


class _Receiver:
    """One mode's receive side: reused destination storage for the copying modes, as a consumer
    with its own buffers has; a ring of the last ``hold`` messages for the uncopied ones."""

    def __init__(self, mode: str, hold: int) -> None:
        self.mode = mode
        self.tensors: dict[str, torch.Tensor] = {}
        self.held: collections.deque = collections.deque(maxlen=max(1, hold))

    def alloc(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            t = self.tensors[name] = torch.empty(shape, dtype=dtype)
        return t

    def __call__(self, sock: zmq.Socket) -> None:
        if self.mode == "raw":
            self.held.append(recv_frames(sock))
        elif self.mode == "raw+copy":
            frames = recv_frames(sock)
            total = sum(len(f.buffer) for f in frames)
            dst = self.alloc("raw", torch.uint8, (total,)).numpy()
            offset = 0
            for f in frames:
                n = len(f.buffer)
                dst[offset : offset + n] = np.frombuffer(f.buffer, dtype=np.uint8)
                offset += n
        elif self.mode == "ours":
            self.held.append(recv_message(sock, copy=False, max_message_bytes=1 << 30)[1])
        else:
            recv_message(sock, alloc=self.alloc, max_message_bytes=1 << 30)


def run_stream(sock, conn, mode: str, num_tokens: int, count: int, warmup: int, chunk: int, hold: int) -> float:
    """Seconds to receive ``count`` messages after ``warmup`` ones."""
    receive = _Receiver(mode, hold)
    conn.send((mode, num_tokens, warmup + count, chunk, False))
    assert conn.recv() == "ready"
    for _ in range(warmup):
        receive(sock)
    start = time.perf_counter()
    for _ in range(count):
        receive(sock)
    elapsed = time.perf_counter() - start
    conn.recv()  # sender's timestamps, unused here
    return elapsed


def run_pingpong(sock, conn, mode: str, num_tokens: int, count: int, chunk: int) -> list[float]:
    """Per-message latency in seconds, one message in flight at a time."""
    receive = _Receiver(mode, hold=1)
    conn.send((mode, num_tokens, count + 1, chunk, True))
    assert conn.recv() == "ready"
    done = []
    for _ in range(count + 1):
        conn.send("go")
        receive(sock)
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
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--hold", type=int, default=8, help="messages the uncopied modes keep alive, as a replay buffer would"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc at its defaults (the trainer tunes it: protocol/allocator.py)",
    )
    parser.add_argument("--latency-messages", type=int, default=10)
    parser.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20))
    args = parser.parse_args(argv)
    chunk = int(args.chunk_mib * (1 << 20))
    torch.set_num_threads(1)
    malloc_tuned = False if args.default_malloc else keep_freed_frames()  # as the trainer's stream source does

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
                # Repeats go round the modes, so slow drift on a shared machine hits every mode alike.
                times: dict[str, list[float]] = {mode: [] for mode in args.modes}
                for _ in range(args.repeats):
                    for mode in args.modes:
                        times[mode].append(
                            run_stream(
                                pull, parent, mode, num_tokens, count, warmup=args.hold + 2, chunk=chunk, hold=args.hold
                            )
                        )
                for mode in args.modes:
                    elapsed = statistics.median(times[mode])
                    lat = sorted(run_pingpong(pull, parent, mode, num_tokens, args.latency_messages, chunk))
                    rows.append(
                        dict(
                            transport=transport,
                            tokens=num_tokens,
                            mode=mode,
                            message_mib=round(nbytes / (1 << 20), 1),
                            gbps=round(count * nbytes / elapsed / 1e9, 3),
                            gbps_runs=[round(count * nbytes / t / 1e9, 3) for t in times[mode]],
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
    # Each of our modes against the raw mode that does the same receive-side work.
    # The ratio is the median over rounds of the two modes' rates in the same round: rounds run
    # the modes back to back, so a slow stretch of the shared machine cancels out of each pair.
    baseline = {"ours": "raw", "ours+copy": "raw+copy"}
    ratios = {}
    for row in rows:
        base = baseline.get(row["mode"])
        ref = [
            r for r in rows if r["mode"] == base and r["transport"] == row["transport"] and r["tokens"] == row["tokens"]
        ]
        if ref:
            row["vs"] = base
            row["ratio"] = round(statistics.median(a / b for a, b in zip(row["gbps_runs"], ref[0]["gbps_runs"])), 3)
            ratios[f"{row['mode']}/{base}/{row['transport']}/{row['tokens']}"] = row["ratio"]

    print()
    print(
        f"{'transport':<9} {'tokens':>6} {'mode':<10} {'MiB/msg':>8} {'GB/s':>7} {'msg/s':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'ratio':>18}"
    )
    for row in rows:
        print(_format_row(row))
    print("memcpy GB/s (same bytes, reused storage): " + ", ".join(f"{n} tokens: {g}" for n, g in copy_rates.items()))

    def worst(mode: str) -> float | None:
        found = [r["ratio"] for r in rows if r["mode"] == mode and "ratio" in r]
        return min(found) if found else None

    summary = {
        "bench": "transport",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}",
        "chunk_bytes": chunk,
        "hold": args.hold,
        "malloc_tuned": malloc_tuned,
        "rows": rows,
        "memcpy_gbps": copy_rates,
        "min_ours_vs_raw": worst("ours"),
        "min_ours_copy_vs_raw_copy": worst("ours+copy"),
        "ratios": ratios,
    }
    print(json.dumps(summary))
    return 0


def _format_row(row: dict[str, Any]) -> str:
    ratio = f"{row['ratio']:.2f} vs {row['vs']}" if "ratio" in row else ""
    return (
        f"{row['transport']:<9} {row['tokens']:>6} {row['mode']:<10} {row['message_mib']:>8} {row['gbps']:>7} "
        f"{row['msgs_per_s']:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} {ratio:>18}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
