"""Trainer throughput: tokens per second through the real training step (draft forward, backward,
gradient scaling and clipping, AdamW step) of ``trainer.training.loop.Trainer``, fed from memory.

Regime: one process, no files and no network: random hidden states held in memory are served by
an ``InMemorySampleSource`` and packed into full ``--total-seq-len`` batches by the batch plan, so
the figure is the compute ceiling of the trainer side. The draft has random weights; its frozen
verifier head comes from a fake verifier directory with random embeddings / norm / lm_head (no
model hub). Each row times ``--steps`` optimizer steps after ``--warmup`` untimed ones and reports
the median; the baseline is the same model's forward pass alone (no grad), measured in the same
run, so ``train/fwd`` says what backward and the optimizer cost on top.

Shapes:

- ``tiny`` (default, CPU, well under 2 minutes): hidden 256, 4 heads, vocab 8192 pruned to 4096,
  total-seq-len 1024; Eagle-3 (3 TTT steps) and P-EAGLE (4 depths).
- ``llama8b``: the Llama-3.1-8B-shaped Eagle-3 draft (hidden 4096, 1 layer, vocab 128256 pruned
  to 32000, total-seq-len 8192, bf16 autocast on CUDA); meant for a GPU (``--device cuda``).

Output: a table, then one JSON line (last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(
        hidden=256,
        heads=4,
        kv_heads=2,
        intermediate=512,
        vocab=8192,
        draft_vocab=4096,
        layers=8,
        total_seq_len=1024,
        sample_len=256,
    ),
    "llama8b": dict(
        hidden=4096,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        draft_vocab=32000,
        layers=32,
        total_seq_len=8192,
        sample_len=2048,
    ),
}


def write_fake_verifier(directory: Path, shape: dict, *, dtype=torch.bfloat16, seed: int = 0) -> Path:
    """A verifier directory with a Llama config and only the three tensors a draft reads."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "num_hidden_layers": shape["layers"],
        "vocab_size": shape["vocab"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    v, h = shape["vocab"], shape["hidden"]
    tensors = {
        "model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).to(dtype),
        "model.norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).to(dtype),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def random_samples(num: int, shape: dict, *, dtype: torch.dtype, seed: int = 0):
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from trainer.data.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    n, h = shape["sample_len"], shape["hidden"]
    return [
        TrainSample(
            sample_id=i,
            token_ids=torch.randint(0, shape["vocab"], (n,), generator=g),
            loss_mask=torch.arange(n) >= n // 4,
            hidden_states=torch.randn(n, 4, h, generator=g).to(dtype),
        )
        for i in range(num)
    ]


def measure(algorithm: str, shape: dict, verifier: Path, *, device: str, steps: int, warmup: int, save: Path) -> dict:
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from protocol.devices import resolve_device
    from trainer.data.batch import make_filler_batch
    from trainer.data.sources import InMemorySampleSource
    from trainer.models.config import DraftConfig
    from trainer.models.export import build_draft, save_draft
    from trainer.training.config import LoopConfig
    from trainer.training.distributed import DistEnv
    from trainer.training.loop import Trainer

    dev = resolve_device(device)
    hs_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n_layers = shape["layers"]
    token_freq = {i: shape["vocab"] - i for i in range(shape["vocab"])}
    torch.manual_seed(0)
    config = DraftConfig(
        speculator_type=algorithm,
        verifier_name_or_path=str(verifier),
        aux_layer_ids=[2, n_layers // 2, n_layers - 3],
        draft_vocab_size=shape["draft_vocab"],
        num_depths=4,
        mask_token_id=0 if algorithm == "peagle" else None,
    )
    model = build_draft(config, token_freq).to(dev)
    per_batch = shape["total_seq_len"] // shape["sample_len"]
    samples = random_samples(per_batch * (steps + warmup), shape, dtype=hs_dtype)
    trainer = Trainer(
        model=model,
        config=LoopConfig(
            save_path=str(save / algorithm),
            epochs=1,
            lr=1e-4,
            total_seq_len=shape["total_seq_len"],
            scheduler_type="none",
            progress=False,
            noise_std=0.05,
        ),
        env=DistEnv(device=dev),
        train_source=InMemorySampleSource(samples),
        train_ids=[s.sample_id for s in samples],
        filler=make_filler_batch(num_layers=4, hidden_size=shape["hidden"], dtype=hs_dtype),
        save_draft=save_draft,
    )

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train_s, forward_s, tokens = [], [], []
    for step in range(steps + warmup):
        micros = trainer.fetch_step(0, step)
        sync()
        t0 = time.perf_counter()
        result = trainer.run_step(0, step, micros)
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            batch = micros[0].batch.to(dev)
            trainer._forward(batch, trainer._generator("bench", step))
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            train_s.append(t1 - t0)
            forward_s.append(t2 - t1)
            tokens.append(result.num_tokens)
    trainer.close()
    train_med, fwd_med = statistics.median(train_s), statistics.median(forward_s)
    return {
        "algorithm": algorithm,
        "tokens_per_step": int(statistics.median(tokens)),
        "train_step_ms": train_med * 1e3,
        "forward_ms": fwd_med * 1e3,
        "train_tokens_per_s": statistics.median(tokens) / train_med,
        "train_over_forward": train_med / fwd_med,
        "trainable_params": sum(p.numel() for p in trainer.params),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftstream bench trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--algorithms", nargs="+", default=["eagle3", "peagle"], choices=["eagle3", "peagle"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("trainer").setLevel(logging.WARNING)
    shape = SHAPES[args.shape]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        verifier = write_fake_verifier(Path(tmp) / "verifier", shape)
        for algorithm in args.algorithms:
            rows.append(
                measure(
                    algorithm,
                    shape,
                    verifier,
                    device=args.device,
                    steps=args.steps,
                    warmup=args.warmup,
                    save=Path(tmp) / "save",
                )
            )

    print(
        f"trainer step throughput: shape={args.shape} device={args.device} threads={torch.get_num_threads()} "
        f"total_seq_len={shape['total_seq_len']} hidden={shape['hidden']} draft_vocab={shape['draft_vocab']}"
    )
    header = f"{'algorithm':<10}{'tokens/step':>12}{'train ms':>10}{'fwd ms':>9}{'train/fwd':>10}{'tokens/s':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['algorithm']:<10}{r['tokens_per_step']:>12}{r['train_step_ms']:>10.1f}{r['forward_ms']:>9.1f}"
            f"{r['train_over_forward']:>10.2f}{r['train_tokens_per_s']:>12.0f}"
        )
    print(
        json.dumps(
            {
                "bench": "trainer",
                "shape": args.shape,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "warmup": args.warmup,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
