"""``draftstream run``: the paired launch. P producers and R trainer ranks on this host, started,
watched and stopped together by one command.

::

    draftstream run
      |-- trainer: `draftstream train --stream-endpoint E ...`   (torchrun --nproc-per-node R when R > 1)
      |-- producer-0: `draftstream produce --connect E --num-ranks R ...`   log: <save>/logs/producer-0.log
      |-- producer-1: ...

One capture, several trainings: with ``--job NAME=FLAGS`` (repeated) the run starts one trainer per
job, each with the flags after ``--`` plus its own, its own save path ``<save>/NAME`` and stream
endpoint, and every producer serves all of them (``produce --connect E1 E2 ...``): a row the jobs
share runs the target once (``producer.window``). For example an Eagle-3 and a P-EAGLE draft::

    draftstream run --model M --data D --save-path runs/x --job eagle3="--speculator-type eagle3" \
        --job peagle="--speculator-type peagle" -- --epochs 3 --lr 1e-4

The trainers own the run: when the last one exits, producers are told to stop (they normally already
got ``EndOfStream``) and the run exits with the first failed trainer's code (0 if none failed). A
job whose trainer fails does not stop the others. A child that dies ends the run with a
message naming it and a non-zero exit, except producers under ``--tolerate-producer-failures``
(their leases go to the others; the run fails only when none is left). SIGINT/SIGTERM are passed
to every child as SIGTERM: the trainer writes a checkpoint at its next step boundary (or at once
if it is waiting for data) and exits 143, producers stop within seconds; a stop asked for is not
an error. Before any child starts, ``train``'s flags are checked (``train.check_stream_flags``), so
a flag error or a ``--buffer-bytes`` too small for the plan is one line, not a target load later.

Everything after ``--`` goes to ``draftstream train`` unchanged; ``--producer-args`` to each producer.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.logs import setup_logging
from protocol.signals import StopSignals

logger = logging.getLogger("draftstream.run")


@dataclasses.dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path | None = None

    def describe_exit(self) -> str:
        code = self.process.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        where = f" (log: {self.log_path})" if self.log_path else ""
        return f"{self.name} ended with {how}{where}"


def _cli() -> list[str]:
    return [sys.executable, "-m", "protocol.cli"]


@dataclasses.dataclass
class Job:
    name: str
    save_path: str
    endpoint: str
    flags: list[str]


def jobs_of(args: argparse.Namespace) -> list[Job]:
    """The trainer jobs: one (``--save-path``, ``--stream-endpoint``) without ``--job``; else one per
    ``--job NAME=FLAGS``, under ``<save>/NAME`` with an endpoint of its own."""
    if not args.job:
        return [Job(name="trainer", save_path=args.save_path, endpoint=args.stream_endpoint, flags=[])]
    jobs = []
    for j, spec in enumerate(args.job):
        name, sep, flags = spec.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--job takes NAME=FLAGS with NAME of letters, digits, - and _; got {spec!r}")
        scheme, _, rest = args.stream_endpoint.partition("://")
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            endpoint = f"tcp://{host}:{int(port) + 2 * args.nproc_per_node * j}"
        else:
            endpoint = f"{args.stream_endpoint}/{name}"
        jobs.append(
            Job(name=name, save_path=str(Path(args.save_path) / name), endpoint=endpoint, flags=shlex.split(flags))
        )
    if len({job.name for job in jobs}) != len(jobs):
        raise ValueError("--job names must differ")
    return jobs


def build_commands(
    args: argparse.Namespace, train_args: list[str]
) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """``(name, command)`` of every trainer job, and every producer's command."""
    jobs = jobs_of(args)
    trainers = [(job.name, _trainer_command(args, job, train_args)) for job in jobs]
    producers = []
    for i in range(args.num_producers):
        producers.append(
            [
                *_cli(),
                "produce",
                "--model",
                args.model,
                "--data",
                args.data,
                "--connect",
                *[job.endpoint for job in jobs],
                "--num-ranks",
                str(args.nproc_per_node),
                "--producer-id",
                f"producer-{i}",
                *shlex.split(args.producer_args),
            ]
        )
    return trainers, producers


