#!/usr/bin/env python3
"""Build ``data/sample-corpus.parquet``: a deterministic English sample corpus.

Why this exists
---------------
The README's main command needs a realistic batch of text to embed. The
worker runs on machines with no internet access, so the corpus cannot be
downloaded at run time, and a synthetic "lorem ipsum" corpus would not
exercise tokenisation or length bucketing the way real text does.

Instead the text comes from what every CPython install already ships, the
standard library itself:

* ``pydoc_data.topics``: the plain-text language reference that ``help()``
  shows (statements, data model, built-in types), ids ``pydoc:<topic>:...``;
* docstrings of a fixed list of stdlib modules, their functions, classes
  and methods, ids ``stdlib:<module>.<object>:...`` (e.g.
  ``stdlib:json.dumps:0``).

This is real English written by people, with a retrieval-like mix of
lengths: one-line summaries, single sentences and long explanatory
paragraphs. It is fixed for a given Python version.

Built once, committed
---------------------
The script is run ONCE and ``data/sample-corpus.parquet`` is committed, so
nothing is generated or fetched at run time. Re-running it with CPython 3.11
on Linux and the same pyarrow version gives a byte-identical file because:

* the module list below is fixed and sorted; nothing depends on what else
  happens to be installed;
* members are visited in sorted name order;
* docstrings are taken from the object itself (``obj.__doc__`` cleaned with
  ``inspect.cleandoc``, i.e. ``inspect.getdoc`` without its fallback to
  inherited base-class docstrings, which would credit text to the wrong
  object);
* texts are deduplicated keeping the first occurrence, and rows keep the
  order found (help topics, then MODULES order, then member order, then
  paragraph order), of which the first ``--count`` are written.

A different Python minor version changes the docstrings, hence the rows. A
few modules define some members only on some OSes (subprocess, selectors,
getpass, webbrowser, ...), so a build on another OS may differ slightly.

What counts as a text
---------------------
A paragraph (blank-line separated; a bullet item counts, minus its marker)
whose whitespace is collapsed and that looks like prose: 5..300 words,
starts with a letter, mostly alphabetic words, no doctest (``>>>``) or
indented code, no reST rules/tables/field lists, no bare call signatures.
A paragraph with several sentences is followed by each of its prose
sentences as its own row (id suffix ``<paragraph>.<sentence>``). Those
rows overlap their paragraph on purpose: they are the short, query-like
texts next to the long passages.

Usage::

    python scripts/build_sample_corpus.py            # 12000 rows
    python scripts/build_sample_corpus.py --count 13000 --out /tmp/c.parquet

Needs only the standard library and pyarrow. Do not run under ``-OO``
(which strips docstrings).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import statistics
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

DEFAULT_COUNT = 12_000
MIN_COUNT = 10_000
MIN_WORDS = 5
MAX_WORDS = 300
MIN_ALPHA_RATIO = 0.75
EXPECTED_PYTHON = (3, 11)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "sample-corpus.parquet"

# Fixed, sorted list of the cross-platform standard-library modules whose
# docstrings yield prose (generated once from sys.stdlib_module_names, then
# frozen here). Left out on purpose: OS-specific modules (posix, os, sys,
# time, socket, select, signal, ...), GUI and tool packages that some
# distributions split off (tkinter, turtle, idlelib, lib2to3, distutils),
# the encodings.* codec tables, test packages, and modules deprecated by
# PEP 594. Do not reorder: the row order (and so which rows fall inside
# --count) follows this list.
MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "asyncio.base_events",
    "asyncio.base_futures",
    "asyncio.base_subprocess",
    "asyncio.coroutines",
    "asyncio.events",
    "asyncio.exceptions",
    "asyncio.format_helpers",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.proactor_events",
    "asyncio.protocols",
    "asyncio.queues",
    "asyncio.runners",
    "asyncio.selector_events",
    "asyncio.sslproto",
    "asyncio.staggered",
    "asyncio.streams",
    "asyncio.subprocess",
    "asyncio.taskgroups",
    "asyncio.tasks",
    "asyncio.threads",
    "asyncio.timeouts",
    "asyncio.transports",
    "asyncio.trsock",
    "base64",
    "bdb",
    "builtins",
    "bz2",
    "cProfile",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "colorsys",
    "compileall",
    "concurrent.futures",
    "concurrent.futures.process",
    "concurrent.futures.thread",
    "configparser",
    "contextlib",
    "copy",
    "copyreg",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "email.base64mime",
    "email.charset",
    "email.encoders",
    "email.errors",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.iterators",
    "email.message",
    "email.mime.application",
    "email.mime.audio",
    "email.mime.base",
    "email.mime.image",
    "email.mime.message",
    "email.mime.multipart",
    "email.mime.nonmultipart",
    "email.mime.text",
    "email.parser",
    "email.policy",
    "email.quoprimime",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "genericpath",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib",
    "importlib.abc",
    "importlib.machinery",
    "importlib.metadata",
    "importlib.readers",
    "importlib.resources",
    "importlib.resources.abc",
    "importlib.resources.readers",
    "importlib.resources.simple",
    "importlib.simple",
    "importlib.util",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "json.tool",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.config",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "modulefinder",
    "multiprocessing.connection",
    "multiprocessing.context",
    "multiprocessing.forkserver",
    "multiprocessing.heap",
    "multiprocessing.managers",
    "multiprocessing.pool",
    "multiprocessing.process",
    "multiprocessing.queues",
    "multiprocessing.reduction",
    "multiprocessing.resource_sharer",
    "multiprocessing.resource_tracker",
    "multiprocessing.shared_memory",
    "multiprocessing.sharedctypes",
    "multiprocessing.spawn",
    "multiprocessing.util",
    "netrc",
    "nturl2path",
    "numbers",
    "opcode",
    "operator",
    "optparse",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "pydoc",
    "pyexpat",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "site",
    "smtplib",
    "socketserver",
    "stat",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unittest",
    "unittest.async_case",
    "unittest.case",
    "unittest.loader",
    "unittest.main",
    "unittest.mock",
    "unittest.result",
    "unittest.runner",
    "unittest.signals",
    "unittest.suite",
    "unittest.util",
    "urllib.error",
    "urllib.parse",
    "urllib.request",
    "urllib.response",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "wsgiref",
    "wsgiref.handlers",
    "wsgiref.headers",
    "wsgiref.simple_server",
    "wsgiref.types",
    "wsgiref.util",
    "wsgiref.validate",
    "xml",
    "xml.dom",
    "xml.dom.NodeFilter",
    "xml.dom.domreg",
    "xml.dom.expatbuilder",
    "xml.dom.minicompat",
    "xml.dom.minidom",
    "xml.dom.pulldom",
    "xml.dom.xmlbuilder",
    "xml.etree.ElementTree",
    "xml.parsers",
    "xml.parsers.expat",
    "xml.sax",
    "xml.sax.expatreader",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xml.sax.xmlreader",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipapp",
    "zipfile",
    "zipimport",
    "zoneinfo",
)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_QUOTE = "(\"'`\u2018\u2019\u201c\u201d*"
_WORDLIKE = re.compile(rf"^[{_QUOTE}]*[A-Za-z][A-Za-z'\u2019-]*[.,;:!?)\]{_QUOTE}]*$")
_SENTENCE_START = re.compile(rf"^[{_QUOTE}]?[A-Za-z]")
_BULLET = re.compile(r"^([-*+\u2022]|\d+[.)]|[a-z][.)])[ \t]+")
_RULE = re.compile(r"^[-=~^*+#|_ ]{3,}$")
_SIGNATURE = re.compile(r"^[\w.]+\([^()]*\)[.:]?$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u2019\u201d]*$")
_NEXT_SENTENCE = re.compile(rf"^[{_QUOTE}]?[A-Z]")
_INITIAL = re.compile(r"^[(\"]?[A-Za-z]\.$")
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "No."})


class Doc(NamedTuple):
    """A docstring and the dotted name of the object it belongs to."""

    name: str
    text: str


def own_docstring(obj: object) -> str | None:
    """Return the cleaned docstring defined on ``obj`` itself, not inherited."""
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def is_documentable(obj: object) -> bool:
    """True for the kinds of object whose docstring is their own prose."""
    return (
        inspect.isclass(obj)
        or inspect.isroutine(obj)
        or isinstance(obj, (property, classmethod, staticmethod))
    )


def is_wanted(name: str) -> bool:
    """Skip dunder methods: their docstrings are mostly boilerplate."""
    return not (name.startswith("__") and name.endswith("__"))


def defined_in(obj: object, module_name: str) -> bool:
    """True if ``obj`` was defined in ``module_name`` (not re-exported)."""
    return getattr(obj, "__module__", None) == module_name


def belongs_to(member: object, cls: type) -> bool:
    """False for routines merely stored on ``cls`` (e.g. ``object.__new__``)."""
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    if not inspect.isroutine(member):
        return True
    qualname = getattr(member, "__qualname__", "")
    return qualname.startswith(f"{cls.__qualname__}.")


def class_docs(cls: type, prefix: str) -> Iterator[Doc]:
    """Yield the class docstring, then those of the members it defines."""
    doc = own_docstring(cls)
    if doc:
        yield Doc(prefix, doc)
    for name in sorted(vars(cls)):
        member = vars(cls)[name]
        if not is_wanted(name) or not is_documentable(member) or inspect.isclass(member):
            continue
        if not belongs_to(member, cls):
            continue
        doc = own_docstring(member)
        if doc:
            yield Doc(f"{prefix}.{name}", doc)


def module_docs(module_name: str) -> list[Doc]:
    """Docstrings of a module, its functions and classes, warnings silenced.

    Importing or touching some members (typing.io, typing.re) warns about
    deprecation; that is noise here, not a problem with the corpus.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(walk_module(importlib.import_module(module_name)))


