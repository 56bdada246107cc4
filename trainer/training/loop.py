"""The training loop: plan -> sample source -> packed batch -> draft step, with exact resume.

::

    BatchPlan(epoch) --ids for (logical rank, step)--> Prefetch thread --FetchResult + packed batch-->
        [queue, depth 2] --> main loop: draft forward/backward per micro-batch --> all-reduce of
        step sums --> grad scale + clip --> optimizer/scheduler --> accounting record, log line,
        checkpoint (epoch end, --save-every-steps, or a SIGTERM/SIGINT flag)

Logical ranks. A step trains ``world_size * grad_accum_steps`` batches of the plan: process ``r``
plays logical ranks ``r*A .. r*A+A-1`` one after the other (gradient accumulation), so one process
with ``grad_accum_steps=2`` trains exactly what 2 processes train, batch for batch.

Loss normalisation across ranks and micro-batches. The draft returns a loss (a masked mean) and
``num_loss_tokens`` n. Each micro-batch backpropagates ``loss * n``; after the step's all-reduce of
the token sum N, gradients are scaled by ``1/N`` (times the world size under FSDP, whose
reduce-scatter averages). The step's gradient is therefore that of the token-weighted mean
``sum(loss_i * n_i) / sum(n_i)`` over every batch of the step, whatever the number of processes:
a 2-rank run and a 1-process run with 2 accumulation steps take the same steps, and the logged
loss is that same weighted mean. A rank whose plan slot is empty (see ``trainer.data.plan``) runs a
synthetic filler batch with weight 0, so it joins the FSDP collectives and adds nothing.

The same all-reduce carries a "stop" flag, so a signal that reaches only some ranks, or reaches
them at different steps, stops all of them after the same step. Signal handlers only set the
flag; the loop writes ``<save>/latest/`` at the next step boundary and returns. A signal that
arrives while the loop waits for data (a streaming source whose producers deliver nothing) ends
the wait (``protocol.signals.StopRequested``); before each step (and each validation batch) the
ranks agree on whether one of them stopped waiting, so they all write the checkpoint at the same
cursor instead of some entering the step's collectives. ``--time-budget`` fits the lr schedule's
length to a wall-clock budget and stops there (``trainer.training.budget``).

Randomness is derived, never carried: the draft's generator for a micro-batch is seeded from
(seed, epoch, step, logical rank), noise from (seed, epoch, sample id, use index). A resumed run therefore
draws what an uninterrupted run draws; the global RNG states are saved too (rng_state_<rank>.pt)
for anything else that uses them.

After every step each process appends what it trained to the accounting record
(``trainer.training.accounting``), rank 0 a line of metrics to ``<save>/train_log.jsonl`` (and the tracker;
``trainer.training.metrics``). What a process fetches, and in which order, is ``trainer.data.order``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from protocol.signals import StopRequested, StopSignals
from trainer.data import order
from trainer.data.batch import PackedBatch, pack
from trainer.data.plan import BatchPlan, derive_seed
from trainer.data.prefetch import MicroBatch, Prefetcher, fetch_micro_batches
from trainer.data.sources import FetchResult, SampleSource, add_aux_noise_
from trainer.training import checkpoint as ckpt
from trainer.training.accounting import ACCOUNTING_DIR, AccountingLog, truncate_accounting, truncate_records
from trainer.training.budget import TimeBudget
from trainer.training.config import LoopConfig
from trainer.training.distributed import DistEnv, all_reduce_sum, barrier, is_sharded, set_gradient_sync
from trainer.training.metrics import RunLog, StepResult, expected_acceptance_length, per_step, step_metric_names
from trainer.training.optim import build_optimizers, build_schedulers, refresh_lrs, step_optimizers
from trainer.training.state import TrainState
from trainer.training.trackers import Tracker

# A live run's nominal length without --max-steps: it trains until stopped (constant learning rate).
LIVE_STEPS = 10**12
LIVE_CHUNKS_FILE = "live_chunks.jsonl"  # per trained chunk of live traffic: rows trained, held out, dropped

logger = logging.getLogger(__name__)


def logical_ranks(rank: int, grad_accum_steps: int) -> list[int]:
    """The logical ranks process ``rank`` plays, in the order it trains them."""
    return [rank * grad_accum_steps + m for m in range(grad_accum_steps)]


def plan_epochs(
    config: LoopConfig, train_ids: Sequence[int], lengths: Sequence[int], world_size: int
) -> list[BatchPlan]:
    """Every epoch's plan over ``world_size * grad_accum_steps`` logical ranks."""
    return [
        BatchPlan.build(
            sample_ids=train_ids,
            lengths=lengths,
            seed=config.seed,
            epoch=e,
            world_size=world_size * config.grad_accum_steps,
            total_seq_len=config.total_seq_len,
            reuse=config.reuse,
            reuse_window=config.reuse_window,
        )
        for e in range(config.epochs)
    ]


