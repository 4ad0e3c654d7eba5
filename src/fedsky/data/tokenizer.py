"""The job: give every site the same tokenizer, trained once on public text or loaded from disk.

A byte-level BPE (the GPT-2 scheme) never meets an unknown character, so a tokenizer trained on
public text still encodes any site's private text. Training is cached by a hash of its inputs:
a coordinator and its workers (or a rerun) get the identical file without retraining.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fedsky.errors import FedskyError

if TYPE_CHECKING:  # transformers takes seconds to import; only two functions need it
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # id 0; also the pad token: padding is masked out of the loss anyway
# Bump when the training recipe changes, so stale cache files are not reused.
_FORMAT_VERSION = "fedsky-bpe-1"

AnyTokenizer: TypeAlias = "Tokenizer | PreTrainedTokenizerFast"


def default_cache_dir() -> Path:
    """`$FEDSKY_CACHE`, else `~/.cache/fedsky`."""
    env = os.environ.get("FEDSKY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsky"


def _cache_key(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{_FORMAT_VERSION}\0{vocab_size}\0{len(texts)}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(data)
    return h.hexdigest()


def train_bpe(texts: list[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Train (or load from cache) a byte-level BPE with `<|endoftext|>` at id 0.

    Args:
        texts: Training text, e.g. the public eval split's documents.
        vocab_size: Target vocabulary size, including the 256 byte symbols and EOS.
        cache_dir: Where `bpe-<sha256>.json` is kept; created if needed.

    Returns:
        The tokenizer; the same inputs always give the same vocabulary and merges.
    """
    if not any(t.strip() for t in texts):
        raise FedskyError("no text to train the tokenizer on")
    path = Path(cache_dir) / f"bpe-{_cache_key(texts, vocab_size)}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    # Write then rename, so a concurrent reader (another site process) never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bpe-", suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tok


def load_pretrained_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a transformers tokenizer from a local directory (or the Hub by `org/name`, online)."""
    from transformers import AutoTokenizer

    from fedsky.model import resolve_pretrained

    source, local = resolve_pretrained(path, "tokenizer.pretrained")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise FedskyError(
            f"tokenizer.pretrained: cannot load a tokenizer from {path}: {err}"
        ) from None


def as_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained BPE for transformers, so it can be `save_pretrained` next to the model."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS
    )


def encode_texts(tok: AnyTokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, without special tokens, for either kind of tokenizer."""
    if isinstance(tok, Tokenizer):
        return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]
    # verbose=False: whole documents exceed model_max_length; they are cut into rows later.
    return [list(ids) for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def eos_id(tok: AnyTokenizer) -> int:
    """The id that separates documents; a tokenizer without one cannot be used."""
    found = tok.token_to_id(EOS) if isinstance(tok, Tokenizer) else tok.eos_token_id
    if found is None:
        raise FedskyError("the tokenizer has no end-of-text token; set one (eos_token) and retry")
    return int(found)
