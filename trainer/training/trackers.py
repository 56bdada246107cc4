"""Metric sinks of the training loop on rank 0: a JSON-lines log always, tensorboard or wandb when
asked for with ``--tracker`` (and installed: ``LoopConfig`` refuses a tracker it cannot import).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.training.config import LoopConfig
from trainer.training.distributed import DistEnv


class JsonlLog:
    """``<save>/train_log.jsonl`` (rank 0): one line per step (``kind: train``) and per validation
    (``kind: val``); the resume path trims lines past the checkpoint like the accounting record."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def reopen(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self.path.open("a")

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


class Tracker:
    """tensorboard / wandb on rank 0; a no-op otherwise."""

    def __init__(self, config: LoopConfig, env: DistEnv, run_config: dict):
        self._tb = self._wandb = None
        if not env.is_main or config.tracker == "none":
            return
        log_dir = Path(config.log_dir or Path(config.save_path) / "logs")
        if config.tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir / (config.run_name or "")))
        else:
            import wandb

            self._wandb = wandb.init(name=config.run_name, config=run_config, dir=str(log_dir), resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
