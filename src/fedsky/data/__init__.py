"""Data: load a corpus, split it across sites, tokenize it and pack it into training rows."""

from fedsky.data.corpus import (
    Corpus,
    Document,
    fallback_documents,
    load_corpus,
    load_documents,
    resolve_data_path,
)
from fedsky.data.partition import SCHEMES, partition
from fedsky.data.sequences import to_sequences
from fedsky.data.tokenizer import (
    EOS,
    as_hf_tokenizer,
    default_cache_dir,
    encode_texts,
    eos_id,
    load_pretrained_tokenizer,
    train_bpe,
)

__all__ = [
    "EOS",
    "SCHEMES",
    "Corpus",
    "Document",
    "as_hf_tokenizer",
    "default_cache_dir",
    "encode_texts",
    "eos_id",
    "fallback_documents",
    "load_corpus",
    "load_documents",
    "load_pretrained_tokenizer",
    "partition",
    "resolve_data_path",
    "to_sequences",
    "train_bpe",
]
