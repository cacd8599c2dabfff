"""From a data source to per-node token blocks and resumable batch streams.

Every step is a pure function of (config, tokenizer, seed), so the
coordinator and every node derive the same train/held-out split and the same
shards without exchanging any data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .corpus import embedded_documents
from .sources import (
    DECODE_ERRORS,
    ON_BAD_FILE,
    SUFFIXES,
    DataSourceError,
    DataSourceWarning,
    file_order,
    quick_problem,
    read_files,
)
from .tokenizer import load_or_train_tokenizer, tokenizer_fingerprint

PARTITIONS = ("iid", "contiguous")
# Bump when the on-disk block layout, packing or document extraction changes
# (2: local files read by data.sources instead of `datasets` builders).
_CACHE_FORMAT = 2


@dataclass
class DataConfig:
    """What to train on and how to cut it up.

    ``source``: ``"embedded"`` (stdlib prose, always offline), a local file or
    directory of .txt/.md/.jsonl/.json/.parquet files, or
    ``"hf:<name>[:<config>]"`` for a hub dataset (needs network or HF cache).
    ``on_bad_file``: ``"skip"`` (warn and go on without an unusable file or a
    malformed JSON line) or ``"error"``. ``decode_errors``: ``"replace"``
    (undecodable UTF-8 bytes become U+FFFD, with a warning) or ``"strict"``
    (such a file is a bad file).
    """

    source: str = "embedded"
    text_field: str = "text"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 128
    heldout_fraction: float = 0.05
    partition: str = "iid"
    seed: int = 0
    on_bad_file: str = "skip"
    decode_errors: str = "replace"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. a run config section); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown data config key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**dict(d))

    def validate(self) -> DataConfig:
        """Raise ``ValueError`` naming the offending key; return self if fine.

        Values only, no disk: nodes repeat this on the spec they receive, and
        a path in it names the coordinator's disk. :func:`check_source` checks
        the files themselves.
        """
        for key in ("source", "text_field", "tokenizer"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"data.{key} must be a non-empty string, got {value!r}")
        for key, choices in (
            ("partition", PARTITIONS),
            ("on_bad_file", ON_BAD_FILE),
            ("decode_errors", DECODE_ERRORS),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"data.{key} must be one of {list(choices)}, got {getattr(self, key)!r}")
        for key, value in (("data.seq_len", self.seq_len), ("data.vocab_size", self.vocab_size), ("seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len must be at least 8, got {self.seq_len}")
        frac = self.heldout_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 0.5:
            raise ValueError(f"data.heldout_fraction must be in (0, 0.5], got {frac!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            # 256 byte symbols + 2 special tokens leave no room for merges.
            raise ValueError(f"data.vocab_size must be at least 260 for tokenizer 'bpe', got {self.vocab_size}")
        if self.source.startswith("hf:") and not self.source[3:].split(":")[0]:
            raise ValueError("data.source 'hf:' needs a dataset name, e.g. 'hf:user/name'")
        return self

    def is_local(self) -> bool:
        """Whether ``source`` is a path (not the embedded corpus or a hub dataset)."""
        return self.source != "embedded" and not self.source.startswith("hf:")


def _local_files(path: Path) -> list[Path]:
    """The files of a local source, after cheap checks (a single file's first bytes)."""
    if not path.exists():
        raise DataSourceError(f"data.source path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataSourceError(
                f"data.source file {str(path)!r} has unsupported extension "
                f"{path.suffix!r}; supported: {sorted(SUFFIXES)}"
            )
        problem = quick_problem(path)
        if problem:
            raise DataSourceError(f"data.source file {str(path)!r} {problem}")
        return [path]
    if not path.is_dir():
        raise DataSourceError(f"data.source {str(path)!r} is neither a regular file nor a directory")
    files = _data_files(path)
    if not files:
        raise DataSourceError(
            f"data.source directory {str(path)!r} contains no files with a supported extension {sorted(SUFFIXES)}"
        )
    return files


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
        key=lambda p: (file_order(p), p.relative_to(path).as_posix()),
    )


def _read_local(cfg: DataConfig) -> tuple[list[str], list[str]]:
    return read_files(
        _local_files(Path(cfg.source).expanduser()),
        cfg.text_field,
        cfg.on_bad_file,
        cfg.decode_errors,
        cfg.source,
    )


