"""Training checkpoints: the SPEC folder layout, written atomically, found again for resume.

Layout under ``--save-path``::

    <save>/0/                         end of epoch 0 (SPEC): servable by `vllm serve` as is
        config.json                   } save_draft: the vLLM-facing checkpoint (bf16 weights)
        model.safetensors             }
        optimizer_state_dict.pt       full optimizer state, keyed by parameter name
        scheduler_state_dict.pt       LambdaLR state (a dict of such under "schedulers" with Muon)
        training_state.pt             epoch, step in epoch, global step, plan cursor/fingerprint,
                                      validation history, best epoch, run config
        weights_fp32.safetensors      fp32 master copy of the trainable parameters, plus any frozen
                                      one that bf16 cannot hold exactly (exact resume:
                                      model.safetensors is bf16 and would lose the low bits)
        rng_state_<rank>.pt           each rank's torch / CUDA / Python RNG states
    <save>/1/ ...
    <save>/latest/                    mid-epoch checkpoint (SIGTERM/SIGINT, or --save-every-steps);
                                      same files; removed once a later epoch folder supersedes it
    <save>/checkpoint_best -> 1       relative symlink to the epoch with the lowest validation loss
    <save>/accounting/rank<r>.jsonl   per-process record of trained sample ids (see trainer.training.loop)
    <save>/train_log.jsonl            per-step metrics (rank 0)

An epoch folder written because ``--max-steps`` ran out mid-epoch records its step in the epoch,
so a later run with a larger ``--max-steps`` continues from there.

Every folder is written under ``<save>/.tmp-<name>`` and renamed into place, and
``training_state.pt`` is written last, so a folder with that file is complete; a killed writer
leaves only a ``.tmp-`` folder, which the next save removes. Resume picks the complete folder with
the highest global step. Nothing is unpickled: every ``.pt`` file holds tensors and plain
containers and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.training.distributed import (
    DistEnv,
    barrier,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer_state_dict.pt"
SCHEDULER_FILE = "scheduler_state_dict.pt"
TRAINING_STATE_FILE = "training_state.pt"
MASTER_WEIGHTS_FILE = "weights_fp32.safetensors"
RNG_FILE = "rng_state_{rank}.pt"
MID_EPOCH_NAME = "latest"
BEST_LINK = "checkpoint_best"
STATE_FORMAT = 1
_FROM_VERIFIER = ("verifier_",)  # the draft's frozen copy of the verifier's head: never saved


def capture_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def master_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What exact resume needs beyond model.safetensors: every trainable parameter in fp32, and the
    frozen floating parameters whose values bf16 would round (an fp32 verifier's embeddings; with a
    bf16 verifier there are none). The verifier's own head is rebuilt from the verifier."""
    trainable = set(trainable_names(model))
    out = {}
    for name, _ in model.named_parameters():
        t = state_dict[name].detach()
        if name.startswith(_FROM_VERIFIER):
            continue
        if name in trainable or (t.is_floating_point() and not torch.equal(t, t.to(torch.bfloat16).to(t.dtype))):
            out[name] = t.float().contiguous()
    return out


def save_checkpoint(
    save_path: str | os.PathLike,
    name: str,
    *,
    env: DistEnv,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    training_state: dict,
    save_draft: Callable[..., None],
) -> Path:
    """Write ``<save>/<name>/``. Every rank must call it (it gathers sharded state)."""
    save_path = Path(save_path)
    final = save_path / name
    tmp = save_path / f".tmp-{name}"
    model_sd = full_model_state_dict(model, env)
    optim_sd = full_optimizer_state_dict(model, optimizers, env)
    if env.is_main:
        save_path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    torch.save(capture_rng_state(), tmp / RNG_FILE.format(rank=env.rank))
    barrier(env)
    if env.is_main:
        save_draft(model, tmp, state_dict=model_sd)
        save_file(master_weights(model, model_sd), str(tmp / MASTER_WEIGHTS_FILE))
        torch.save(optim_sd, tmp / OPTIMIZER_FILE)
        sched = [s.state_dict() for s in schedulers]
        torch.save(sched[0] if len(sched) == 1 else {"schedulers": sched}, tmp / SCHEDULER_FILE)
        torch.save({"format": STATE_FORMAT, **training_state}, tmp / TRAINING_STATE_FILE)
        old = save_path / f".old-{name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def read_training_state(directory: str | os.PathLike) -> dict:
    state = _load_pt(Path(directory) / TRAINING_STATE_FILE)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory}: training state format {state.get('format')}, this version reads {STATE_FORMAT}")
    return state


def find_resume_checkpoint(save_path: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder with the most progress, or None."""
    save_path = Path(save_path)
    if not save_path.is_dir():
        return None
    best: tuple[tuple, Path] | None = None
    for entry in save_path.iterdir():
        if entry.name.startswith(".") or entry.is_symlink() or not (entry / TRAINING_STATE_FILE).is_file():
            continue
        state = read_training_state(entry)
        key = (int(state["global_step"]), bool(state.get("epoch_complete")), entry.name != MID_EPOCH_NAME)
        if best is None or key > best[0]:
            best = (key, entry)
    return None if best is None else best[1]


def load_master_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the fp32 master weights into an unsharded model (before ``shard_model``), over what
    ``load_draft`` read from the bf16 model.safetensors."""
    path = Path(directory) / MASTER_WEIGHTS_FILE
    weights = load_file(str(path))
    params = dict(model.named_parameters())
    missing = set(trainable_names(model)) - set(weights)
    unexpected = set(weights) - set(params)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the model (missing trainable {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); was it saved with other model flags?"
        )
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, model has {tuple(params[n].shape)}")
            params[n].copy_(t)


def load_optimizer_and_schedulers(
    directory: str | os.PathLike,
    *,
    env: DistEnv,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
) -> None:
    directory = Path(directory)
    load_optimizer_state_dict(model, optimizers, _load_pt(directory / OPTIMIZER_FILE), env)
    sched = _load_pt(directory / SCHEDULER_FILE)
    states = sched["schedulers"] if "schedulers" in sched else [sched]
    if len(states) != len(schedulers):
        raise ValueError(
            f"{directory}: {len(states)} scheduler states for {len(schedulers)} optimizers (--optimizer changed?)"
        )
    for s, st in zip(schedulers, states):
        s.load_state_dict(st)


def load_rng_state(directory: str | os.PathLike, rank: int) -> dict | None:
    path = Path(directory) / RNG_FILE.format(rank=rank)
    return _load_pt(path) if path.is_file() else None


def update_best_link(save_path: str | os.PathLike, target: str) -> None:
    """Point ``checkpoint_best`` at ``target`` (relative), atomically."""
    save_path = Path(save_path)
    tmp = save_path / f".{BEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, save_path / BEST_LINK)


def remove_checkpoint(save_path: str | os.PathLike, name: str) -> None:
    shutil.rmtree(Path(save_path) / name, ignore_errors=True)