def walk_module(module: ModuleType) -> Iterator[Doc]:
    """Yield the module docstring, then its own functions' and classes'."""
    module_name = module.__name__
    doc = own_docstring(module)
    prefix = f"stdlib:{module_name}"
    if doc:
        yield Doc(prefix, doc)
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not is_wanted(name) or not is_documentable(obj) or not defined_in(obj, module_name):
            continue
        if inspect.isclass(obj):
            yield from class_docs(obj, f"{prefix}.{name}")
        else:
            doc = own_docstring(obj)
            if doc:
                yield Doc(f"{prefix}.{name}", doc)


def topic_docs() -> Iterator[Doc]:
    """Yield the language-reference help topics that ``help()`` shows.

    ``pydoc_data.topics`` ships with the standard library: it is the plain-text
    rendering of the reference manual sections (statements, data model,
    built-in types) that pydoc prints for ``help("if")`` and friends.
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Doc(f"pydoc:{name}", topics[name])


def all_docs() -> Iterator[Doc]:
    """Every source document, in the fixed order that decides row order.

    Help topics come first: they hold the longest paragraphs, so a smaller
    --count still keeps them; the cut falls at the end of MODULES.
    """
    yield from topic_docs()
    for module_name in MODULES:
        yield from module_docs(module_name)


def split_paragraphs(doc: str) -> list[str]:
    """Split a cleaned docstring or help topic on blank lines."""
    return [p for p in _PARAGRAPH_BREAK.split(doc) if p.strip()]


def unwrap_block(paragraph: str) -> str | None:
    """Dedent a paragraph and strip one leading bullet marker.

    Returns the block's lines joined by newlines, or None when the block is
    not a plain run of wrapped prose: doctest or code (lines indented
    relative to the first), reST rules, tables, field lists, directives.
    """
    lines = textwrap.dedent(paragraph.strip("\n")).splitlines()
    bullet = _BULLET.match(lines[0])
    if bullet:
        width = len(bullet.group(0))
        rest = lines[1:]
        if any(line.strip() and not line.startswith(" " * width) for line in rest):
            return None
        lines = [lines[0][width:]] + [line[width:] for line in rest]
    for line in lines:
        stripped = line.strip()
        if line[:1].isspace() or _RULE.match(stripped) or _BULLET.match(stripped):
            return None
        if stripped.startswith((">>>", "...", ":", "|", "..", "$ ", "#")):
            return None
    return "\n".join(lines)


def normalise(block: str) -> str:
    """Collapse all runs of whitespace to single spaces."""
    return " ".join(block.split())


def is_prose(text: str) -> bool:
    """Word count in range, starts like a sentence, mostly alphabetic words."""
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not _SENTENCE_START.match(text):
        return False
    if "->" in text or "::" in text or ">>>" in text or _SIGNATURE.match(text):
        return False
    alpha = sum(1 for w in words if _WORDLIKE.match(w))
    return alpha / len(words) >= MIN_ALPHA_RATIO


def ends_sentence(word: str, next_word: str) -> bool:
    """True if a sentence ends after ``word`` (conservative on abbreviations)."""
    if word in _ABBREVIATIONS or word.endswith("..") or _INITIAL.match(word):
        return False
    return bool(_SENTENCE_END.search(word) and _NEXT_SENTENCE.match(next_word))


def split_sentences(text: str) -> list[str]:
    """Split normalised prose into sentences at '. X'-style boundaries."""
    words = text.split()
    sentences: list[str] = []
    start = 0
    for i in range(len(words) - 1):
        if ends_sentence(words[i], words[i + 1]):
            sentences.append(" ".join(words[start : i + 1]))
            start = i + 1
    sentences.append(" ".join(words[start:]))
    return sentences


def extract_texts(doc: Doc) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` for each prose paragraph of one document.

    A paragraph is ``<name>:<p>``; when it has several sentences, each prose
    sentence follows it as ``<name>:<p>.<s>``. Sentences overlap their
    paragraph on purpose: they give the corpus its short, query-like texts
    next to the long passages.
    """
    index = 0
    for paragraph in split_paragraphs(doc.text):
        block = unwrap_block(paragraph)
        if block is None:
            continue
        text = normalise(block)
        if not is_prose(text):
            continue
        yield f"{doc.name}:{index}", text
        sentences = split_sentences(text)
        if len(sentences) > 1:
            for number, sentence in enumerate(sentences):
                if is_prose(sentence):
                    yield f"{doc.name}:{index}.{number}", sentence
        index += 1