def check_source(cfg: DataConfig) -> list[str]:
    """Read the whole data source once, before any run starts; return its warnings.

    Raises :class:`DataSourceError` (a ``ValueError``) naming the file, and
    line where there is one, for what would make loading fail: a missing
    path, an unusable file under ``on_bad_file="error"``, undecodable bytes
    under ``decode_errors="strict"`` with ``on_bad_file="error"``, or no
    usable document at all. Each warning names the file that was skipped or
    repaired. The embedded corpus and hub datasets are not read (nothing to
    check offline), only validated. Costs one read of every file (no tokenizing).
    """
    cfg.validate()
    if not cfg.is_local():
        return []
    return _read_local(cfg)[1]


def load_documents(cfg: DataConfig, cache_dir: Path | None = None) -> list[str]:
    """Load the source as a list of non-empty documents, in a stable order.

    ``.txt``/``.md`` files are split into blank-line separated paragraphs:
    a single large text file then still yields
    enough documents for a held-out split, at the cost of an eos token between
    paragraphs. JSON/JSONL/Parquet rows are documents (column ``text_field``).
    Bad files, lines and bytes are handled as ``cfg.on_bad_file`` and
    ``cfg.decode_errors`` say, each with a :class:`DataSourceWarning` naming
    the file; :class:`DataSourceError` when nothing usable remains.
    ``cache_dir`` (optional) holds the embedded corpus and HF dataset caches.
    """
    cfg.validate()
    hf_cache = str(Path(cache_dir) / "hf-datasets") if cache_dir is not None else None
    if cfg.source == "embedded":
        return embedded_documents(cache_dir)
    if cfg.source.startswith("hf:"):
        return _load_hub(cfg, hf_cache)

    docs, notes = _read_local(cfg)
    for note in notes:
        warnings.warn(note, DataSourceWarning, stacklevel=2)
    return docs


def _column(ds: Any, field: str, source: str) -> list[str]:
    if field not in ds.column_names:
        raise ValueError(f"Data source {source!r} has no column {field!r} (text_field); columns are {ds.column_names}.")
    return [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]


def _load_hub(cfg: DataConfig, hf_cache: str | None) -> list[str]:
    import datasets

    name, _, config = cfg.source[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", cache_dir=hf_cache)
    except Exception as e:
        raise OSError(
            f"Could not load hub dataset {name!r} (offline or unknown?); use "
            f"source='embedded' or a local path. Cause: {type(e).__name__}: {e}"
        ) from e
    return _column(ds, cfg.text_field, cfg.source)


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split into (train, heldout) by a seeded hash of each document's text.

    The decision depends only on the text and seed, so it is identical on
    every machine and for any input order (duplicates land on the same side).
    Both sides keep the input order. Needs at least 2 distinct documents.
    """
    if not 0 < heldout_fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5], got {heldout_fraction}.")
    scores = [_unit_hash(d, seed) for d in docs]
    if len(set(scores)) < 2:
        raise ValueError(f"Need at least 2 distinct documents to split, got {len(set(docs))}.")
    held = [s < heldout_fraction for s in scores]
    if not any(held):
        # Tiny corpora: force the lowest-scoring text out, so evaluation exists.
        lo = min(scores)
        held = [s == lo for s in scores]
    elif all(held):
        hi = max(scores)
        held = [s != hi for s in scores]
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    return train, heldout


def pack(docs: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Tokenize, append eos to each doc, concatenate, cut into ``[n, seq_len+1]``.

    Row ``b`` gives inputs ``b[:-1]`` and labels ``b[1:]``; the tail that does
    not fill a block is dropped. int64.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("Tokenizer has no eos token; it is needed to separate documents.")
    width = seq_len + 1
    if not docs:
        return torch.empty(0, width, dtype=torch.int64)
    # The Rust tokenizer's batch encode runs in parallel and skips the Python
    # BatchEncoding layer; the "fast" variant also skips offsets (~2x faster).
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(docs, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(docs))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for e, n in zip(encodings, lengths):
        flat[pos : pos + n - 1] = e.ids
        flat[pos + n - 1] = eos
        pos += n
    n_blocks = len(flat) // width
    return torch.from_numpy(flat[: n_blocks * width].reshape(n_blocks, width).copy())


def node_shard(blocks: torch.Tensor, partition_id: int, num_partitions: int, mode: str, seed: int) -> torch.Tensor:
    """Return partition ``partition_id`` of ``num_partitions`` equal, disjoint shards.

    ``"iid"`` deals from a seeded permutation; ``"contiguous"`` takes
    consecutive blocks of the (document-ordered) stream, a simple non-IID
    split. The last ``len(blocks) % num_partitions`` blocks go unused.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} out of range for {num_partitions} partitions.")
    per = len(blocks) // num_partitions
    if per == 0:
        raise ValueError(
            f"Only {len(blocks)} blocks for {num_partitions} partitions: shard would be "
            "empty; use more data, a shorter seq_len or fewer partitions."
        )
    lo, hi = partition_id * per, (partition_id + 1) * per
    if mode == "contiguous":
        return blocks[lo:hi].clone()
    if mode == "iid":
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
        return blocks[perm[lo:hi]]
    raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {mode!r}.")


