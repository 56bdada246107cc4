"""``LoopConfig``: every knob of the training loop, with one default and one validation each.

``draftstream train`` maps its flags onto these fields; error messages name the flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "none")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "bf16", "fp32")
TRACKERS = ("none", "tensorboard", "wandb")


@dataclasses.dataclass(kw_only=True)
class LoopConfig:
    """Everything the loop decides; flag names in the error messages are ``draftstream train``'s."""

    save_path: str
    epochs: int = 20
    lr: float = 1e-4
    max_steps: int | None = None  # global optimizer steps; None = all epochs
    time_budget_seconds: float | None = None  # --time-budget: fit the lr schedule to it, stop there (budget.py)
    total_seq_len: int = 8192
    seed: int = 42
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    muon_lr: float | None = None  # default 10 * lr (speculators' default)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    scheduler_type: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    num_cosine_cycles: float = 0.5
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    grad_accum_steps: int = 1
    noise_std: float = 0.05  # --noise-std: uniform noise [-std, std) on the aux states (trainer.data.sources)
    log_every: int = 10
    checkpoint_freq: int = 1  # epochs between epoch checkpoints (the last epoch is always saved)
    save_every_steps: int = 0  # > 0: also write <save>/latest/ every this many global steps
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    tracker: str = "none"
    log_dir: str | None = None  # tensorboard/wandb directory; default <save>/logs
    run_name: str | None = None
    progress: bool = True
    prefetch_depth: int = 2
    reuse: int = 1  # --reuse: uses of every sample per epoch (see trainer.data.plan)
    reuse_window: int = 64  # --reuse-window: samples whose uses are interleaved

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(
            self.time_budget_seconds is None or self.time_budget_seconds > 0,
            f"--time-budget must be > 0 seconds, got {self.time_budget_seconds}",
        )
        need(self.total_seq_len >= 1, f"--total-seq-len must be >= 1, got {self.total_seq_len}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(
            self.optimizer != "muon" or hasattr(torch.optim, "Muon"),
            "--optimizer muon needs torch.optim.Muon (torch >= 2.9)",
        )
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(
            self.scheduler_type in SCHEDULERS,
            f"--scheduler-type must be one of {SCHEDULERS}, got {self.scheduler_type!r}",
        )
        need(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"--scheduler-warmup-steps must be >= 0, got {self.warmup_steps}",
        )
        need(
            self.warmup_ratio is None or 0 <= self.warmup_ratio <= 1,
            f"--scheduler-warmup-ratio must be in [0, 1], got {self.warmup_ratio}",
        )
        need(self.num_cosine_cycles > 0, f"--scheduler-num-cosine-cycles must be > 0, got {self.num_cosine_cycles}")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(self.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {self.grad_accum_steps}")
        need(self.noise_std >= 0, f"--noise-std must be >= 0, got {self.noise_std}")
        need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        need(self.checkpoint_freq >= 1, f"--checkpoint-freq must be >= 1, got {self.checkpoint_freq}")
        need(self.save_every_steps >= 0, f"--save-every-steps must be >= 0, got {self.save_every_steps}")
        need(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.tracker in TRACKERS, f"--tracker must be one of {TRACKERS}, got {self.tracker!r}")
        need(self.prefetch_depth >= 1, f"prefetch_depth must be >= 1, got {self.prefetch_depth}")
        need(self.reuse >= 1, f"--reuse must be >= 1, got {self.reuse}")
        need(self.reuse_window >= 1, f"--reuse-window must be >= 1, got {self.reuse_window}")
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(self.tracker)
        need(
            module is None or importlib.util.find_spec(module) is not None,
            f"--tracker {self.tracker}: the {module} package is not installed (pip install {module}, or --tracker none)",
        )
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            logger.warning("--scheduler-warmup-steps given: ignoring --scheduler-warmup-ratio")

    def bf16(self, device: torch.device) -> bool:
        """Whether to compute in bf16 on ``device`` (``--precision``; auto = bf16 on CUDA)."""
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
