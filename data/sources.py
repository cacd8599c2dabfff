"""Reading local data files without letting one bad file or byte sink the corpus.

Every problem is reported with the file (and line, where there is one). A file
that cannot be used at all is skipped with a warning or is an error
(``on_bad_file``); undecodable UTF-8 bytes are replaced by U+FFFD with a
warning or make the file bad (``decode_errors``); malformed JSON lines follow
``on_bad_file`` line by line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
ON_BAD_FILE = ("skip", "error")
DECODE_ERRORS = ("replace", "strict")
_HEAD_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
_MAX_LISTED = 5  # problems quoted in one message; the rest are counted


class DataSourceError(ValueError):
    """The data source cannot be used; the message names the file (and line)."""


class DataSourceWarning(UserWarning):
    """Something in the data source was skipped or repaired; names the file."""


class _BadFile(Exception):
    """This file (or, under on_bad_file=error, one of its lines) cannot be used."""


def file_order(path: Path) -> int:
    """Text files, then JSON, then Parquet: the order documents are concatenated in."""
    suffix = path.suffix.lower()
    for rank, group in enumerate((TEXT_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES)):
        if suffix in group:
            return rank
    raise ValueError(f"unsupported data file suffix {suffix!r}")


def quick_problem(path: Path) -> str | None:
    """Why ``path`` is certainly unusable, from its size and first bytes; None if it may be fine."""
    try:
        if path.stat().st_size == 0:
            return "is empty"
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return None if head.startswith(b"PAR1") else "is not a Parquet file (no PAR1 header)"
    return _binary_problem(head)


def _binary_problem(head: bytes) -> str | None:
    nul = head.find(b"\0")
    if nul < 0:
        return None
    return f"looks binary (NUL byte at offset {nul}); expected UTF-8 text"


def read_files(
    files: Iterable[Path], text_field: str, on_bad_file: str, decode_errors: str, source: str
) -> tuple[list[str], list[str]]:
    """Documents of all ``files`` in order, and the warnings met on the way.

    Raises :class:`DataSourceError` for a bad file under ``on_bad_file="error"``
    and when no file yields any document.
    """
    docs: list[str] = []
    notes: list[str] = []
    skipped: list[str] = []
    for path in files:
        try:
            got, file_notes = _read_file(path, text_field, on_bad_file, decode_errors)
        except _BadFile as e:
            if on_bad_file == "error":
                raise DataSourceError(f"data file {str(path)!r} {e} (data.on_bad_file=skip skips bad files)") from None
            skipped.append(f"{str(path)!r} {e}")
            notes.append(f"data file {str(path)!r} skipped: {e}")
            continue
        docs.extend(got)
        notes.extend(f"data file {str(path)!r}: {n}" for n in file_notes)
    if not docs:
        why = "; ".join(skipped[:_MAX_LISTED])
        more = f" (and {len(skipped) - _MAX_LISTED} more)" if len(skipped) > _MAX_LISTED else ""
        raise DataSourceError(f"data.source {source!r} has no usable documents" + (f": {why}{more}" if why else ""))
    return docs, notes


def _read_file(path: Path, text_field: str, on_bad_file: str, decode_errors: str) -> tuple[list[str], list[str]]:
    problem = quick_problem(path)
    if problem:
        raise _BadFile(problem)
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            return _parquet_docs(path, text_field), []
        if suffix == ".jsonl":
            return _jsonl_docs(path, text_field, on_bad_file, decode_errors)
        text, notes = _decode(path.read_bytes(), decode_errors)
        if suffix == ".json":
            return _json_docs(text, text_field, on_bad_file, notes)
        docs = _paragraphs(text)
    except OSError as e:
        raise _BadFile(f"cannot be read ({e.strerror or e})") from None
    if not docs:
        raise _BadFile("contains no text")
    return docs, notes


def _decode(raw: bytes, decode_errors: str, line_offset: int = 0) -> tuple[str, list[str]]:
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = line_offset + raw.count(b"\n", 0, e.start) + 1
        where = f"has invalid UTF-8 at line {line} (byte {raw[e.start]:#04x})"
        if decode_errors == "strict":
            raise _BadFile(f"{where}; data.decode_errors=replace replaces such bytes") from None
        return raw.decode("utf-8", errors="replace"), [f"{where}: undecodable bytes replaced with U+FFFD"]


def _paragraphs(text: str) -> list[str]:
    # One document per blank-line separated paragraph, newlines normalised as
    # text-mode reading would (what the `datasets` text builder did before).
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _jsonl_docs(path: Path, text_field: str, on_bad_file: str, decode_errors: str) -> tuple[list[str], list[str]]:
    bad_bytes: list[str] = []
    lines: list[tuple[int, str]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text, notes = _decode(raw.rstrip(b"\r\n"), decode_errors, lineno - 1)
            bad_bytes.extend(notes)
            lines.append((lineno, text))
    docs, notes = _records_docs(_parse_lines(lines), text_field, on_bad_file)
    if bad_bytes:
        extra = f" (and on {len(bad_bytes) - 1} more lines)" if len(bad_bytes) > 1 else ""
        notes.insert(0, bad_bytes[0] + extra)
    return docs, notes


def _parse_lines(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    for lineno, text in lines:
        if not text.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(text)
        except json.JSONDecodeError as e:
            yield f"line {lineno}", _Malformed(f"invalid JSON ({e.msg}, column {e.colno})")


class _Malformed:
    def __init__(self, why: str) -> None:
        self.why = why


def _json_docs(text: str, text_field: str, on_bad_file: str, notes: list[str]) -> tuple[list[str], list[str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise _BadFile(f"is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
        # Several top-level values: the file is JSON Lines under a .json name.
        lines = enumerate(text.split("\n"), 1)
        docs, more = _records_docs(_parse_lines(lines), text_field, on_bad_file)
        return docs, notes + more
    items = value if isinstance(value, list) else [value]
    docs, more = _records_docs(((f"item {i}", v) for i, v in enumerate(items)), text_field, on_bad_file)
    return docs, notes + more


def _records_docs(records: Iterable[tuple[str, Any]], text_field: str, on_bad_file: str) -> tuple[list[str], list[str]]:
    docs: list[str] = []
    bad: list[str] = []
    keys: set[str] = set()
    has_field = False
    for where, rec in records:
        if isinstance(rec, _Malformed) or not isinstance(rec, dict):
            why = rec.why if isinstance(rec, _Malformed) else (f"expected a JSON object, got {type(rec).__name__}")
            if on_bad_file == "error":
                raise _BadFile(f"{where}: {why}")
            bad.append(f"{where}: {why}")
            continue
        keys.update(rec)
        if text_field in rec:
            has_field = True
            value = rec[text_field]
            # Null or non-string values are rows without text, not errors.
            if isinstance(value, str) and value.strip():
                docs.append(value.strip())
    if not has_field and keys:
        raise _BadFile(
            f"has no record with the field {text_field!r} (data.text_field); fields seen: {sorted(keys)[:20]}"
        )
    if not docs:
        raise _BadFile(f"has no usable records ({bad[0]})" if bad else "contains no text")
    notes = []
    if bad:
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        notes.append(f"skipped {len(bad)} malformed record(s): {'; '.join(bad[:_MAX_LISTED])}{more}")
    return docs, notes


def _parquet_docs(path: Path, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise _BadFile(f"has no column {text_field!r} (data.text_field); columns are {names}")
        column = pf.read(columns=[text_field]).column(text_field).to_pylist()
    except (pa.ArrowException, ValueError) as e:
        raise _BadFile(f"is not a readable Parquet file ({e})") from None
    docs = [t.strip() for t in column if isinstance(t, str) and t.strip()]
    if not docs:
        raise _BadFile("contains no text")
    return docs
