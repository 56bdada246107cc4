"""``TrainState``: where a run is, and what it has learned of itself so far.

The plan cursor (epoch, step in the epoch, global step, whether the epoch's checkpoint is
written), the history an epoch's end consults (train and validation loss per epoch, the best
epoch), and the clock ``--time-budget`` reads (training seconds so far, the schedule's fitted
length and the budget it was fitted to; ``trainer.training.budget``). It is what ``<save>/<name>/training_state.pt`` holds besides the plan's fingerprint, the
RNG states and the run's flags, so a resumed run continues exactly where this one stopped.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0  # the plan cursor: steps of ``epoch`` already trained
    global_step: int = 0
    epoch_complete: bool = False  # ``epoch``'s end (validation, checkpoint) is done
    val_history: dict[int, float] = dataclasses.field(default_factory=dict)
    train_loss_history: dict[int, float] = dataclasses.field(default_factory=dict)
    best_epoch: int | None = None
    epoch_loss: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # sum(loss * n), sum(n)
    train_seconds: float = 0.0  # wall-clock seconds of training so far, over every resumed run
    schedule_steps: int | None = None  # the lr schedule's length fitted to --time-budget (None: the plan's)
    time_budget_s: float | None = None  # the --time-budget schedule_steps was fitted to

    def add_step(self, *, step: int, global_step: int, loss: float, num_loss_tokens: int) -> None:
        self.global_step = global_step
        self.step_in_epoch = step + 1
        self.epoch_loss[0] += loss * num_loss_tokens
        self.epoch_loss[1] += num_loss_tokens

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_complete = self.epoch + 1, 0, False
        self.epoch_loss = [0.0, 0.0]

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        """Record ``epoch``'s mean train loss (token-weighted) and its validation loss."""
        if self.epoch_loss[1] > 0:
            self.train_loss_history[epoch] = self.epoch_loss[0] / self.epoch_loss[1]
        if val_loss is not None:
            self.val_history[epoch] = val_loss

    def update_best(self, epoch: int) -> None:
        """``epoch`` becomes the best if it scores at most the best so far: by validation loss,
        or by train loss in a run without validation."""
        score = self.val_history if self.val_history else self.train_loss_history
        if epoch in score and (
            self.best_epoch is None or self.best_epoch not in score or score[epoch] <= score[self.best_epoch]
        ):
            self.best_epoch = epoch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_complete": self.epoch_complete,
            "val_history": {str(k): v for k, v in self.val_history.items()},
            "train_loss_history": {str(k): v for k, v in self.train_loss_history.items()},
            "best_epoch": self.best_epoch,
            "epoch_loss": list(self.epoch_loss),
            "train_seconds": self.train_seconds,
            "schedule_steps": self.schedule_steps,
            "time_budget_s": self.time_budget_s,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainState:
        return cls(
            epoch=int(state["epoch"]),
            step_in_epoch=int(state["step_in_epoch"]),
            global_step=int(state["global_step"]),
            epoch_complete=bool(state.get("epoch_complete", False)),
            val_history={int(k): float(v) for k, v in state.get("val_history", {}).items()},
            train_loss_history={int(k): float(v) for k, v in state.get("train_loss_history", {}).items()},
            best_epoch=state.get("best_epoch"),
            epoch_loss=[float(x) for x in state.get("epoch_loss", [0.0, 0.0])],
            train_seconds=float(state.get("train_seconds", 0.0)),
            schedule_steps=None if state.get("schedule_steps") is None else int(state["schedule_steps"]),
            time_budget_s=None if state.get("time_budget_s") is None else float(state["time_budget_s"]),
        )
