"""``draftstream <command> --help`` answers for every registered subcommand (and every benchmark):
exit status 0 and a usage line on stdout. Each command's ``main(["--help"])`` runs in-process; a help
string argparse cannot format (a bare ``%`` in it) fails here instead of in a user's terminal."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from bench.cli import BENCHMARKS
from protocol.cli import main as draftstream

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the CI interpreter is 3.11
    tomllib = None

COMMANDS = {ep.name: ep for ep in entry_points(group="draftstream.commands")}


def run_help(main, argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_the_installed_commands_are_those_pyproject_registers():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    registered = pyproject["project"]["entry-points"]["draftstream.commands"]
    assert sorted(COMMANDS) == sorted(registered), "stale install: rerun `pip install -e .` (make install)"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name, capsys):
    assert run_help(COMMANDS[name].load(), ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and f"draftstream {name}" in out


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_answers_help(name, capsys):
    assert run_help(importlib.import_module(BENCHMARKS[name]).main, ["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: draftstream bench ")


def test_the_dispatcher_lists_every_command(capsys):
    assert draftstream(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out
