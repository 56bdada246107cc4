"""What the training loop reports after each step and each validation: a record in
``<save>/train_log.jsonl`` (rank 0), the tracker (tensorboard/wandb, when asked for), the progress
bar, and every ``--log-every`` steps a console line.

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


def format_accuracies(metrics: dict[str, float]) -> str:
    """``full_acc_0..2`` -> ``full_acc .41/.22/.10``; ``position_{d}_acc`` -> ``position_acc ...``."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, value in metrics.items():
        if "acc" not in name:
            continue
        match = re.search(r"_(\d+)", name)
        key = name if match is None else name[: match.start()] + name[match.end() :]
        groups.setdefault(key, []).append((int(match.group(1)) if match else 0, value))
    return " ".join(f"{k} " + "/".join(f"{v:.3f}" for _, v in sorted(vals)) for k, vals in sorted(groups.items()))


class RunLog:
    """The loop's reporting: ``train_log.jsonl`` (``path`` None on ranks other than 0), the tracker
    (set by ``Trainer.fit``), the console line and its log window."""

    def __init__(self, *, path: Path | None, source: SampleSource, log_every: int, total_steps: int):
        self.jsonl = JsonlLog(path)
        self.tracker: Tracker | None = None
        self._source = source
        self._log_every = log_every
        self._total_steps = total_steps
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
            total=self._total_steps,
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
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}", refresh=False)
        if r.global_step % self._log_every == 0 or r.global_step == self._total_steps:
            accs = format_accuracies(r.metrics)
            stream = ""
            if "samples_in_per_s" in figures:
                stream = (
                    f" | in {figures['samples_in_per_s']:.1f}/s out {figures['samples_out_per_s']:.1f}/s "
                    f"{figures['gb_in_per_s']:.3f} GB/s buf {100 * figures['buffer_fill']:.0f}% "
                    f"leases {figures['leases_outstanding']:.0f} (expired {figures['leases_expired']:.0f}) "
                    f"producers {figures['producers']:.0f}"
                )
            logger.info(
                "epoch %d step %d/%d (global %d/%d) loss %.4f | %s | lr %.3e gnorm %.3f | %.0f tok/s | stall %.1f%%%s",
                r.epoch,
                r.step + 1,
                steps_in_epoch,
                r.global_step,
                self._total_steps,
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
        accs = format_accuracies({k[4:]: v for k, v in values.items()})
        logger.info("epoch %d validation: loss %.4f | %s", epoch, values["val_loss"], accs)

    def close(self) -> None:
        self.jsonl.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
