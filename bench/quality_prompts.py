"""Prompts for ``draftstream bench quality``: real English text that nobody on this team wrote,
available offline, split by topic so the held-out prompts ask about things training never saw.

Source: the docstrings of CPython's standard library, read from the running interpreter (the
text ``pydoc`` shows): module docstrings, and those of the public classes, functions and methods
each module defines itself (re-exports and inherited docstrings are skipped, duplicates dropped).
Each docstring gives one excerpt: its first paragraphs up to ``max_chars`` characters (a first
paragraph longer than that is cut at a sentence or word end); excerpts under ``MIN_CHARS`` are
dropped. An excerpt becomes an instruction-style user prompt through one of ``TEMPLATES``
("Summarize ...", "Explain ...", ...), drawn with ``--seed``.

Split by module family (``FAMILIES``):

- training: text processing, containers, numbers, files and archives, data formats, functional
  tools, introspection, dates and times, concurrency, developer tooling;
- held out: ``networking`` (sockets, TLS, HTTP, URLs, FTP/POP/IMAP/SMTP clients, XML-RPC, WSGI,
  IP addresses) and ``email`` (the email package, mailbox, MIME types, quoted-printable).

No module is in two families, and a training excerpt that mentions a held-out topic at all
(``HELD_OUT_WORDS``: socket, HTTP, URL, mail, server, client, ...) is dropped, so the held-out
prompts' topics are disjoint from the training prompts'. The same templates serve both sides: the
style of request is shared, the subject matter is not.

Deterministic for a given ``seed`` and Python version: excerpts are collected in sorted order,
then shuffled with ``random.Random(seed)``. Docstrings change between Python releases, so another
interpreter gives other (equally valid) prompts. Modules missing from this interpreter
(``tomllib`` before 3.11, ...) are skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import random
import re
import warnings
from pathlib import Path

FAMILIES: dict[str, tuple[str, ...]] = {
    # training families
    "text": ("string", "textwrap", "re", "difflib", "unicodedata", "codecs", "locale", "gettext", "shlex"),
    "containers": (
        "collections",
        "heapq",
        "bisect",
        "array",
        "queue",
        "enum",
        "dataclasses",
        "copy",
        "weakref",
        "types",
        "graphlib",
    ),
    "numbers": ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"),
    "files": (
        "pathlib",
        "os",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "filecmp",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "io",
        "fileinput",
    ),
    "formats": (
        "json",
        "csv",
        "configparser",
        "tomllib",
        "pickle",
        "struct",
        "plistlib",
        "sqlite3",
        "zlib",
        "hashlib",
    ),
    "functional": ("functools", "itertools", "operator", "contextlib"),
    "introspection": (
        "inspect",
        "ast",
        "dis",
        "typing",
        "abc",
        "traceback",
        "warnings",
        "pprint",
        "reprlib",
        "pkgutil",
        "tokenize",
    ),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "concurrency": ("threading", "concurrent.futures", "multiprocessing", "subprocess", "signal"),
    "tooling": ("argparse", "logging", "unittest", "doctest", "timeit", "cProfile", "pdb", "trace", "tracemalloc"),
    # held-out families
    "networking": (
        "socket",
        "ssl",
        "selectors",
        "socketserver",
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "urllib.robotparser",
        "urllib.error",
        "ftplib",
        "poplib",
        "imaplib",
        "smtplib",
        "ipaddress",
        "xmlrpc.client",
        "xmlrpc.server",
        "wsgiref.simple_server",
        "wsgiref.handlers",
    ),
    "email": (
        "email",
        "email.message",
        "email.parser",
        "email.generator",
        "email.utils",
        "email.header",
        "email.headerregistry",
        "email.policy",
        "email.mime.text",
        "email.mime.multipart",
        "email.mime.base",
        "email.contentmanager",
        "email.feedparser",
        "email.charset",
        "email.encoders",
        "email.iterators",
        "mailbox",
        "mimetypes",
        "quopri",
    ),
}
HELD_OUT_FAMILIES = ("networking", "email")
TRAIN_FAMILIES = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)

# A training excerpt that names any of these is about a held-out topic: dropped.
HELD_OUT_WORDS = re.compile(
    r"\b(sockets?|https?|urls?|uris?|e-?mails?|mail\w*|smtp|imap\w*|pop3|ftp|ssl|tls|tcp|udp|ipv[46]|"
    r"mime|cookies?|servers?|clients?|hostnames?|network\w*|internet|web)\b",
    re.IGNORECASE,
)

TEMPLATES = (
    "Summarize the following documentation in two or three sentences:\n\n{text}",
    "Explain in plain words what this part of the Python documentation for `{name}` describes:\n\n{text}",
    "Here is the docstring of `{name}` from Python's standard library:\n\n{text}\n\n"
    "When would a programmer use it? Give a short example.",
    "Rewrite this technical description so that a beginner can follow it:\n\n{text}",
    "What are the key points of the following text?\n\n{text}",
)
MIN_CHARS = 80  # shorter excerpts ("Return self.") make no prompt worth answering
MAX_CHARS = 600


@dataclasses.dataclass(frozen=True, kw_only=True)
class Excerpt:
    family: str
    module: str
    name: str  # dotted name of the documented object (the module's own name for its docstring)
    text: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompt:
    id: str
    family: str
    module: str
    name: str
    template: int  # index into TEMPLATES
    excerpt: str
    text: str  # the user turn: TEMPLATES[template] around the excerpt

    def conversation(self) -> dict:
        """A row ``regenerate``/``prepare``/``eval`` read: the prompt and an assistant turn to fill."""
        return {
            "id": self.id,
            "family": self.family,
            "source": f"python-stdlib-docstring:{self.name}",
            "messages": [{"role": "user", "content": self.text}, {"role": "assistant", "content": ""}],
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptSplit:
    train: list[Prompt]
    held_out: list[Prompt]
    train_pool: int  # excerpts available to each side
    held_out_pool: int


def excerpt_of(doc: str, max_chars: int = MAX_CHARS) -> str:
    """The first paragraphs of a docstring, up to ``max_chars`` characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    if not paragraphs:
        return ""
    text = paragraphs[0]
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = max(cut.rfind(". "), cut.rfind(".\n"))
        return cut[: end + 1] if end >= MIN_CHARS else cut.rsplit(None, 1)[0]
    for paragraph in paragraphs[1:]:
        if len(text) + 2 + len(paragraph) > max_chars:
            break
        text += "\n\n" + paragraph
    # A last paragraph that announces what follows ("Usage patterns follow:") would dangle.
    while text.endswith(":") and "\n\n" in text:
        text = text.rsplit("\n\n", 1)[0]
    return text


