"""``--time-budget SECONDS``: fit the learning-rate schedule to a wall-clock budget.

The loop trains as usual while it times its first ``CALIBRATION_STEPS`` steps (after the first
one, which includes waiting for the first data); from then on, at every step, it sets the
schedule's length to the steps that fit in the time left at the pace measured so far (checkpoints,
validation and data waits included), less what the final validation and checkpoint should take,
never beyond the planned steps; the step's lr is then read from the schedule (warmup ratio,
linear or cosine decay) drawn over that length (``optim.refresh_lrs``). So the lr reaches the
schedule's end when the budget does, even when the pace changes near the end (a slow step there
steepens the end rather than cutting it off), and the run stops there: validation, an epoch
checkpoint, exit 0, like ``--max-steps``.

Training time counts from the first step's fetch and across resumes (``TrainState.train_seconds``):
a run stopped by a signal and started again finishes by the same budget; a run that reached its
budget has finished, and the same command trains nothing more (a larger budget continues it).
Under torchrun every rank fits with rank 0's clock (carried by the step's all-reduce), so they all
stop after the same step.
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.training.state import TrainState

CALIBRATION_STEPS = 5  # steps timed before the schedule is first fitted


class TimeBudget:
    def __init__(self, seconds: float, *, planned_steps: int):
        self.seconds = seconds
        self.planned_steps = planned_steps
        self._timed_from: tuple[int, float] | None = None  # (global step, seconds) after this process's first step

    def resume(self, state: TrainState) -> None:
        """Adopt ``state``'s fitted length if it was fitted to this budget; otherwise fit anew (a
        budget already spent ends the run before its next step)."""
        if state.time_budget_s != self.seconds:
            state.time_budget_s, state.schedule_steps = self.seconds, None
        if state.train_seconds >= self.seconds:
            state.schedule_steps = min(state.global_step, state.schedule_steps or state.global_step)
        self._timed_from = None

    def fit(
        self, state: TrainState, *, global_step: int, elapsed: float, finish_seconds: Callable[[float], float]
    ) -> None:
        """Step ``global_step`` is being taken at ``elapsed`` training seconds: set
        ``state.schedule_steps``. ``finish_seconds(pace)``: what the end (validation, checkpoint)
        should take at ``pace`` seconds per step."""
        if elapsed >= self.seconds:
            state.schedule_steps = global_step
            return
        if self._timed_from is None:
            self._timed_from = (global_step, elapsed)
            return
        steps = global_step - self._timed_from[0]
        if steps < CALIBRATION_STEPS:
            return
        pace = (elapsed - self._timed_from[1]) / steps
        left = self.seconds - elapsed - finish_seconds(pace)
        fitted = global_step + max(0, int(left // pace)) if pace > 0 else self.planned_steps
        state.schedule_steps = max(global_step, min(self.planned_steps, fitted))
