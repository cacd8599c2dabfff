"""Offline English corpus built from what every CPython install ships.

The machines that run this framework may have no network and no dataset hub,
yet every one of them has the standard library: its reference prose
(``pydoc_data.topics``) plus the docstrings and comment blocks in its ``.py``
sources give about two megabytes of real English, identical on machines with the same Python version.
"""

from __future__ import annotations

import ast
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


def _collect() -> list[str]:
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
    seen: set[str] = set()
    out: list[str] = []
    for d in docs:
        if len(d) >= MIN_DOC_CHARS and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def embedded_documents(cache_dir: Path | None = None) -> list[str]:
    """Return the stdlib-derived English corpus (deterministic, deduplicated).

    With ``cache_dir`` the result is stored as JSON keyed by the Python
    version and stdlib path, so later calls skip parsing.
    """
    if cache_dir is None:
        return _collect()
    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{MIN_DOC_CHARS}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"embedded-corpus-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # corrupt cache: rebuild below
    docs = _collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    os.replace(tmp, path)
    return docs
