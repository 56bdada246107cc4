"""Print a wheel's runtime requirement list, with chosen version floors relaxed.

`make test-vllm` uses it to install vLLM's dependencies by hand: at the time of writing vLLM 0.33.0
asked for `certifi>=2026.10.19`, newer than any certifi the registry served, so a plain
`pip install vllm==0.33.0` failed. Installing this list (with that floor dropped), then the wheel
itself with `--no-deps`, gives the same environment otherwise. Standard library only: it runs in a
fresh venv before anything is installed.

    python tests/vllm/wheel_requirements.py vllm-0.33.0-*.whl --relax certifi > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"\bextra\s*==")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: str, relax: set[str]) -> list[str]:
    """Requires-Dist lines of `wheel` that apply without extras; packages in `relax` lose their version bounds."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    relax = {_canonical(r) for r in relax}
    out = []
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        if marker and _EXTRA_MARKER.search(marker):
            continue
        m = _NAME.match(spec)
        if m is None:
            raise ValueError(f"cannot read requirement {req!r} in {wheel}")
        name = m.group(1)
        if _canonical(name) in relax:
            # Keep the extras (`name[x]`) but drop every version bound.
            extras = re.search(r"\[[^\]]*\]", spec)
            spec = name + (extras.group(0) if extras else "")
        out.append(spec.strip() + (f"; {marker.strip()}" if marker.strip() else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--relax", action="append", default=[], help="package whose version bounds to drop (repeatable)")
    args = ap.parse_args(argv)
    sys.stdout.write("\n".join(wheel_requirements(args.wheel, set(args.relax))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
