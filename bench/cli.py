"""``draftstream bench <name> [args]``: run one benchmark module's ``main``.

Every benchmark is a module of this package with a docstring stating its regime, a readable table
on stdout, and one JSON line last.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "transport": "bench.transport",
    "capture": "bench.capture",
    "producer": "bench.capture",
    "trainer": "bench.trainer",
    "pipeline": "bench.pipeline",
    "fanout": "bench.fanout",
    "jobs": "bench.jobs",
    "quality": "bench.quality",
    "serve-cost": "bench.serve_cost",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        asked = not argv or argv[0] in ("-h", "--help")
        print(f"usage: draftstream bench <{names}> [args...]", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    name = BENCHMARKS[argv[0]]
    if argv[0] in ("producer", "capture") and _backend(argv[1:]) == "vllm":
        name = "bench.vllm_capture"  # the vLLM producer path against plain vLLM prefill
    module = importlib.import_module(name)
    return int(module.main(argv[1:]) or 0)


def _backend(args: list[str]) -> str:
    """The value of ``--backend`` in ``args`` ("hf" when absent)."""
    for i, arg in enumerate(args):
        if arg == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return "hf"
