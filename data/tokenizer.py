"""Tokenizer training, shipping and loading.

A federation must agree on one tokenizer byte for byte, so the coordinator
either trains a small byte-level BPE on the shared corpus or loads a named
one, and can ship it to nodes as a JSON string instead of relying on a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# BPE training cost per merge grows with the length of the word it touches, so
# one long whitespace-free run (CJK text, base64, minified code) made training
# super-quadratic (an 80k-character CJK line: 60 s; 1 MB: did not finish) and
# encoding it superlinear. The pre-tokenizer therefore cuts such runs into
# pieces of this many characters, the same way in training and in encoding;
# it only forgoes tokens longer than this, and ordinary text is unaffected.
MAX_RUN_CHARS = 256


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_RUN_CHARS}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>``/``<|pad|>``.

    Whitespace-free runs longer than :data:`MAX_RUN_CHARS` are split into
    pieces of that length before byte-level pre-tokenization, which bounds
    training and encoding cost on pathological lines.
    """
    tok = Tokenizer(models.BPE())
    # Byte level means no unknown tokens: any UTF-8 input is representable.
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})


def _wrap(tok: Tokenizer, special: dict[str, str | None]) -> PreTrainedTokenizerFast:
    kwargs = {k: v for k, v in special.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tokenizer_to_json(tok: PreTrainedTokenizerFast) -> str:
    """Serialize a fast tokenizer (model + special-token roles) to one string."""
    special = {k: getattr(tok, k, None) for k in _SPECIAL_KEYS}
    payload = {"tokenizer": tok.backend_tokenizer.to_str(), "special_tokens": special}
    return json.dumps(payload, sort_keys=True)


def tokenizer_from_json(s: str) -> PreTrainedTokenizerFast:
    """Inverse of :func:`tokenizer_to_json`."""
    payload = json.loads(s)
    return _wrap(Tokenizer.from_str(payload["tokenizer"]), payload["special_tokens"])


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Short stable hash of a tokenizer, for cache keys and consistency checks."""
    return hashlib.sha256(tokenizer_to_json(tok).encode()).hexdigest()[:16]


def _texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        # Length prefix so ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def ensure_pad_token(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give ``tok`` a pad token (eos if it has one, else a new ``<|pad|>``)."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def load_or_train_tokenizer(
    spec: str,
    vocab_size: int,
    train_texts_fn: Callable[[], Iterable[str]],
    cache_dir: Path,
) -> PreTrainedTokenizerFast:
    """Return the tokenizer named by ``spec``.

    ``"bpe"`` trains on ``train_texts_fn()`` (cached under ``cache_dir`` by
    vocab size and a hash of the texts); anything else is a hub name or a
    local directory passed to ``AutoTokenizer.from_pretrained``.
    """
    if spec == "bpe":
        texts = list(train_texts_fn())
        out = Path(cache_dir) / f"tokenizer-bpe-{vocab_size}-{_texts_hash(texts)}"
        if (out / "tokenizer.json").exists():
            return ensure_pad_token(AutoTokenizer.from_pretrained(str(out)))
        tok = train_bpe_tokenizer(texts, vocab_size)
        # Save to a temp dir and rename so a concurrent reader never sees a
        # half-written tokenizer directory.
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return tok
    return ensure_pad_token(_load_pretrained(spec))


def _load_pretrained(spec: str) -> PreTrainedTokenizerFast:
    if Path(spec).expanduser().exists():
        return AutoTokenizer.from_pretrained(str(Path(spec).expanduser()))
    try:
        # Local cache first: avoids a network round trip (or hang) offline.
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError(
            f"Tokenizer {spec!r} is neither a local directory nor in the Hugging Face "
            "cache, and HF_HUB_OFFLINE=1; use tokenizer='bpe' or a local path."
        )
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise OSError(
            f"Could not load tokenizer {spec!r} (not a local directory, not cached, and "
            f"the hub is unreachable or has no such repo); use tokenizer='bpe' or a "
            f"local path. Cause: {type(e).__name__}: {e}"
        ) from e


def bytes_per_token(tok: PreTrainedTokenizerFast, rows: list[list[int]]) -> float:
    """UTF-8 bytes of text per token over packed token `rows` (special tokens count as tokens of no
    text): the factor that turns a loss per token into bits per byte, loss / ln 2 / this."""
    tokens = sum(len(r) for r in rows)
    if not tokens:
        raise ValueError("no tokens to measure")
    return sum(len(tok.decode(r, skip_special_tokens=True).encode("utf-8")) for r in rows) / tokens
