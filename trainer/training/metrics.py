"""What the training loop reports after each step and each validation: a record in
``<save>/train_log.jsonl`` (rank 0), the tracker (tensorboard/wandb, when asked for), the progress
bar, and every ``--log-every`` steps a console line.

Metric names mean the same for Eagle-3 and P-EAGLE; ``k`` is the (k+1)-th drafted token, i.e. the
TTT step (Eagle-3) or the depth (P-EAGLE) (``trainer.models.losses.ChainAccuracy``):

- ``loss``: the objective the optimizer minimises (Eagle-3: the sum over TTT steps of each step's
  mean divergence, step s weighted ``--ttt-step-loss-decay``**s; P-EAGLE: one mean over the sampled
  elements of every depth); the console line says which (``describe_loss``);
- ``loss_{k}``: the mean divergence at k; ``acc_{k}``: argmax agreement with the verifier at k;
  ``full_acc_{k}``: chains right at every step 0..k; ``cond_acc_{k}``: right at k given right at
  0..k-1;
- ``accept_len`` (validation): the expected acceptance length these imply, bonus token included,
  ``1 + sum_k prod_{j<=k} cond_acc_j`` (``expected_acceptance_length``), a training-time proxy for
  what ``draftstream eval`` measures.

Validation records prefix them with ``val_`` (the tracker with ``val/``, training with ``train/``).
Other metrics a draft may return (earlier names kept for its own tests) are not reported.

Besides the step's own figures (loss, accuracies, lr, grad norm, tokens/s) a record carries the
data side: ``data_wait_s`` (time the loop waited on the prefetch queue), ``stall_pct`` (that wait
over the wall time of the *log window*, the steps since the last console line) and, for a
streaming source, its rates, buffer fill and leases (``SampleSource.snapshot``) over the same
window.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainer.data.sources import SampleSource
from trainer.training.trackers import JsonlLog, Tracker

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class StepResult:
    """One optimizer step's figures, the same on every rank after the step's all-reduce."""

    epoch: int
    step: int
    global_step: int
    loss: float
    metrics: dict[str, float]
    num_loss_tokens: int
    num_tokens: int  # real tokens over all ranks
    lr: float
    grad_norm: float
    seconds: float
    stop_requested: bool
    data_wait_s: float = 0.0  # time the loop waited for this step's data (stall)
    num_samples: int = 0  # samples this process trained on in the step
    wall_s: float = 0.0  # wall time since the previous step ended


STEP_METRICS = ("loss", "acc", "full_acc", "cond_acc")  # reported as {name}_{k}, k = step / depth
_STEP_METRIC = re.compile(rf"^({'|'.join(STEP_METRICS)})_(\d+)$")


def step_metric_names(names: Iterable[str]) -> list[str]:
    """The names among a draft's metrics that the loop reports (``{name}_{k}``), in one order on
    every rank."""
    return sorted(n for n in names if _STEP_METRIC.match(n))


def per_step(metrics: dict[str, float], name: str) -> list[float]:
    """``name_0, name_1, ...`` of ``metrics``, by k."""
    found = {int(m.group(2)): v for k, v in metrics.items() if (m := _STEP_METRIC.match(k)) and m.group(1) == name}
    return [found[k] for k in sorted(found)]


def expected_acceptance_length(cond_acc: Sequence[float]) -> float:
    """``1 + sum_k prod_{j<=k} cond_acc[j]``: tokens a verification round accepts on average, the
    verifier's bonus token included, when the (k+1)-th drafted token is accepted with probability
    ``cond_acc[k]`` given the ones before it were."""
    total, chain = 1.0, 1.0
    for p in cond_acc:
        chain *= p
        total += chain
    return total


def describe_loss(config) -> tuple[str, str]:
    """What ``loss`` sums and what ``k`` counts, for the console, from a ``DraftConfig`` (None:
    a draft without one)."""
    if config is None:
        return "loss", "step"
    if config.speculator_type == "eagle3":
        decay = config.ttt_step_loss_decay
        weights = "" if decay == 1 else f", step s weighted {decay:g}^s"
        return f"loss (sum over {config.ttt_steps} TTT steps{weights})", "TTT step"
    return f"loss (mean over the sampled positions of {config.num_depths} depths)", "depth"


def format_step_metrics(metrics: dict[str, float], unit: str = "step") -> str:
    """``per TTT step 1.2000/0.9000 | acc 0.410/0.220 full_acc ... cond_acc ...``."""
    losses = per_step(metrics, "loss")
    accs = " ".join(
        f"{name} " + "/".join(f"{v:.3f}" for v in values)
        for name in STEP_METRICS[1:]
        if (values := per_step(metrics, name))
    )
    parts = [f"per {unit} " + "/".join(f"{v:.4f}" for v in losses)] if losses else []
    return " | ".join([*parts, accs] if accs else parts)


class RunLog:
    """The loop's reporting: ``train_log.jsonl`` (``path`` None on ranks other than 0), the tracker
    (set by ``Trainer.fit``), the console line and its log window."""

    def __init__(self, *, path: Path | None, source: SampleSource, log_every: int, total_steps: int, draft_config=None):
        self.jsonl = JsonlLog(path)
        self.tracker: Tracker | None = None
        self._source = source
        self._log_every = log_every
        self.total_steps = total_steps  # the loop lowers it when --time-budget fits the schedule
        self._loss_label, self._unit = describe_loss(draft_config)
        self._window: dict[str, float] = {}
        self._reset_window()

    def _stream_figures(self, r: StepResult) -> dict[str, float]:
        """Stall % over the log window, and a streaming source's rates, fill and leases."""
        w = self._window
        w["wait"] += r.data_wait_s
        w["wall"] += r.wall_s
        w["samples"] += r.num_samples
        figures = {"data_wait_s": r.data_wait_s, "stall_pct": 100.0 * w["wait"] / w["wall"] if w["wall"] > 0 else 0.0}
        snap = self._source.snapshot()
        if snap is not None:
            dt = w["wall"] or 1e-9
            figures.update(
                samples_in_per_s=(snap["samples_in"] - w["samples_in"]) / dt,
                samples_out_per_s=w["samples"] / dt,
                gb_in_per_s=(snap["bytes_in"] - w["bytes_in"]) / dt / 1e9,
                buffer_fill=snap["buffer_fill"],
                leases_outstanding=snap["leases_outstanding"],
                leases_expired=snap["leases_expired"],
                producers=snap["producers"],
            )
            w["next_samples_in"], w["next_bytes_in"] = snap["samples_in"], snap["bytes_in"]
        return figures

    def _reset_window(self) -> None:
        w = self._window
        w.update(
            wait=0.0,
            wall=0.0,
            samples=0,
            samples_in=w.get("next_samples_in", 0.0),
            bytes_in=w.get("next_bytes_in", 0.0),
        )

    def progress_bar(self, initial: int):
        """A progress bar over the run's steps (rank 0 only; hidden when stderr is not a terminal)."""
        from tqdm.auto import tqdm  # only the process that draws a bar pays for importing tqdm

        return tqdm(
            total=self.total_steps,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None,
            leave=False,
        )

    def step(self, r: StepResult, bar, *, steps_in_epoch: int) -> None:
        tokens_per_s = r.num_tokens / r.seconds if r.seconds > 0 else 0.0
        figures = self._stream_figures(r)
        record = {
            "kind": "train",
            "epoch": r.epoch,
            "step": r.step,
            "global_step": r.global_step,
            "loss": r.loss,
            **r.metrics,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "num_tokens": r.num_tokens,
            "num_loss_tokens": r.num_loss_tokens,
            "tokens_per_s": tokens_per_s,
            "step_wall_s": r.wall_s,
            **figures,
        }
        self.jsonl.write(record)
        if self.tracker is not None:
            self.tracker.log(
                {f"train/{k}": v for k, v in record.items() if k not in ("kind", "epoch", "step")}, r.global_step
            )
        if bar is not None:
            if bar.total != self.total_steps:
                bar.total = self.total_steps
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}", refresh=False)
        if r.global_step % self._log_every == 0 or r.global_step == self.total_steps:
            accs = format_step_metrics(r.metrics, self._unit)
            stream = ""
            if "samples_in_per_s" in figures:
                stream = (
                    f" | in {figures['samples_in_per_s']:.1f}/s out {figures['samples_out_per_s']:.1f}/s "
                    f"{figures['gb_in_per_s']:.3f} GB/s buf {100 * figures['buffer_fill']:.0f}% "
                    f"leases {figures['leases_outstanding']:.0f} (expired {figures['leases_expired']:.0f}) "
                    f"producers {figures['producers']:.0f}"
                )
            logger.info(
                "epoch %d step %d/%d (global %d/%d) %s %.4f | %s | lr %.3e gnorm %.3f | %.0f tok/s | stall %.1f%%%s",
                r.epoch,
                r.step + 1,
                steps_in_epoch,
                r.global_step,
                self.total_steps,
                self._loss_label,
                r.loss,
                accs,
                r.lr,
                r.grad_norm,
                tokens_per_s,
                figures["stall_pct"],
                stream,
            )
            self._reset_window()

    def val(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        self.jsonl.write({"kind": "val", "epoch": epoch, "global_step": global_step, **values})
        if self.tracker is not None:
            self.tracker.log({k.replace("val_", "val/", 1): v for k, v in values.items()}, global_step)
        accs = format_step_metrics({k[4:]: v for k, v in values.items()}, self._unit)
        accept = f" | expected acceptance length {values['val_accept_len']:.3f}" if "val_accept_len" in values else ""
        logger.info("epoch %d validation: %s %.4f | %s%s", epoch, self._loss_label, values["val_loss"], accs, accept)

    def close(self) -> None:
        self.jsonl.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