def _trainer_command(args: argparse.Namespace, job: Job, train_args: list[str]) -> list[str]:
    return [
        *(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={args.nproc_per_node}",
                "-m",
                "protocol.cli",
            ]
            if args.nproc_per_node > 1
            else _cli()
        ),
        "train",
        "--verifier-name-or-path",
        args.model,
        "--data-path",
        args.data,
        "--save-path",
        job.save_path,
        "--stream-endpoint",
        job.endpoint,
        *train_args,
        *job.flags,
    ]


def _terminate(children: list[Child], grace: float) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.process.wait(remaining)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", child.name, grace)
            child.process.kill()
            child.process.wait()


def run(args: argparse.Namespace, train_args: list[str]) -> int:
    save = Path(args.save_path)
    logs = save / "logs"
    try:
        trainer_cmds, producer_cmds = build_commands(args, train_args)
    except ValueError as e:
        print(f"draftstream run: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for _, cmd in trainer_cmds:
            print(shlex.join(cmd))
        for cmd in producer_cmds:
            print(shlex.join(cmd))
        return 0
    from trainer.train import check_stream_flags  # torch and the dataset: not for --help or --dry-run

    try:
        for name, cmd in trainer_cmds:
            try:
                check_stream_flags(cmd[cmd.index("train") + 1 :], world_size=args.nproc_per_node)
            except ValueError as e:
                raise ValueError(f"job {name}: {e}" if args.job else str(e)) from None
    except (ValueError, OSError) as e:
        print(f"draftstream run: error: {e}", file=sys.stderr)
        return 2
    logs.mkdir(parents=True, exist_ok=True)
    with StopSignals("asking the trainers to checkpoint and stop, and the producers to stop") as stop:
        return _supervise(args, logs, trainer_cmds, producer_cmds, stop)


def _supervise(
    args: argparse.Namespace,
    logs: Path,
    trainer_cmds: list[tuple[str, list[str]]],
    producer_cmds: list[list[str]],
    stop: StopSignals,
) -> int:
    """Start the children and watch them until every trainer exits (or a producer fails); every
    stop signal is forwarded to every child as SIGTERM."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    trainer_env = {**env, "CUDA_VISIBLE_DEVICES": args.trainer_gpus} if args.trainer_gpus else env
    trainers = [Child(name, subprocess.Popen(cmd, env=trainer_env)) for name, cmd in trainer_cmds]
    producer_gpus = args.producer_gpus.split(",") if args.producer_gpus else []
    producers: list[Child] = []
    for i, cmd in enumerate(producer_cmds):
        log_path = logs / f"producer-{i}.log"
        child_env = {**env, "CUDA_VISIBLE_DEVICES": producer_gpus[i % len(producer_gpus)]} if producer_gpus else env
        with open(log_path, "ab") as log:
            producers.append(
                Child(
                    f"producer-{i}",
                    subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT),
                    log_path,
                )
            )
    logger.info(
        "started %s (%d rank%s each) and %d producers; producer logs in %s",
        f"{len(trainers)} trainer jobs" if args.job else "the trainer",
        args.nproc_per_node,
        "s" * (args.nproc_per_node > 1),
        len(producers),
        logs,
    )
    exit_code = 0
    stopping: int | None = None  # the first stop signal received
    reported: set[str] = set()  # producers whose death was already logged
    ended: set[str] = set()  # trainers whose exit was handled
    try:
        while True:
            signum = stop.consume()
            if signum is not None:
                stopping = stopping or signum
                logger.warning(
                    "signal %d: asking the trainers to checkpoint and stop, and the producers to stop", signum
                )
                for child in [*trainers, *producers]:
                    if child.process.poll() is None:
                        child.process.send_signal(signal.SIGTERM)
            for trainer in trainers:
                if trainer.name in ended or trainer.process.poll() is None:
                    continue
                ended.add(trainer.name)
                code = trainer.process.returncode
                if stopping is not None:
                    code = _stopped(trainer, stopping)
                elif code != 0:
                    others = len(trainers) - len(ended)
                    logger.error("%s%s", trainer.describe_exit(), f"; {others} other jobs go on" if others else "")
                exit_code = exit_code or code
            if len(ended) == len(trainers):
                break
            alive = []
            for child in producers:
                code = child.process.poll()
                if code is None:
                    alive.append(child)
                elif code != 0 and stopping is None and not args.tolerate_producer_failures:
                    logger.error(
                        "%s; stopping the run (--tolerate-producer-failures to carry on)", child.describe_exit()
                    )
                    _terminate(trainers, args.grace_seconds)
                    exit_code = code if code > 0 else 1
                    return exit_code
                elif code != 0 and stopping is None and child.name not in reported:
                    reported.add(child.name)
                    logger.warning("%s; its work goes to the remaining producers", child.describe_exit())
            # All producers failed (none left because the trainer ended the stream): stop.
            if (
                stopping is None
                and producers
                and not alive
                and any(t.process.poll() is None for t in trainers)
                and all(c.process.returncode != 0 for c in producers)
            ):
                logger.error("every producer has died; stopping the trainers")
                _terminate(trainers, args.grace_seconds)
                return 1
            time.sleep(0.2)
    finally:
        _terminate(
            [c for c in [*producers, *trainers] if c.process.poll() is None],
            args.grace_seconds,
        )
    return exit_code


def _stopped(trainer: Child, signum: int) -> int:
    """The run's exit code after a stop signal, reported as the stop it is (not as an error)."""
    code = trainer.process.returncode
    if code == 0:
        logger.info("the trainer finished as the stop arrived")
        return 0
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        logger.info("stopped on request: the trainer wrote its checkpoint; run the same command to resume")
        return code
    # torchrun ends with its own code when its workers stop on a signal.
    logger.warning("stopped on request; %s (its log says whether it wrote a checkpoint)", trainer.describe_exit())
    return 128 + signum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream run",
        description="Paired launch: P producers stream hidden states into R trainer ranks; no disk cache.",
        epilog="Arguments after `--` go to `draftstream train` (e.g. -- --epochs 3 --lr 1e-4 --draft-vocab-size 32000).",
    )
    parser.add_argument(
        "--model", required=True, help="target model (local dir or hub id), used by producers and as the verifier"
    )
    parser.add_argument("--data", required=True, help="prepared dataset (draftstream prepare --output)")
    parser.add_argument("--save-path", required=True, help="checkpoints, logs and the accounting record go here")
    parser.add_argument("--num-producers", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1, help="trainer ranks (torchrun) on this host")
    parser.add_argument(
        "--stream-endpoint", default=None, help="ipc://DIR (default: a fresh temp dir) or tcp://HOST:PORT"
    )
    parser.add_argument(
        "--producer-args", default="", help="extra flags for every producer, one string (e.g. '--dtype bfloat16')"
    )
    parser.add_argument("--producer-gpus", default="", help="e.g. 0,1: producer i sees GPU list[i %% len] alone")
    parser.add_argument("--trainer-gpus", default="", help="e.g. 2,3: the trainer ranks' CUDA_VISIBLE_DEVICES")
    parser.add_argument(
        "--tolerate-producer-failures", action="store_true", help="keep going while at least one producer lives"
    )
    parser.add_argument(
        "--grace-seconds", type=float, default=60.0, help="how long children get to stop before being killed"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        default=None,
        help="passed to `draftstream train`: fit the lr schedule to this many seconds of training and stop "
        "there with a checkpoint (see `draftstream train --help`)",
    )
    parser.add_argument(
        "--job",
        action="append",
        metavar="NAME=FLAGS",
        help="one capture, several trainings: a trainer job with these `train` flags added to those after `--`, "
        "saved under <save-path>/NAME; repeat for more jobs. Every producer serves them all, and a row they share "
        "runs the target once",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.num_producers < 1 or args.nproc_per_node < 1:
        raise SystemExit("draftstream run: --num-producers and --nproc-per-node must be >= 1")
    if args.time_budget is not None:
        train_args = [*train_args, "--time-budget", str(args.time_budget)]
    if args.stream_endpoint is None:
        args.stream_endpoint = "ipc://" + tempfile.mkdtemp(prefix="draftstream-")
    setup_logging("run")
    return run(args, train_args)


if __name__ == "__main__":
    raise SystemExit(main())
