"""Data pipeline: offline corpus, tokenizer, packing, node shards, batch streams.

Flower-free so it can be used (and tested) by the coordinator, the nodes and
the simulator alike.
"""

from .corpus import embedded_documents
from .pipeline import (
    PARTITIONS,
    BatchStream,
    DataConfig,
    blocks_cache_key,
    check_source,
    load_documents,
    load_tokenizer,
    node_shard,
    pack,
    prepare_blocks,
    split_documents,
)
from .sources import DataSourceError, DataSourceWarning
from .tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    bytes_per_token,
    ensure_pad_token,
    load_or_train_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_json,
    tokenizer_to_json,
    train_bpe_tokenizer,
)

__all__ = [
    "PARTITIONS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BatchStream",
    "bytes_per_token",
    "DataConfig",
    "DataSourceError",
    "DataSourceWarning",
    "blocks_cache_key",
    "check_source",
    "embedded_documents",
    "ensure_pad_token",
    "load_documents",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "node_shard",
    "pack",
    "prepare_blocks",
    "split_documents",
    "tokenizer_fingerprint",
    "tokenizer_from_json",
    "tokenizer_to_json",
    "train_bpe_tokenizer",
]
