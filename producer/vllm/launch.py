"""``draftstream launch-vllm``: start ``vllm serve`` with hidden-state capture and our KV connector.

    draftstream launch-vllm MODEL [--target-layer-ids 2 16 29 32] [--spill-dir DIR] [--dry-run] -- <vllm serve args>

builds and execs::

    vllm serve MODEL \\
      --speculative-config '{"method": "extract_hidden_states", "num_speculative_tokens": 1,
                             "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [2, 16, 29, 32]}}}' \\
      --kv-transfer-config '{"kv_connector": "DraftstreamConnector", "kv_role": "kv_producer",
                             "kv_connector_module_path": "producer.vllm.connector", "kv_connector_extra_config": {...}}' \\
      <vllm serve args>

Layer ids default to ``[2, N//2, N-3, N]`` for a target with N decoder layers, read from the model's
``config.json`` (a local folder, or the hub through ``transformers.AutoConfig``;
``protocol.target.read_text_config``). They must end with N: the trainer computes the verifier's
targets from the last one (``protocol.target.capture_layer_ids``). ``--dry-run`` prints the command
instead of running it. ``draftstream produce --backend vllm --endpoint http://HOST:PORT`` then sends
rows to this server. The same two config dicts serve the in-process engine (``producer.vllm.backend``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

CONNECTOR_CLASS = "DraftstreamConnector"
CONNECTOR_MODULE = "producer.vllm.connector"
_OWNED_FLAGS = ("--speculative-config", "--kv-transfer-config")


def speculative_config(layer_ids: list[int]) -> dict[str, Any]:
    """vLLM's ``extract_hidden_states`` settings capturing ``layer_ids`` (aux ids..., last)."""
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }


def kv_transfer_config(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` loading ``DraftstreamConnector`` from this package."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_role": "kv_producer",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_connector_extra_config": dict(extra or {}),
    }


def resolve_layer_ids(model: str, layer_ids: list[int] | None) -> list[int]:
    """The ids to capture for ``model`` (``protocol.target.capture_layer_ids``, last id required),
    its layer count read from its config (``protocol.target.read_text_config``)."""
    # Here, not at the top: `draftstream launch-vllm --dry-run/--help` runs without importing torch.
    from protocol.target import capture_layer_ids, read_text_config

    text = read_text_config(model)
    if "num_hidden_layers" not in text:
        raise ValueError(f"the config of {model} has no num_hidden_layers; pass --target-layer-ids")
    return capture_layer_ids(layer_ids, int(text["num_hidden_layers"]), require_last=True)


def connector_extra_config(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if args.spill_dir:
        extra["spill_dirs"] = [os.path.abspath(d) for d in args.spill_dir]
    if args.max_pending_bytes is not None:
        extra["max_pending_bytes"] = args.max_pending_bytes
    if args.max_pending_samples is not None:
        extra["max_pending_samples"] = args.max_pending_samples
    if args.send_timeout is not None:
        extra["send_timeout_seconds"] = args.send_timeout
    if bool(args.curve_secret_key) != bool(args.curve_server_key):
        raise ValueError(
            "CURVE needs both --curve-secret-key (this host's) and --curve-server-key (the trainer's public key)"
        )
    if args.curve_secret_key:
        extra["curve_secret_key"] = os.path.abspath(args.curve_secret_key)
        extra["curve_server_key"] = os.path.abspath(args.curve_server_key)
    return extra


def build_command(args: argparse.Namespace, serve_args: list[str]) -> list[str]:
    for arg in serve_args:
        if arg.split("=", 1)[0] in _OWNED_FLAGS:
            raise ValueError(
                f"{arg.split('=', 1)[0]} is set by launch-vllm; use --target-layer-ids and its other flags instead"
            )
    layer_ids = resolve_layer_ids(args.model, args.target_layer_ids)
    return [
        args.vllm,
        "serve",
        args.model,
        "--speculative-config",
        json.dumps(speculative_config(layer_ids)),
        "--kv-transfer-config",
        json.dumps(kv_transfer_config(connector_extra_config(args))),
        *serve_args,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream launch-vllm",
        description="Start `vllm serve MODEL` capturing hidden states for draftstream (extract_hidden_states + DraftstreamConnector).",
        epilog="Arguments after `--` go to `vllm serve` unchanged, e.g. -- --port 8000 --max-model-len 8192",
    )
    parser.add_argument("model", help="target model: local folder or hub id (as for vllm serve)")
    parser.add_argument(
        "--target-layer-ids",
        type=int,
        nargs="+",
        default=None,
        help="layer ids to capture, last included (default: 2 N//2 N-3 N)",
    )
    parser.add_argument(
        "--spill-dir",
        action="append",
        default=[],
        help="allow file:// destinations under DIR (produce --backend vllm --spill); repeatable",
    )
    parser.add_argument(
        "--max-pending-bytes",
        type=int,
        default=None,
        help="host memory for copied samples not yet sent (default 4 GiB)",
    )
    parser.add_argument(
        "--max-pending-samples", type=int, default=None, help="samples copied but not yet sent (default 64)"
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=None,
        help="seconds a trainer may take no data before a sample is reported failed (default 60)",
    )
    parser.add_argument(
        "--curve-secret-key", default=None, help="CURVE secret key file of this host (trainer data endpoints use CURVE)"
    )
    parser.add_argument("--curve-server-key", default=None, help="the trainer's CURVE public key file")
    parser.add_argument("--vllm", default="vllm", help="the vllm executable (default: vllm on PATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, serve_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    try:
        command = build_command(args, serve_args)
    except ValueError as e:
        print(f"draftstream launch-vllm: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(
            f"draftstream launch-vllm: error: {command[0]!r} not found; install vLLM or pass --vllm PATH",
            file=sys.stderr,
        )
        return 1
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
