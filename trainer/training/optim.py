"""Optimizers and learning-rate schedules of the training loop.

AdamW over every trainable parameter (default), or ``--optimizer muon``: ``torch.optim.Muon`` over
the 2-D hidden weight matrices (fc, attention and MLP projections) and AdamW over the rest (norms,
embeddings, ``mask_hidden``), as the speculators trainer splits them. Muon's default lr is 10x
``--lr`` with ``adjust_lr_fn="match_rms_adamw"`` (speculators' defaults).

Schedules are a ``LambdaLR`` per optimizer: linear warmup over ``warmup`` steps (from ``--scheduler-
warmup-steps`` or ``--scheduler-warmup-ratio`` of the total), then linear decay to 0, cosine decay
(``--scheduler-num-cosine-cycles``, 0.5 = half a cosine down to 0) or constant (``none``). The
total is the number of optimizer steps the run will take (all epochs' plans, capped by
``--max-steps``), or the length ``--time-budget`` fits (``trainer.training.budget``), which may
change while the run goes: the schedule reads it at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from trainer.training.config import LoopConfig


def build_optimizers(model: nn.Module, config: LoopConfig) -> list[torch.optim.Optimizer]:
    """AdamW over every trainable parameter, or Muon over the 2-D hidden weight matrices plus
    AdamW over the rest (norms, embeddings, mask_hidden), as the speculators trainer does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)]
    matrices = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    rest = [p for n, p in named if not (p.ndim == 2 and "embed" not in n and "lm_head" not in n)]
    optims: list[torch.optim.Optimizer] = [
        torch.optim.Muon(
            matrices,
            lr=config.muon_lr if config.muon_lr is not None else 10 * config.lr,
            weight_decay=config.muon_weight_decay,
            momentum=config.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
    ]
    if rest:
        optims.append(torch.optim.AdamW(rest, lr=config.lr, weight_decay=config.weight_decay))
    return optims


def lr_factor(step: int, *, kind: str, warmup: int, total: int, cycles: float) -> float:
    """Multiplier of the base lr for the optimizer step with index ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "none":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))


def build_schedulers(
    optimizers: Sequence[torch.optim.Optimizer], config: LoopConfig, total_steps: int | Callable[[], int]
):
    """A ``LambdaLR`` per optimizer; ``total_steps`` may be a function, read at every step."""
    total_of = total_steps if callable(total_steps) else lambda: total_steps

    def factor(step: int) -> float:
        total = total_of()
        if config.warmup_steps is not None:
            warmup = config.warmup_steps
        elif config.warmup_ratio is not None:
            warmup = int(round(config.warmup_ratio * total))
        else:
            warmup = 0
        return lr_factor(step, kind=config.scheduler_type, warmup=warmup, total=total, cycles=config.num_cosine_cycles)

    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]


def refresh_lrs(schedulers: Sequence[torch.optim.lr_scheduler.LambdaLR]) -> None:
    """Set every optimizer's lr for the step about to be taken again from its schedule, after the
    schedule's length changed (``--time-budget``): the step that the new length makes the last one
    then takes the schedule's last lr."""
    for s in schedulers:
        lrs = [base * fn(s.last_epoch) for base, fn in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs


def step_optimizers(
    params: Sequence[nn.Parameter],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    *,
    grad_scale: float,
    max_grad_norm: float,
) -> tuple[float, float]:
    """Scale the accumulated gradients, clip them (``max_grad_norm`` 0: no clipping, the norm is
    still measured), step every optimizer and schedule, zero the gradients. Returns (grad norm,
    the lr the step used)."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(grad_scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    lr = optimizers[-1].param_groups[0]["lr"]
    for o in optimizers:
        o.step()
    for s in schedulers:
        s.step()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    return float(grad_norm), lr