def plan_validation(
    config: LoopConfig, val_ids: Sequence[int], lengths: Sequence[int], world_size: int
) -> BatchPlan | None:
    """The validation plan (one batch per process rank and step, unshuffled); None without ids."""
    if not val_ids:
        return None
    return BatchPlan.build(
        sample_ids=val_ids,
        lengths=lengths,
        seed=config.seed,
        epoch=0,
        world_size=world_size,
        total_seq_len=config.total_seq_len,
        shuffle=False,
    )


def planned_fetch_orders(
    config: LoopConfig, plans: Sequence[BatchPlan], val_plan: BatchPlan | None, *, rank: int
) -> list[list[int]]:
    """What process ``rank`` fetches in each whole epoch, in order (training, then validation from
    the same source): what ``Trainer`` schedules on a streaming source, from the epoch's start."""
    ranks = logical_ranks(rank, config.grad_accum_steps)
    return [order.fetch_order(plan, ranks, val_plan=val_plan, val_rank=rank) for plan in plans]


class _StoppedWaiting(Exception):
    """Every rank agreed to stop at a boundary where one of them was waiting for data."""


@dataclasses.dataclass(kw_only=True)
class FitResult:
    status: str  # "completed" | "max_steps" | "time_budget" | "interrupted"
    global_step: int
    signal: int | None = None
    checkpoint: Path | None = None
    val_history: dict[int, float] = dataclasses.field(default_factory=dict)