def _derived_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit in int64


class BatchStream(Iterator[torch.Tensor]):
    """Infinite, resumable stream of ``[batch_size, seq_len+1]`` batches.

    Each epoch visits the shard in a fresh order seeded by (seed, epoch);
    the incomplete last batch of an epoch is dropped so shapes never change.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if len(blocks) < batch_size:
            raise ValueError(f"Shard has {len(blocks)} blocks, fewer than batch_size={batch_size}.")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(blocks) // batch_size
        self.epoch = 0
        self.index = 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch))
            self._perm = torch.randperm(len(self.blocks), generator=gen)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        idx = self._order()[start : start + self.batch_size]
        self.index += 1
        return self.blocks[idx]

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: ``{"epoch", "index"}`` (batches done this epoch)."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume so the next batch is the one that followed when ``state`` was taken."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"Invalid BatchStream state {dict(state)} for {self.batches_per_epoch} batches per epoch.")
        self.epoch, self.index = epoch, index


def _source_fingerprint(cfg: DataConfig) -> Any:
    if cfg.source == "embedded":
        # The corpus is derived from the installed stdlib, i.e. the Python build.
        return ["embedded", sys.version]
    if cfg.source.startswith("hf:"):
        return cfg.source
    root = Path(cfg.source).expanduser().resolve()
    # Size and mtime catch edited files without hashing all their bytes.
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _data_files(root)]


def blocks_cache_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> str:
    """Hash of everything that determines the output of :func:`prepare_blocks`."""
    # vocab_size and partition are absent on purpose: the tokenizer fingerprint
    # covers the former and sharding happens after caching.
    key = {
        "format": _CACHE_FORMAT,
        "source": _source_fingerprint(cfg),
        "text_field": cfg.text_field,
        "on_bad_file": cfg.on_bad_file,
        "decode_errors": cfg.decode_errors,
        "seq_len": cfg.seq_len,
        "heldout_fraction": cfg.heldout_fraction,
        "seed": cfg.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prepare_blocks(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, cache_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train_blocks, heldout_blocks), each ``[n, seq_len+1]`` int64, cached."""
    cfg.validate()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"blocks-{blocks_cache_key(cfg, tokenizer)}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            return saved["train"].long(), saved["heldout"].long()
        except Exception:
            pass  # unreadable cache (e.g. truncated by a crash): rebuild it
    train_docs, held_docs = split_documents(load_documents(cfg, cache_dir), cfg.heldout_fraction, cfg.seed)
    train = pack(train_docs, tokenizer, cfg.seq_len)
    heldout = pack(held_docs, tokenizer, cfg.seq_len)
    if len(train) == 0 or len(heldout) == 0:
        raise ValueError(
            f"Too little text for seq_len={cfg.seq_len}: {len(train)} train and "
            f"{len(heldout)} held-out blocks; use more data, a shorter seq_len or a "
            "larger heldout_fraction."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    # int32 halves the file; ids always fit (vocabularies are far below 2**31).
    torch.save({"train": train.int(), "heldout": heldout.int()}, tmp)
    os.replace(tmp, path)  # atomic: readers see the old state or the full file
    return train, heldout


def load_tokenizer(cfg: DataConfig, cache_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer for ``cfg``; a "bpe" one is trained on the train split only."""
    cfg.validate()

    def train_texts() -> list[str]:
        docs = load_documents(cfg, cache_dir)
        return split_documents(docs, cfg.heldout_fraction, cfg.seed)[0]

    return load_or_train_tokenizer(cfg.tokenizer, cfg.vocab_size, train_texts, cache_dir)
