"""Process group, FSDP2 sharding and full-state-dict gathering; plain single-process runs too.

Under ``torchrun`` (``WORLD_SIZE`` in the environment) ``init_distributed`` starts a process group:
NCCL when the ranks train on CUDA, gloo on CPU. Without it, nothing distributed is started and the
same loop runs in one process (``DistEnv.world_size == 1``, collectives become no-ops).

``shard_model`` applies FSDP2: ``fully_shard`` on each decoder layer, then on the root (which takes
the embeddings, fc, norms and the frozen heads), with ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` when ``bf16`` is asked for: parameters are gathered and computed in bf16,
gradients are reduced in fp32 and the sharded master weights stay fp32. On CPU the default is fp32
parameters (bf16 works with gloo, but fp32 makes a 2-rank CPU run match one process to float
rounding, which is what the tests check).

Checkpoint helpers gather *full* state dicts (``full_state_dict=True, cpu_offload=True``): rank 0
gets every tensor on the CPU, other ranks get nothing. The files are thus independent of the world
size: a run saved by 2 ranks resumes on 1, or on 4. Optimizer state is loaded back the same way on
every rank, and each keeps its shard.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from protocol.devices import resolve_device

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Start the process group when launched by torchrun; otherwise a single-process env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistEnv(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, backend=backend
    )


def close_distributed(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process). ``tensor`` must live on env.device."""
    if env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def broadcast_int(value: int, env: DistEnv) -> int:
    """Rank 0's value on every rank."""
    if not env.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_ids(ids: Sequence[int], env: DistEnv) -> list[int]:
    """Rank 0's list of ints on every rank (e.g. the sample ids whose files exist: a directory
    listing taken on each rank separately could differ, and plans that differ hang collectives)."""
    if not env.is_distributed:
        return [int(i) for i in ids]
    n = broadcast_int(len(ids) if env.is_main else 0, env)
    t = (
        torch.tensor(list(ids), dtype=torch.int64, device=env.device)
        if env.is_main
        else torch.empty(n, dtype=torch.int64, device=env.device)
    )
    dist.broadcast(t, src=0)
    return t.tolist()


def all_gather_text(text: str, env: DistEnv) -> list[str]:
    """Every rank's ``text``, in rank order (no pickle: UTF-8 bytes in padded uint8 tensors)."""
    if not env.is_distributed:
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=env.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=env.device))
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=env.device)
    padded[: data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return [bytes(t[: int(n.item())].tolist()).decode() for t, n in zip(gathered, sizes)]


def shard_model(model: nn.Module, env: DistEnv, *, bf16: bool) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root. Single process: move to device."""
    model.to(env.device)
    if not env.is_distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in model.decoder_layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    logger.info(
        "FSDP2 over %d ranks (%s): %d decoder layers sharded, then the root; params %s, reduce %s",
        env.world_size,
        env.backend,
        len(model.decoder_layers),
        "bf16" if bf16 else "fp32",
        "fp32" if bf16 else "fp32",
    )
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an accumulated step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Every tensor of the model, unsharded, on the CPU, on rank 0 (``{}`` elsewhere). A
    collective under FSDP: every rank calls it."""
    if not env.is_distributed:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], env: DistEnv) -> dict:
    """Optimizer state keyed by parameter names, unsharded, on rank 0 (``{}`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = _options(full_state_dict=True, cpu_offload=True) if env.is_distributed else None
    return get_optimizer_state_dict(model, list(optimizers), options=options)


def load_optimizer_state_dict(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], state: dict, env: DistEnv
) -> None:
    """Load a full (name-keyed) optimizer state dict on every rank; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    options = _options(full_state_dict=True) if env.is_distributed else None
    set_optimizer_state_dict(model, list(optimizers), state, options=options)