class Trainer:
    """Owns the optimizer, scheduler, plans and progress of one training run on one process.

    ``model`` is already on its device (and sharded under torchrun). ``state_dict()`` carries
    epoch, step in the epoch (the plan cursor), global step, plan fingerprint, validation history
    and this rank's RNG states: ``load_state_dict`` of it continues exactly where it was taken.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        config: LoopConfig,
        env: DistEnv,
        train_source: SampleSource,
        train_ids: Sequence[int],
        filler: PackedBatch,
        val_source: SampleSource | None = None,
        val_ids: Sequence[int] = (),
        save_draft: Callable[..., None] | None = None,
        run_config: dict | None = None,
        plans: Sequence[BatchPlan] | None = None,
    ):
        self.model = model
        self.config = config
        self.env = env
        self.train_source = train_source
        self.val_source = val_source or train_source
        self.filler = filler
        self.save_draft = save_draft
        self.run_config = dict(run_config or {})
        self.save_path = Path(config.save_path)
        self.device = env.device
        self.bf16 = config.bf16(self.device)
        self.logical_world = env.world_size * config.grad_accum_steps
        self.logical_ranks = logical_ranks(env.rank, config.grad_accum_steps)

        if plans is not None:  # live traffic: each epoch's plan (and validation) comes when its rows do
            self.plans = plans
            self.val_plan = None
            planned = config.max_steps or LIVE_STEPS
        else:
            train_ids = [int(i) for i in train_ids]
            if not train_ids:
                raise ValueError("no training samples (check --data-path, --hidden-states-path and --val-ratio)")
            self.plans = plan_epochs(config, train_ids, train_source.lengths(train_ids), env.world_size)
            val_ids = [int(i) for i in val_ids]
            self.val_plan = plan_validation(config, val_ids, self.val_source.lengths(val_ids), env.world_size)
            planned = sum(p.num_steps for p in self.plans)
        self.total_steps = min(planned, config.max_steps) if config.max_steps else planned
        self.budget = (
            TimeBudget(config.time_budget_seconds, planned_steps=self.total_steps)
            if config.time_budget_seconds is not None
            else None
        )

        self.state = TrainState()
        self.optimizers = build_optimizers(model, config)
        self.schedulers = build_schedulers(self.optimizers, config, lambda: self.schedule_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.stop = StopSignals("stopping at the next step boundary and writing a checkpoint")
        self._accounting = AccountingLog(self.save_path / ACCOUNTING_DIR / f"rank{env.rank}.jsonl")
        self._log = RunLog(
            path=self.save_path / "train_log.jsonl" if env.is_main else None,
            source=train_source,
            log_every=config.log_every,
            total_steps=self.total_steps,
            draft_config=getattr(model, "config", None),
        )
        self._scheduled: set[int] = set()  # epochs already announced to a streaming source
        self._clock_start: float | None = None  # monotonic time at which train_seconds was 0
        self._finish_seconds: float | None = None  # the last epoch end's validation + checkpoint

    @property
    def schedule_steps(self) -> int:
        """The lr schedule's length: the planned steps, or what ``--time-budget`` fitted."""
        fitted = self.state.schedule_steps if self.budget is not None else None
        return self.total_steps if fitted is None else fitted

    def _elapsed(self) -> float:
        """Training seconds so far, over every resumed run (``TrainState.train_seconds``)."""
        if self._clock_start is None:
            return self.state.train_seconds
        return time.monotonic() - self._clock_start

    # ---- state ------------------------------------------------------------------------------

    def _val_plan_for(self, epoch: int) -> BatchPlan | None:
        """Epoch ``epoch``'s validation plan: the run's one, or (live traffic) its chunk's."""
        val_plan = getattr(self.plans, "val_plan", None)
        return self.val_plan if val_plan is None else val_plan(epoch)

    def _plan_ready(self, epoch: int) -> bool:
        """Whether epoch ``epoch``'s plan exists without waiting (live traffic may not have come yet)."""
        ready = getattr(self.plans, "ready", None)
        return ready is None or ready(epoch)

    def state_dict(self) -> dict:
        epoch = min(self.state.epoch, len(self.plans) - 1)
        built = getattr(self.plans, "built", None)
        plan = self.plans[epoch] if built is None else built(epoch)
        return {
            **self.state.state_dict(),
            # a live run stopped while waiting for a chunk's traffic is at its step 0: nothing to check
            "plan": plan.describe() if plan is not None else {"epoch": epoch, "fingerprint": ""},
            "rng": ckpt.capture_rng_state(),
            "run_config": {k: str(v) for k, v in self.run_config.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        restored = TrainState.from_state_dict(state)
        epoch, step = restored.epoch, restored.step_in_epoch
        if epoch < len(self.plans) and step > 0 and not restored.epoch_complete:
            if self.plans[epoch].fingerprint != state["plan"]["fingerprint"]:
                raise ValueError(
                    f"cannot resume mid-epoch {epoch}: the batch plan differs from the checkpoint's (dataset, "
                    "--seed, --total-seq-len, world size or --grad-accum-steps changed); restore them, or start "
                    "a new --save-path"
                )
        self.state = restored
        if "rng" in state:
            ckpt.restore_rng_state(state["rng"])

    def restore(self, directory: str | Path) -> None:
        """Resume from a checkpoint folder: optimizer, scheduler, progress, RNG, accounting.
        (Weights are loaded before sharding, by the caller: ``checkpoint.load_master_weights``.)"""
        directory = Path(directory)
        ckpt.load_optimizer_and_schedulers(
            directory, env=self.env, model=self.model, optimizers=self.optimizers, schedulers=self.schedulers
        )
        state = ckpt.read_training_state(directory)
        own_rng = ckpt.load_rng_state(directory, self.env.rank)
        if own_rng is not None:
            state = {**state, "rng": own_rng}
        self.load_state_dict(state)
        self._accounting.flush()
        barrier(self.env)
        if self.env.is_main:
            dropped = truncate_accounting(self.save_path, self.state.global_step)
            truncate_records(self._log.jsonl.path, self.state.global_step)
            self._log.jsonl.reopen()
            if dropped:
                logger.warning(
                    "dropped %d accounting records past global step %d (work done after the checkpoint)",
                    dropped,
                    self.state.global_step,
                )
        barrier(self.env)
        self._accounting.reopen()
        logger.info(
            "resumed from %s: epoch %d, step %d in epoch, global step %d",
            directory,
            self.state.epoch,
            self.state.step_in_epoch,
            self.state.global_step,
        )

    # ---- one step -----------------------------------------------------------------------------

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _generator(self, *parts) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(derive_seed("draft", self.config.seed, *parts))

    def _forward(self, batch: PackedBatch, generator: torch.Generator):
        with self._autocast():
            return self.model(batch, generator=generator)

    def _micro_batch(self, micro: MicroBatch) -> tuple[PackedBatch, bool]:
        if micro.batch is None:
            return self.filler.to(self.device), False
        batch = micro.batch.to(self.device, non_blocking=True)
        return batch, True

    def run_step(self, epoch: int, step: int, micros: Sequence[MicroBatch]) -> StepResult:
        """One optimizer step over this process's micro-batches (all ranks call it together)."""
        cfg = self.config
        self.model.train()
        t0 = time.perf_counter()
        local_n = local_loss = local_tokens = 0.0
        metric_names: list[str] | None = None
        metric_sums: torch.Tensor | None = None
        for m, micro in enumerate(micros):
            set_gradient_sync(self.model, m == len(micros) - 1)
            batch, real = self._micro_batch(micro)
            if real and cfg.noise_std > 0:
                uses = self.plans[epoch].uses_at(micro.logical_rank, step)
                add_aux_noise_(batch, std=cfg.noise_std, seed=cfg.seed, epoch=epoch, uses=uses)
            out = self._forward(batch, self._generator(epoch, step, micro.logical_rank))
            n = out.num_loss_tokens.detach().float().to(self.device) if real else torch.zeros((), device=self.device)
            (out.loss * n).backward()
            if metric_names is None:
                metric_names = step_metric_names(out.metrics)
                metric_sums = torch.zeros(len(metric_names), dtype=torch.float64, device=self.device)
            if float(n) > 0:  # a filler's (or an unsupervised batch's) metrics may be NaN: never add them
                metric_sums += torch.stack(
                    [out.metrics[k].detach().double().reshape(()) for k in metric_names]
                ) * float(n)
                local_n += float(n)
                local_loss += float(out.loss.detach()) * float(n)
            local_tokens += batch.num_tokens if real else 0
        # Rank 0's clock travels with the sums, so --time-budget fits the same schedule on every rank.
        clock = self._elapsed() if self.env.is_main else 0.0
        head = torch.tensor(
            [local_n, local_loss, local_tokens, float(self.stop.requested), clock],
            dtype=torch.float64,
            device=self.device,
        )
        sums = all_reduce_sum(torch.cat([head, metric_sums]), self.env)
        total_n, total_loss, total_tokens, stops, clock = sums[:5].tolist()
        if self.budget is not None:  # before the optimizer step: its lr already follows the fit
            self.budget.fit(
                self.state,
                global_step=self.state.global_step + 1,
                elapsed=clock,
                finish_seconds=self._finish_estimate,
            )
            refresh_lrs(self.schedulers)
            self._log.total_steps = self.schedule_steps
        # Gradients hold sum_i d(loss_i * n_i) (averaged over ranks by FSDP's reduce-scatter).
        scale = (self.env.world_size if is_sharded(self.model) else 1.0) / max(total_n, 1.0)
        grad_norm, lr = step_optimizers(
            self.params, self.optimizers, self.schedulers, grad_scale=scale, max_grad_norm=cfg.max_grad_norm
        )
        denom = max(total_n, 1.0)
        metrics = {k: float(v) / denom for k, v in zip(metric_names or [], sums[5:].tolist())}
        return StepResult(
            epoch=epoch,
            step=step,
            global_step=self.state.global_step + 1,
            loss=total_loss / denom,
            metrics=metrics,
            num_loss_tokens=int(total_n),
            num_tokens=int(total_tokens),
            lr=lr,
            grad_norm=float(grad_norm),
            seconds=time.perf_counter() - t0,
            stop_requested=stops > 0,
        )

    # ---- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, epoch: int = 0) -> dict[str, float] | None:
        """``val_loss``, ``val_{name}_{k}`` (``metrics.STEP_METRICS``) and ``val_accept_len``, over
        the validation plan; None without one. Raises ``_StoppedWaiting`` when a stop signal ended
        a rank's wait for validation data (every rank raises it at the same batch)."""
        val_plan = self._val_plan_for(epoch)
        if val_plan is None:
            return None
        self.model.eval()
        sums: torch.Tensor | None = None
        names: list[str] = []
        for step, [(_, ids)] in order.val_steps(val_plan, self.env.rank):
            try:
                fetched = self.val_source.fetch(ids) if ids else FetchResult(samples=[])
            except StopRequested:
                fetched = None
            if self._agree_to_stop(fetched is None):
                raise _StoppedWaiting
            real = bool(fetched.samples)
            batch = (
                pack(fetched.samples, val_plan.total_seq_len).to(self.device) if real else self.filler.to(self.device)
            )
            out = self._forward(batch, self._generator("val", step, self.env.rank))
            n = float(out.num_loss_tokens) if real else 0.0
            if sums is None:
                names = step_metric_names(out.metrics)
                sums = torch.zeros(2 + len(names), dtype=torch.float64, device=self.device)
            if n > 0:
                values = [out.loss.double().reshape(()), *[out.metrics[k].double().reshape(()) for k in names]]
                sums += torch.stack([torch.ones((), dtype=torch.float64, device=self.device), *values]) * n
        if sums is None:  # no validation step at all on any rank
            return None
        sums = all_reduce_sum(sums, self.env).tolist()
        denom = max(sums[0], 1.0)
        metrics = {k: v / denom for k, v in zip(names, sums[2:])}
        values = {"val_loss": sums[1] / denom, **{f"val_{k}": v for k, v in metrics.items()}}
        cond_acc = per_step(metrics, "cond_acc")
        if cond_acc:
            values["val_accept_len"] = expected_acceptance_length(cond_acc)
        return values

    def _agree_to_stop(self, stop: bool) -> bool:
        """Whether any rank stops here (a collective: every rank calls it at the same boundary)."""
        if not self.env.is_distributed:
            return stop
        flag = torch.tensor([float(stop)], dtype=torch.float64, device=self.device)
        return float(all_reduce_sum(flag, self.env)) > 0

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, name: str) -> Path:
        if self.save_draft is None:
            raise ValueError("this Trainer was built without save_draft; it cannot write checkpoints")
        self._accounting.flush()
        self.state.train_seconds = self._elapsed()
        path = ckpt.save_checkpoint(
            self.save_path,
            name,
            env=self.env,
            model=self.model,
            optimizers=self.optimizers,
            schedulers=self.schedulers,
            training_state=self.state_dict(),
            save_draft=self.save_draft,
        )
        logger.info(
            "checkpoint %s (epoch %d, step %d in epoch, global step %d)",
            path,
            self.state.epoch,
            self.state.step_in_epoch,
            self.state.global_step,
        )
        return path

    def _finish_epoch(self, epoch: int, *, force_save: bool) -> Path | None:
        started = time.monotonic()
        values = self.validate(epoch)
        self.state.end_epoch(epoch, None if values is None else values["val_loss"])
        summary = getattr(self.plans, "summary", None)
        if summary is not None and self.env.is_main:  # live traffic: what became of the chunk's rows
            with (self.save_path / LIVE_CHUNKS_FILE).open("a") as f:
                f.write(json.dumps({**summary(epoch), "global_step": self.state.global_step}) + "\n")
        if values is not None:
            self._log.val(epoch, self.state.global_step, values)
        path = None
        last = epoch == self.config.epochs - 1
        if force_save or last or (epoch + 1) % self.config.checkpoint_freq == 0:
            self.state.update_best(epoch)
            path = self.save(str(epoch))
            best = self.state.best_epoch
            if self.env.is_main:
                if best is not None and (self.save_path / str(best)).is_dir():
                    ckpt.update_best_link(self.save_path, str(best))
                ckpt.remove_checkpoint(self.save_path, ckpt.MID_EPOCH_NAME)
            barrier(self.env)
            self._finish_seconds = time.monotonic() - started
        return path

    def _finish_estimate(self, pace: float) -> float:
        """Seconds the run's end (validation, checkpoint) should take, for ``--time-budget``: as
        long as the last epoch end took, or else a forward-only pass (a third of a step) per
        validation step."""
        if self._finish_seconds is not None:
            return self._finish_seconds
        val_plan = self._val_plan_for(self.state.epoch) if self._plan_ready(self.state.epoch) else None
        return (val_plan.num_steps if val_plan is not None else 0) * pace / 3

    # ---- the loop -------------------------------------------------------------------------------

    def _end_reason(self) -> str | None:
        """Why the run ends before its plan does: "max_steps", "time_budget", or None."""
        step = self.state.global_step
        if self.config.max_steps is not None and step >= self.config.max_steps:
            return "max_steps"
        if self.budget is not None and self.state.schedule_steps is not None and step >= self.state.schedule_steps:
            return "time_budget"
        return None

    def _out_of_steps(self) -> bool:
        return self._end_reason() is not None

    def fetch_step(self, epoch: int, step: int) -> list[MicroBatch]:
        """This process's micro-batches of (epoch, step), fetched and packed synchronously."""
        return fetch_micro_batches(self.plans[epoch], self.train_source, self.logical_ranks, step)

    def _interrupted(self) -> FitResult:
        """Write ``<save>/latest/`` at the cursor and report the stop."""
        path = self.save(ckpt.MID_EPOCH_NAME)
        signum = self.stop.signum or signal.SIGTERM
        logger.warning(
            "stopped by %s at global step %d; run the same command to resume from %s",
            signal.Signals(signum).name,
            self.state.global_step,
            path,
        )
        return FitResult(
            status="interrupted",
            global_step=self.state.global_step,
            signal=int(signum),
            checkpoint=path,
            val_history=dict(self.state.val_history),
        )

    def _run_epoch(self, epoch: int, plan: BatchPlan, bar) -> FitResult | None:
        """Steps from the cursor to the end of the epoch (or --max-steps, or --time-budget); a
        FitResult if a stop signal ended it."""
        cfg = self.config
        prefetch = Prefetcher(
            plan=plan,
            source=self.train_source,
            logical_ranks=self.logical_ranks,
            start_step=self.state.step_in_epoch,
            depth=cfg.prefetch_depth,
            pin=self.device.type == "cuda",
        )
        waited, last_end = prefetch.wait_seconds, time.perf_counter()
        steps = iter(prefetch)
        try:
            while not self._out_of_steps():
                try:
                    step, micros = next(steps)
                except StopIteration:
                    break
                except StopRequested:  # the signal ended this rank's wait for the step's data
                    micros = None
                if self._agree_to_stop(micros is None or self.stop.requested):
                    return self._interrupted()
                result = self.run_step(epoch, step, micros)
                now = time.perf_counter()
                result.data_wait_s, result.wall_s = prefetch.wait_seconds - waited, now - last_end
                result.num_samples = sum(len(m.fetched.samples) for m in micros)
                waited, last_end = prefetch.wait_seconds, now
                self.state.add_step(
                    step=step, global_step=result.global_step, loss=result.loss, num_loss_tokens=result.num_loss_tokens
                )
                for micro in micros:
                    self._accounting.record(
                        epoch=epoch,
                        step=step,
                        global_step=self.state.global_step,
                        logical_rank=micro.logical_rank,
                        sample_ids=[s.sample_id for s in micro.fetched.samples],
                        skipped=micro.fetched.skipped,
                    )
                self._accounting.flush()
                self._log.step(result, bar, steps_in_epoch=plan.num_steps)
                if result.stop_requested:
                    return self._interrupted()
                if (
                    cfg.save_every_steps
                    and self.state.global_step % cfg.save_every_steps == 0
                    and self.state.step_in_epoch < plan.num_steps
                    and not self._out_of_steps()  # the run's end writes its own checkpoint
                ):
                    self.save(ckpt.MID_EPOCH_NAME)
        finally:
            prefetch.close()
        return None

    def _schedule_stream(self, epoch: int) -> None:
        """A streaming source learns, in fetch order, what this process will fetch in ``epoch``:
        training from the cursor, then validation, which runs for every epoch the loop enters.
        (Under ``--time-budget`` it learns the whole plan: the fitted length may still grow.)"""
        if epoch >= self.config.epochs or epoch in self._scheduled or not self._plan_ready(epoch):
            return  # (a live chunk whose traffic has not come is scheduled when the loop reaches it)
        self._scheduled.add(epoch)
        s = self.state
        window = order.steps_to_train(
            self.plans,
            epoch,
            cursor=(s.epoch, s.step_in_epoch),
            global_step=s.global_step,
            max_steps=self.config.max_steps,
        )
        if window is None:
            return  # the run ends before this epoch
        val_plan = self._val_plan_for(epoch) if self.val_source is self.train_source else None
        ids = order.fetch_order(
            self.plans[epoch],
            self.logical_ranks,
            start_step=window[0],
            end_step=window[1],
            val_plan=val_plan,
            val_rank=self.env.rank,
        )
        self.train_source.schedule(epoch, ids)

    def fit(self) -> FitResult:
        cfg = self.config
        self._log.tracker = Tracker(cfg, self.env, self.run_config)
        self._clock_start = time.monotonic() - self.state.train_seconds
        if self.budget is not None:
            self.budget.resume(self.state)
            self._log.total_steps = self.schedule_steps
        bar = self._log.progress_bar(self.state.global_step) if cfg.progress and self.env.is_main else None
        try:
            with self.stop:
                while self.state.epoch < cfg.epochs:
                    epoch = self.state.epoch
                    if self.state.epoch_complete:  # resumed from (or just wrote) this epoch's folder
                        self.state.next_epoch()
                        continue
                    if self._out_of_steps():
                        break
                    try:
                        plan = self.plans[epoch]  # live traffic: waits for the chunk's rows
                    except StopRequested:
                        return self._interrupted()
                    self._schedule_stream(epoch)
                    self._schedule_stream(epoch + 1)  # producers keep going through validation and the epoch turn
                    if self.state.step_in_epoch == 0:
                        logger.info(
                            "epoch %d: %d samples in %d batches, %d steps of %d batches",
                            epoch,
                            plan.num_samples,
                            plan.num_batches,
                            plan.num_steps,
                            self.logical_world,
                        )
                    interrupted = self._run_epoch(epoch, plan, bar)
                    if interrupted is not None:
                        return interrupted
                    out_of_steps = self._out_of_steps()
                    try:
                        if self.state.step_in_epoch >= plan.num_steps:
                            self.state.epoch_complete = True
                            self._finish_epoch(epoch, force_save=out_of_steps)
                        elif out_of_steps:  # --max-steps or --time-budget ran out mid-epoch: save where we are
                            self.train_source.abandon(epoch)  # --time-budget scheduled more than it trained
                            self._finish_epoch(epoch, force_save=True)
                    except _StoppedWaiting:  # validation runs again on resume
                        self.state.epoch_complete = False
                        return self._interrupted()
            reason = self._end_reason() if self.state.epoch < cfg.epochs else None
            if reason == "time_budget":
                logger.info(
                    "--time-budget %.0fs: stopped after %.0fs of training at global step %d, the schedule's end",
                    cfg.time_budget_seconds,
                    self._elapsed(),
                    self.state.global_step,
                )
            return FitResult(
                status=reason or "completed",
                global_step=self.state.global_step,
                val_history=dict(self.state.val_history),
            )
        finally:
            if bar is not None:
                bar.close()
            self.close()

    def close(self) -> None:
        self._accounting.close()
        self._log.close()
