"""Streaming end to end with real processes: `draftstream run`, producers and trainer ranks over
ipc://, checked against the batch plan through the trainer's accounting record.

- exactly once: every planned (epoch, step, logical rank) trained on exactly its planned ids;
- a producer SIGKILLed mid-epoch: its leases go to the other producer, the record stays exact;
- the trainer SIGKILLed mid-epoch and restarted: it resumes from its checkpoint, producers
  reconnect by themselves, the record over the whole run is still exact (in the fan-out test);
- streaming trains the same losses as the offline workflow (produce --spill, then train);
- ranks on two nodes found through one address; one capture feeding two trainings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from producer.prepare import PrepareConfig, prepare_dataset
from producer.tiny_target import TinyTargetConfig, build_tiny_target, write_conversations
from protocol.dataset import PreparedDataset
from trainer.data.plan import BatchPlan
from trainer.data.sources import split_train_val
from trainer.training.accounting import read_accounting
from trainer.training.checkpoint import read_training_state

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

CLI = [sys.executable, "-m", "protocol.cli"]
TRAIN_ARGS = [
    "--lr",
    "3e-3",
    "--total-seq-len",
    "384",
    "--draft-vocab-size",
    "128",
    "--log-every",
    "4",
    "--no-progress",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-run")
    model = build_tiny_target(root / "model", TinyTargetConfig(arch="llama", num_layers=8))
    data = write_conversations(root / "conversations.jsonl", 48)
    prepare_dataset(
        PrepareConfig(model=str(model), data=[str(data)], output=str(root / "prepared"), seq_length=256, num_workers=1)
    )
    return {"model": str(model), "data": str(root / "prepared"), "root": root}


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def expected_record(
    data: str,
    *,
    epochs: int,
    world: int,
    seed: int = 7,
    total_seq_len: int = 384,
    reuse: int = 1,
    reuse_window: int = 64,
) -> dict:
    """(epoch, step, logical rank) -> planned sample ids, as the trainer plans them."""
    dataset = PreparedDataset(data)
    train_ids, _ = split_train_val(len(dataset), val_ratio=0.1, seed=seed)
    expected = {}
    for epoch in range(epochs):
        plan = BatchPlan.build(
            sample_ids=train_ids,
            lengths=dataset.lengths(train_ids),
            seed=seed,
            epoch=epoch,
            world_size=world,
            total_seq_len=total_seq_len,
            reuse=reuse,
            reuse_window=reuse_window,
        )
        for step in range(plan.num_steps):
            for rank in range(world):
                expected[(epoch, step, rank)] = plan.batches_for(rank, step)
    return expected


def assert_record_matches_plan(save: Path, expected: dict) -> None:
    records = read_accounting(save)
    got = {(r["epoch"], r["step"], r["logical_rank"]): r["sample_ids"] for r in records}
    assert len(records) == len(got), "a step was recorded twice"
    assert all(not r["skipped"] for r in records)
    assert got == expected


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def steps_recorded(save: Path) -> int:
    return len(read_accounting(save)) if (save / "accounting").is_dir() else 0


def losses_of(save: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    return [(r["kind"], r["global_step"], r.get("loss", r.get("val_loss"))) for r in rows]


def pids_with(*fragments: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(f in cmdline for f in fragments):
                pids.append(int(proc.name))
    return pids


def test_a_producer_killed_mid_epoch_loses_no_sample(workload, tmp_path):
    save = tmp_path / "save"
    cmd = [
        *CLI,
        "run",
        "--model",
        workload["model"],
        "--data",
        workload["data"],
        "--save-path",
        str(save),
        "--num-producers",
        "2",
        "--tolerate-producer-failures",
        "--producer-args",
        "--max-batch-tokens 64",
        "--",
        "--epochs",
        "3",
        "--lease-seconds",
        "5",
        *TRAIN_ARGS,
    ]
    run = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: steps_recorded(save) >= 3, 120, "training to start")
        victims = pids_with("--producer-id producer-0", " produce ", workload["data"])
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        out, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 0, out[-3000:]
    assert "producer-0 ended with signal 9" in out
    assert_record_matches_plan(save, expected_record(workload["data"], epochs=3, world=1))


STREAMED_FLAGS = ["--epochs", "2", *TRAIN_ARGS]  # `streamed`: an Eagle-3 run other tests compare with


@pytest.fixture(scope="module")
def streamed(workload, tmp_path_factory):
    """One `draftstream run` (Eagle-3, 1 producer, STREAMED_FLAGS) that tee'd what it received."""
    root = tmp_path_factory.mktemp("streamed")
    stream_save, tee = root / "stream", root / "tee"
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--model",
            workload["model"],
            "--data",
            workload["data"],
            "--save-path",
            str(stream_save),
            "--num-producers",
            "1",
            "--",
            *STREAMED_FLAGS,
            "--spill-dir",
            str(tee),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return stream_save, tee


