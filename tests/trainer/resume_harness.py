"""The resume harness: one training command run straight through, and the same command run as a
real process that is signalled mid-run, then started again; the two must end with the same
weights and the same accounting record (every planned sample trained exactly as often as the
plan says, none twice).

Reusable by anything that trains through ``draftstream train``-like commands writing the
``<save>/accounting`` record and SPEC checkpoints: give ``run_resume_test`` a function from a save
path to an argv. Progress is read from the accounting record, so the signal lands after a given
optimizer step, while training is running; where exactly the process stops (the next step
boundary) does not matter, which is the point.

Shape of a test::

    outcome = run_resume_test(lambda save: [sys.executable, "-m", "trainer.train", ..., "--save-path", str(save)],
                              tmp_path, stop_after_step=num_steps // 2)
    outcome.assert_same_training(atol=1e-6)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import load_file

from trainer.training.accounting import read_accounting
from trainer.training.checkpoint import MASTER_WEIGHTS_FILE, MID_EPOCH_NAME, read_training_state


def accounted_step(save_path: Path) -> int:
    """The highest global step in the accounting record (0 before the first step)."""
    best = 0
    for path in (save_path / "accounting").glob("rank*.jsonl"):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in reversed(lines):
            try:  # the writer may be mid-line
                best = max(best, int(json.loads(line)["global_step"]))
                break
            except (json.JSONDecodeError, KeyError):
                continue
    return best


def total_steps(save_path: Path) -> int:
    """Global steps of a finished run."""
    return int(read_training_state(final_epoch_dir(save_path))["global_step"])


def final_epoch_dir(save_path: Path) -> Path:
    epochs = sorted(int(p.name) for p in save_path.iterdir() if p.name.isdigit() and not p.is_symlink())
    if not epochs:
        raise AssertionError(f"{save_path}: no epoch checkpoint")
    return save_path / str(epochs[-1])


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_to_completion(
    argv: Sequence[str], *, env: dict | None = None, timeout: float = 240.0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), env=_env(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


@dataclasses.dataclass
class ResumeOutcome:
    straight: Path
    resumed: Path
    signal_after_step: int
    stopped_at_step: int  # global step of the mid-run checkpoint the restart resumed from
    interrupted_returncode: int
    interrupted_stderr: str

    def records(self, save_path: Path) -> list[tuple]:
        return [
            (r["epoch"], r["step"], r["global_step"], r["logical_rank"], tuple(r["sample_ids"]))
            for r in read_accounting(save_path)
        ]

    def max_weight_difference(self) -> float:
        a = load_file(str(final_epoch_dir(self.straight) / MASTER_WEIGHTS_FILE))
        b = load_file(str(final_epoch_dir(self.resumed) / MASTER_WEIGHTS_FILE))
        assert a.keys() == b.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    def assert_same_training(self, *, atol: float = 1e-6, expected_ids: Sequence[int] | None = None) -> None:
        """Same final weights, same samples at the same steps, each sample once per epoch."""
        total = read_training_state(final_epoch_dir(self.straight))["global_step"]
        assert 0 < self.stopped_at_step < total, (
            f"the interrupted run was meant to stop mid-run, it stopped at {self.stopped_at_step} of {total}\n"
            f"{self.interrupted_stderr[-3000:]}"
        )
        straight, resumed = self.records(self.straight), self.records(self.resumed)
        assert resumed == straight
        per_epoch = collections.defaultdict(collections.Counter)
        for epoch, _, _, _, ids in resumed:
            per_epoch[epoch].update(ids)
        for epoch, counts in per_epoch.items():
            twice = sorted(i for i, c in counts.items() if c > 1)
            assert not twice, f"epoch {epoch}: samples trained twice: {twice[:10]}"
            if expected_ids is not None:
                assert sorted(counts) == sorted(expected_ids), f"epoch {epoch}: trained {sorted(counts)}"
        difference = self.max_weight_difference()
        assert difference <= atol, f"final weights differ by {difference}"


def run_resume_test(
    command: Callable[[Path], Sequence[str]],
    workdir: Path,
    *,
    stop_after_step: int,
    sig: int = signal.SIGTERM,
    env: dict | None = None,
    timeout: float = 240.0,
    progress: Callable[[Path], int] = accounted_step,
    concurrent: bool = True,
) -> ResumeOutcome:
    """Run ``command(save)`` straight in one save path and, in another, run it, send ``sig`` once
    ``progress`` reports ``stop_after_step``, wait for it to exit, and run it once more to finish.
    ``concurrent`` runs the straight run beside the interrupted one (startup costs overlap)."""
    workdir = Path(workdir)
    straight, resumed = workdir / "straight", workdir / "resumed"
    straight_proc = None
    if concurrent:
        straight_proc = subprocess.Popen(
            list(command(straight)), env=_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    else:
        run_to_completion(command(straight), env=env, timeout=timeout)

    proc = subprocess.Popen(
        list(command(resumed)), env=_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        while progress(resumed) < stop_after_step:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run exited ({proc.returncode}) before step {stop_after_step}\n{proc.stderr.read()[-6000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {stop_after_step} within {timeout} s")
            time.sleep(0.005)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=timeout)
        if straight_proc is not None:
            _, straight_err = straight_proc.communicate(timeout=timeout)
            if straight_proc.returncode != 0:
                raise AssertionError(f"the straight run exited {straight_proc.returncode}\n{straight_err[-6000:]}")
    finally:
        for p in (proc, straight_proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    latest = resumed / MID_EPOCH_NAME
    stopped_at = read_training_state(latest)["global_step"] if latest.is_dir() else -1
    run_to_completion(command(resumed), env=env, timeout=timeout)
    return ResumeOutcome(
        straight=straight,
        resumed=resumed,
        signal_after_step=stop_after_step,
        stopped_at_step=stopped_at,
        interrupted_returncode=proc.returncode,
        interrupted_stderr=stderr,
    )
