"""Data: load a corpus, split it across sites, tokenize it and pack it into training rows."""

from fedsky.data.corpus import (
    Corpus,
    Document,
    fallback_documents,
    load_corpus,
    load_documents,
    resolve_data_path,
)
from fedsky.data.instruct import encode_example
from fedsky.data.partition import SCHEMES, partition
from fedsky.data.sequences import (
    IGNORE,
    Batch,
    Rows,
    concat,
    inputs_and_labels,
    pack_examples,
    target_count,
    to_sequences,
)
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
    "IGNORE",
    "SCHEMES",
    "Batch",
    "Corpus",
    "Document",
    "Rows",
    "as_hf_tokenizer",
    "concat",
    "default_cache_dir",
    "encode_example",
    "encode_texts",
    "eos_id",
    "fallback_documents",
    "inputs_and_labels",
    "load_corpus",
    "load_documents",
    "load_pretrained_tokenizer",
    "pack_examples",
    "partition",
    "resolve_data_path",
    "target_count",
    "to_sequences",
    "train_bpe",
]