def test_streaming_trains_the_same_losses_as_offline_files(workload, streamed, tmp_path):
    common = STREAMED_FLAGS
    stream_save, tee = streamed
    hs = tmp_path / "hs"
    subprocess.run(
        [*CLI, "produce", "--model", workload["model"], "--data", workload["data"], "--spill", str(hs)],
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    offline_save = tmp_path / "offline"
    subprocess.run(
        [
            *CLI,
            "train",
            "--verifier-name-or-path",
            workload["model"],
            "--data-path",
            workload["data"],
            "--hidden-states-path",
            str(hs),
            "--save-path",
            str(offline_save),
            *common,
        ],
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )

    streamed, offline = losses_of(stream_save), losses_of(offline_save)
    # The trainer's tee left the files the offline producer wrote: same tokens, and the same hidden
    # states up to float rounding (rows were batched with other neighbours, so GEMM blocking differs).
    from protocol.hsfile import hs_path, list_hs_indices, read_hs_file

    assert list_hs_indices(tee) == list_hs_indices(hs) == list(range(len(PreparedDataset(workload["data"]))))
    for i in list_hs_indices(hs):
        tokens, hidden = read_hs_file(hs_path(tee, i))
        ref_tokens, ref_hidden = read_hs_file(hs_path(hs, i))
        assert torch.equal(tokens, ref_tokens) and hidden.dtype == ref_hidden.dtype
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    assert [s[:2] for s in streamed] == [o[:2] for o in offline]
    assert [s[2] for s in streamed] == pytest.approx([o[2] for o in offline], rel=1e-5)


def test_reuse_trains_each_sample_k_times_while_the_target_runs_once(workload, tmp_path):
    """``--reuse 3`` with the default window and no ``--buffer-bytes``: the window is the whole
    epoch here, more than the fixed default of 4 batches; the default buffer fits it."""
    save = tmp_path / "save"
    cmd = [
        *CLI,
        "run",
        "--model",
        workload["model"],
        "--data",
        workload["data"],
        "--save-path",
        str(save),
        "--num-producers",
        "1",
        "--",
        "--epochs",
        "2",
        "--reuse",
        "3",
        *TRAIN_ARGS,
    ]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_record_matches_plan(save, expected_record(workload["data"], epochs=2, world=1, reuse=3))
    rows = len(PreparedDataset(workload["data"]))
    log = (save / "logs" / "producer-0.log").read_text()
    assert f"streamed {2 * rows} samples" in log  # train + validation rows, once per epoch


def _run_cmd(workload, save, endpoint, *train_args, num_producers=2):
    return [
        *CLI,
        "run",
        "--model",
        workload["model"],
        "--data",
        workload["data"],
        "--save-path",
        str(save),
        "--stream-endpoint",
        f"ipc://{endpoint}",
        "--num-producers",
        str(num_producers),
        "--",
        *TRAIN_ARGS,
        *train_args,
    ]


def test_run_refuses_a_buffer_too_small_for_reuse_before_starting_anything(workload, tmp_path):
    save = tmp_path / "save"
    cmd = _run_cmd(workload, save, tmp_path / "ep", "--reuse", "3", "--buffer-bytes", "100000")
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("draftstream run: error: rank 0: samples waiting"), done.stderr
    assert "--buffer-bytes" in lines[0] and not (save / "logs").exists()  # no producer was started


def test_run_stops_cleanly_on_sigterm(workload, tmp_path):
    """SIGTERM to `run` mid-training: the trainer checkpoints and exits 143, the producers are gone
    within seconds, and nothing is reported as an error."""
    save, endpoint = tmp_path / "save", tmp_path / "ep"
    run = subprocess.Popen(
        _run_cmd(workload, save, endpoint, "--epochs", "50"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: steps_recorded(save) >= 3, 120, "training to start")
        assert len(pids_with(" produce ", str(endpoint))) == 2
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert took < 20, took  # the producers' stop deadline is 10 s; the default grace is 60 s
    assert pids_with(" produce ", str(endpoint)) == []
    assert not [line for line in out.splitlines() if " ERROR " in line], out[-3000:]
    assert "stopped on request" in out
    state = read_training_state(save / "latest")
    assert state["global_step"] == steps_recorded(save)


def _free_base_port(hosts: list[str], span: int) -> int:
    """A port P with P..P+span-1 free on every host."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span >= 65536:
            continue
        try:
            for host in hosts:
                for port in range(base, base + span):
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def test_ranks_on_two_nodes_are_found_through_one_address_and_train_as_one_node(workload, tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous: each "node" binds its own loopback address, and two
    producers given only the first node's address, over tcp with CURVE, stream into all 4 ranks (a
    producer without an authorized key never gets in). The
    record equals the plan and the losses equal a 4-rank `draftstream run` on one node (2 producers,
    whose record, checkpoints and telemetry are checked too)."""
    from protocol.sockets import make_curve_keys

    hosts = ["127.0.0.2", "127.0.0.3"]
    stream_port, rdzv_port = _free_base_port(hosts, 4), _free_base_port(["127.0.0.1"], 1)
    server_public, server_secret = make_curve_keys(tmp_path / "trainer", "trainer")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    producer_keys = []
    for i in range(2):
        public, secret = make_curve_keys(tmp_path / f"producer-{i}", f"producer-{i}")
        (authorized / f"producer-{i}.key").write_bytes(public.read_bytes())
        producer_keys.append(secret)
    save, common = tmp_path / "two-nodes", ["--epochs", "1", *TRAIN_ARGS]
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{rdzv_port}",
                "--rdzv-id=two-nodes",
                "-m",
                "protocol.cli",
                "train",
                "--verifier-name-or-path",
                workload["model"],
                "--data-path",
                workload["data"],
                "--save-path",
                str(save),
                "--stream-endpoint",
                f"tcp://{host}:{stream_port}",
                "--curve-secret-key",
                str(server_secret),
                "--curve-authorized-keys",
                str(authorized),
                *common,
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in hosts
    ]
    producers = [
        subprocess.Popen(
            [
                *CLI,
                "produce",
                "--model",
                workload["model"],
                "--data",
                workload["data"],
                "--connect",
                f"tcp://{hosts[0]}:{stream_port}",  # one address: the first node's first rank
                "--producer-id",
                f"producer-{i}",
                "--curve-secret-key",
                str(secret),
                "--curve-server-key",
                str(server_public),
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, secret in enumerate(producer_keys)
    ]
    stranger = subprocess.Popen(  # no CURVE keys: never gets past the handshake
        [*CLI, "produce", "--model", workload["model"], "--data", workload["data"]]
        + ["--connect", f"tcp://{hosts[0]}:{stream_port}", "--producer-id", "stranger", "--handshake-timeout", "8"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
        assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        produced = [p.communicate(timeout=60)[0] for p in producers]
        assert [p.returncode for p in producers] == [0, 0], "\n".join(o[-3000:] for o in produced)
        refused, _ = stranger.communicate(timeout=60)
    finally:
        for process in [*agents, *producers, stranger]:
            process.kill()
    assert stranger.returncode != 0 and "no trainer rank answered" in refused, refused[-3000:]
    assert "stranger" not in "".join(outputs) and "producer producer-0 joined rank 0" in "".join(outputs)
    for out in produced:  # each producer found all 4 ranks, on both hosts
        for host in hosts:
            for data_port in (stream_port + 1, stream_port + 3):
                assert f"welcomed us; data -> tcp://{host}:{data_port}" in out, out[-3000:]
    expected = expected_record(workload["data"], epochs=1, world=4)
    assert_record_matches_plan(save, expected)

    one_node = tmp_path / "one-node"
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--model",
            workload["model"],
            "--data",
            workload["data"],
            "--save-path",
            str(one_node),
            "--nproc-per-node",
            "4",
            "--num-producers",
            "2",
            "--",
            *common,
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_record_matches_plan(one_node, expected)  # `run`: 2 producers, 4 ranks, every sample exactly once
    assert (one_node / "checkpoint_best").is_symlink() and (one_node / "0" / "model.safetensors").is_file()
    logs = [json.loads(line) for line in (one_node / "train_log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "val" for r in logs)
    assert all("stall_pct" in r and "samples_in_per_s" in r for r in logs if r["kind"] == "train")

    two, one = losses_of(save), losses_of(one_node)
    assert [r[:2] for r in two] == [r[:2] for r in one] and len(two) > 2
    assert [r[2] for r in two] == pytest.approx([r[2] for r in one], rel=1e-5)


def fanout_figures(log: str) -> dict:
    """The producer's closing line on its target forwards and its share window."""
    import re

    match = re.search(
        r"target forwards: (\d+) for (\d+) samples sent .*from the window (\d+) \(peak ([\d.]+) MB of ([\d.]+) MB",
        log,
    )
    assert match, log[-3000:]
    forwards, samples, hits = (int(match.group(i)) for i in (1, 2, 3))
    return {"forwards": forwards, "samples": samples, "hits": hits, "peak_mb": float(match.group(4))}


def test_one_producer_feeds_an_eagle3_and_a_peagle_job_as_if_each_ran_alone(workload, streamed, tmp_path):
    """`run --job`: one producer, two trainings from one capture. Each job's record equals its plan
    and its losses equal the same job run alone (Eagle-3 alone: the `streamed` run); the target ran
    about once per row for both."""
    common, window_mb = STREAMED_FLAGS, 8
    jobs = {"eagle3": [], "peagle": ["--speculator-type", "peagle"]}
    save = tmp_path / "fanout"
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--model",
            workload["model"],
            "--data",
            workload["data"],
            "--save-path",
            str(save),
            *[arg for name, flags in jobs.items() for arg in ("--job", f"{name}={' '.join(flags)}")],
            "--producer-args",
            f"--share-window-bytes {window_mb << 20}",
            "--",
            *common,
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = fanout_figures((save / "logs" / "producer-0.log").read_text())
    assert figures["forwards"] <= 0.55 * figures["samples"], figures
    assert figures["peak_mb"] <= window_mb, figures
    expected = expected_record(workload["data"], epochs=2, world=1)
    for name, flags in jobs.items():
        assert_record_matches_plan(save / name, expected)
        alone = streamed[0] if name == "eagle3" else tmp_path / f"alone-{name}"
        if name != "eagle3":
            solo = subprocess.run(
                [*CLI, "run", "--model", workload["model"], "--data", workload["data"], "--save-path", str(alone)]
                + ["--", *common, *flags],
                env=env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert solo.returncode == 0, solo.stderr[-3000:]
        shared, own = losses_of(save / name), losses_of(alone)
        assert [r[:2] for r in shared] == [r[:2] for r in own] and len(own) > 2
        assert [r[2] for r in shared] == pytest.approx([r[2] for r in own], rel=1e-5), name


def test_fanout_keeps_both_records_exact_through_a_killed_producer_and_a_killed_and_restarted_job(workload, tmp_path):
    """Two jobs, two producers serving both. A producer is SIGKILLed, then job a's trainer; job b
    trains on meanwhile, a is started again, resumes from its mid-epoch checkpoint and the producers
    find it again by themselves; both records are exact (the single-job trainer restart is this
    test's job a)."""
    endpoints = {name: f"ipc://{tmp_path}/{name}" for name in ("a", "b")}
    epochs = {"a": 3, "b": 5}

    def train(name: str) -> list[str]:
        return [
            *CLI,
            "train",
            "--verifier-name-or-path",
            workload["model"],
            "--data-path",
            workload["data"],
            "--save-path",
            str(tmp_path / name),
            "--stream-endpoint",
            endpoints[name],
            "--epochs",
            str(epochs[name]),
            "--save-every-steps",
            "2",
            "--lease-seconds",
            "5",
            *TRAIN_ARGS,
        ]

    producers = [
        subprocess.Popen(
            [*CLI, "produce", "--model", workload["model"], "--data", workload["data"]]
            + ["--connect", *endpoints.values(), "--producer-id", f"p{i}", "--max-batch-tokens", "64"]
            + ["--handshake-timeout", "120"],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    quiet = {"env": env(), "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    trainers = {name: subprocess.Popen(train(name), **quiet) for name in endpoints}
    try:
        wait_for(lambda: steps_recorded(tmp_path / "a") >= 2, 120, "job a to train")
        producers[0].kill()
        a_steps = steps_recorded(tmp_path / "a")
        wait_for(
            lambda: (tmp_path / "a" / "latest").is_dir() and steps_recorded(tmp_path / "a") >= a_steps + 3,
            120,
            "job a to train on with one producer",
        )
        trainers["a"].kill()
        trainers["a"].wait(30)
        b_steps = steps_recorded(tmp_path / "b")
        wait_for(lambda: steps_recorded(tmp_path / "b") >= b_steps + 2, 120, "job b to train on without job a")
        restarted = subprocess.run(train("a"), env=env(), capture_output=True, text=True, timeout=300)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert "resum" in restarted.stderr.lower()
        _, err = trainers["b"].communicate(timeout=300)
        assert trainers["b"].returncode == 0, err[-3000:]
        assert producers[1].wait(60) == 0  # both jobs told it the run is over
    finally:
        for process in [*producers, *trainers.values()]:
            process.kill()
    for name in endpoints:
        assert_record_matches_plan(tmp_path / name, expected_record(workload["data"], epochs=epochs[name], world=1))