def collect(count: int) -> list[tuple[str, str]]:
    """Walk all sources in order and return the first ``count`` unique texts."""
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for doc in all_docs():
        for row_id, text in extract_texts(doc):
            if text in seen:
                continue
            seen.add(text)
            rows.append((row_id, text))
            if len(rows) == count:
                return rows
    raise SystemExit(f"only {len(rows)} texts found, fewer than --count {count}")


def write_parquet(rows: list[tuple[str, str]], out: Path) -> None:
    """Write rows as a zstd-compressed Parquet file with ``id``/``text``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"id": [r[0] for r in rows], "text": [r[1] for r in rows]},
        schema=pa.schema([("id", pa.string()), ("text", pa.string())]),
    )
    table = table.replace_schema_metadata(
        {
            "source": "CPython stdlib: pydoc_data.topics and module docstrings",
            "python": ".".join(map(str, sys.version_info[:3])),
            "builder": "scripts/build_sample_corpus.py",
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd", compression_level=19)


def print_stats(rows: list[tuple[str, str]], out: Path) -> None:
    """Print row count, total words and min/median/max words per text."""
    lengths = [len(text.split()) for _, text in rows]
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    print(f"rows: {len(rows):,}  total words: {sum(lengths):,}")
    print(
        f"words per text: min {min(lengths)}  median {statistics.median(lengths):g}"
        f"  max {max(lengths)}"
    )


def check_interpreter() -> None:
    """Refuse -OO (no docstrings); warn on a Python other than 3.11."""
    if sys.flags.optimize >= 2:
        raise SystemExit("docstrings are stripped under -OO; run without it")
    if sys.version_info[:2] != EXPECTED_PYTHON:
        print(
            f"warning: built with Python {sys.version_info[0]}.{sys.version_info[1]};"
            " the committed corpus was built with 3.11 and texts will differ",
            file=sys.stderr,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Build the stdlib sample corpus.")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="rows to keep")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output Parquet path")
    args = parser.parse_args(argv)
    if args.count < MIN_COUNT:
        parser.error(f"--count must be at least {MIN_COUNT}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the corpus and write it."""
    check_interpreter()
    args = parse_args(argv)
    rows = collect(args.count)
    write_parquet(rows, args.out)
    print_stats(rows, args.out)


if __name__ == "__main__":
    main()