def _documented(module) -> list[tuple[str, str]]:
    """(dotted name, docstring) of ``module`` and of the public objects it defines itself."""
    name = module.__name__
    found = [(name, module.__doc__)] if module.__doc__ else []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if obj.__doc__:
            found.append((f"{name}.{attr}", obj.__doc__))
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if not member.startswith("_") and inspect.isroutine(func) and func.__doc__:
                    found.append((f"{name}.{attr}.{member}", func.__doc__))
    return found


def excerpts(families: tuple[str, ...], *, max_chars: int = MAX_CHARS) -> list[Excerpt]:
    """Every usable excerpt of ``families``' modules, in a fixed order (family, module, name)."""
    found, seen = [], set()
    for family in families:
        for module_name in FAMILIES[family]:
            try:
                with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn on access
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(module_name)
                    documented = _documented(module)
            except ImportError:
                continue
            for name, doc in documented:
                text = excerpt_of(doc, max_chars)
                if len(text) < MIN_CHARS or text in seen:
                    continue
                if family not in HELD_OUT_FAMILIES and HELD_OUT_WORDS.search(text):
                    continue
                seen.add(text)
                found.append(Excerpt(family=family, module=module_name, name=name, text=text))
    return found


def _prompts(pool: list[Excerpt], count: int, rng: random.Random, prefix: str) -> list[Prompt]:
    chosen = rng.sample(pool, count)
    out = []
    for i, e in enumerate(chosen):
        template = rng.randrange(len(TEMPLATES))
        text = TEMPLATES[template].format(name=e.name, text=e.text)
        out.append(
            Prompt(
                id=f"{prefix}-{i}",
                family=e.family,
                module=e.module,
                name=e.name,
                template=template,
                excerpt=e.text,
                text=text,
            )
        )
    return out


def build_prompts(*, num_train: int, num_held_out: int, seed: int, max_chars: int = MAX_CHARS) -> PromptSplit:
    """``num_train`` prompts from the training families and ``num_held_out`` from the held-out ones."""
    train_pool = excerpts(TRAIN_FAMILIES, max_chars=max_chars)
    held_pool = excerpts(HELD_OUT_FAMILIES, max_chars=max_chars)
    for flag, want, pool in (
        ("--num-train-prompts", num_train, train_pool),
        ("--num-eval-prompts", num_held_out, held_pool),
    ):
        if not 1 <= want <= len(pool):
            raise ValueError(f"{flag} must be in [1, {len(pool)}] (the excerpts available), got {want}")
    rng = random.Random(seed)
    return PromptSplit(
        train=_prompts(train_pool, num_train, rng, "train"),
        held_out=_prompts(held_pool, num_held_out, rng, "heldout"),
        train_pool=len(train_pool),
        held_out_pool=len(held_pool),
    )


def write_jsonl(prompts: list[Prompt], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.conversation(), ensure_ascii=False) + "\n" for p in prompts))
    return path
