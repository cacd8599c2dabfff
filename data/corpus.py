"""Offline English corpus built from what every CPython install ships.

The machines that run this framework may have no network and no dataset hub,
yet every one of them has the standard library: its reference prose
(``pydoc_data.topics``) plus the docstrings and comment blocks in its ``.py``
sources give about two megabytes of real English, identical on machines with the same Python version.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

# Directories under the stdlib that are tests, third-party packages or tooling
# with little prose; they would add noise and make the corpus depend on what
# happens to be installed in site-packages.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "__pycache__",
        "ensurepip",
        "turtledemo",
        "venv",
    }
)
MIN_DOC_CHARS = 200


def _stdlib_sources(root: Path) -> list[Path]:
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into skipped trees.
        # "config-*" holds build files; "test*" catches test_*/tests variants.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "test"))]
        paths.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    # Sorted by path relative to the root so the order is machine independent.
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        # Old modules trigger SyntaxWarning (invalid escapes); irrelevant here.
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _comment_blocks(source: str) -> list[str]:
    # Runs of full-line comments are mostly explanatory prose ("why" notes),
    # which adds ~20% more natural English on top of the docstrings.
    blocks, cur = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            cur.append(s.lstrip("#").strip())
        elif cur:
            blocks.append("\n".join(cur).strip())
            cur = []
    return blocks


@functools.cache  # once per process: a coordinator and its in-process nodes would each parse ~1,100 files
def _collect() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources(root):
        try:
            source = path.read_text(encoding="utf-8")
            docs.extend(_docstrings(source))
            docs.extend(_comment_blocks(source))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a broken or non-UTF-8 file just contributes nothing
    return tuple(dict.fromkeys(d for d in docs if len(d) >= MIN_DOC_CHARS))  # first occurrences, in order


def machine_cache_dir() -> Path:
    """Where every run on this machine finds the corpus once one has built it: $SPES_CACHE_DIR, else
    $XDG_CACHE_HOME/spes-flower, else ~/.cache/spes-flower."""
    if os.environ.get("SPES_CACHE_DIR"):
        return Path(os.environ["SPES_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spes-flower"


def _cache_name() -> str:
    # This file's own bytes are part of the key: a changed rule never reads a corpus built by the old one.
    ident = f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{MIN_DOC_CHARS}|".encode() + Path(__file__).read_bytes()
    return f"embedded-corpus-{hashlib.sha256(ident).hexdigest()[:16]}.json"


def _read(path: Path) -> list[str] | None:
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or corrupt: built again
    return docs if isinstance(docs, list) and all(isinstance(d, str) for d in docs) else None


def _write(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a process reading it at the same time sees the old file or the new


def embedded_documents(cache_dir: Path | None = None) -> list[str]:
    """Return the stdlib-derived English corpus (deterministic, deduplicated).

    With ``cache_dir`` the result is stored there as JSON, and in `machine_cache_dir()` (where it can be
    written), keyed by the Python version, the stdlib path and this module's code, so later calls, in
    any process of the machine, skip parsing (~1,100 files, seconds).
    """
    if cache_dir is None:
        return list(_collect())
    name = _cache_name()
    path, shared = Path(cache_dir) / name, machine_cache_dir() / name
    docs = _read(path)
    if docs is None:
        docs = _read(shared)
        if docs is None:
            docs = list(_collect())
            with contextlib.suppress(OSError):  # a read-only home only costs the next run the parsing
                _write(shared, docs)
        _write(path, docs)
    return docs
