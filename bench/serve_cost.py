"""``draftstream bench serve-cost``: what capturing served traffic costs the server.

Regime: one ``draftstream serve`` (vLLM with an Eagle-3 draft on loopback, behind the capturing
front door) on a local target (a tiny one built here by default, or ``--model`` with ``--draft``),
and the same requests sent three ways, round-robin, in every round:

- ``vllm``: straight to vLLM (what plain ``vllm serve`` gives);
- ``door``: through a front door with capture off (the proxy hop alone);
- ``capture``: through ``draftstream serve``'s front door, every request captured and written out.

Each way sends ``--requests`` completions (unique prompts of ``--prompt-tokens`` random token ids,
``--max-tokens`` greedy tokens each) from ``--concurrency`` client threads; round 0 warms up and is
not counted. Reported: requests/s and generated tokens/s per way (the mean over rounds), their
ratios to ``vllm`` measured side by side, and what the capture queue saw. Needs vLLM (run it in the
vLLM environment: ``.venv-vllm/bin/python -m protocol.cli bench serve-cost``). On CPU set
``VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

WAYS = ("vllm", "door", "capture")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftstream bench serve-cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a target folder (default: a tiny one built here)")
    p.add_argument("--draft", default=None, help="a draft checkpoint for --model (default: an untrained Eagle-3)")
    p.add_argument("--requests", type=int, default=48, help="requests per way and round")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="rounds, the first of which warms up")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--vllm-args", default="--enforce-eager --max-model-len 1024", help="more vllm serve arguments")
    return p


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _draft_for(target: Path, out: Path) -> Path:
    """An untrained one-layer Eagle-3 draft of ``target`` (the cost does not depend on its quality)."""
    from protocol.target import default_layer_ids
    from trainer.models.config import DraftConfig
    from trainer.models.export import build_draft, save_draft

    num_layers = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    config = DraftConfig(
        speculator_type="eagle3",
        verifier_name_or_path=str(target),
        aux_layer_ids=default_layer_ids(num_layers)[:-1],
        ttt_steps=3,
    )
    draft = build_draft(config, None)
    save_draft(draft, out)
    return out


def _wait(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"draftstream serve exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def run(args: argparse.Namespace, work: Path) -> dict:
    from producer.live.front import FrontDoor
    from producer.live.serve import free_port
    from producer.live.traffic import CaptureControls, TrafficQueue

    if args.model:
        target = Path(args.model)
        if not args.draft:
            raise SystemExit("bench serve-cost: --model needs --draft")
        draft = Path(args.draft)
    else:
        from producer.tiny_target import build_tiny_target

        target = build_tiny_target(work / "target")
        draft = _draft_for(target, work / "draft")
    vllm_port, door_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "protocol.cli", "serve", str(draft), "--port", str(door_port),
        "--vllm-port", str(vllm_port), "--capture-dir", str(work / "traffic"),
        "--", *args.vllm_args.split(),
    ]  # fmt: skip
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    door = None
    try:
        _wait(f"http://127.0.0.1:{door_port}", server)
        door = FrontDoor(f"http://127.0.0.1:{vllm_port}", TrafficQueue(CaptureControls(rate=0.0))).start()
        urls = {"vllm": f"http://127.0.0.1:{vllm_port}", "door": door.url, "capture": f"http://127.0.0.1:{door_port}"}
        model = str(draft)
        vocab = json.loads((target / "config.json").read_text())["vocab_size"]
        rng = random.Random(args.seed)
        rates: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for round_ in range(args.rounds):
            for way in WAYS:
                prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]

                def one(prompt: list[int], url: str = urls[way]) -> int:
                    body = {"model": model, "prompt": [prompt], "max_tokens": args.max_tokens, "temperature": 0.0}
                    return int(_post(url + "/v1/completions", body)["usage"]["completion_tokens"])

                start = time.perf_counter()
                with futures.ThreadPoolExecutor(args.concurrency) as pool:
                    tokens = sum(pool.map(one, prompts))
                seconds = time.perf_counter() - start
                if round_ > 0:
                    rates[way].append((args.requests / seconds, tokens / seconds))
        ways = {
            way: {
                "requests_per_s": sum(r for r, _ in v) / len(v),
                "tokens_per_s": sum(t for _, t in v) / len(v),
                "rounds": [round(r, 3) for r, _ in v],
            }
            for way, v in rates.items()
        }
    finally:
        if door is not None:
            door.stop()
        server.send_signal(signal.SIGTERM)  # writes the capture stats line, stops vLLM
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    stats = [line for line in (work / "serve.log").read_text().splitlines() if "capture: {" in line]
    captured = json.loads(stats[-1].split("capture: ", 1)[1]) if stats else {}
    base = ways["vllm"]["requests_per_s"]
    return {
        "bench": "serve-cost",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds - 1,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "ways": ways,
        "door_vs_vllm": ways["door"]["requests_per_s"] / base,
        "capture_vs_vllm": ways["capture"]["requests_per_s"] / base,
        "captured": captured,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 2:
        raise SystemExit("bench serve-cost: --rounds must be at least 2 (the first warms up)")
    with tempfile.TemporaryDirectory(prefix="serve-cost-") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print(f"{'way':<10} {'requests/s':>11} {'tokens/s':>9}  rounds (requests/s)")
    for way, v in result["ways"].items():
        print(f"{way:<10} {v['requests_per_s']:>11.2f} {v['tokens_per_s']:>9.1f}  {v['rounds']}")
    print(
        f"through the door: {result['door_vs_vllm']:.3f} x vLLM's requests/s; "
        f"with capture: {result['capture_vs_vllm']:.3f} x; captured {result['captured'].get('queued', 0)} rows"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
