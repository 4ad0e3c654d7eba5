"""From a job's data config to tensors: the tokenizer, each site's sequences, the eval set.

The coordinator and every site call these same functions, so a site in another process (or
another cloud) derives exactly the data the simulation would give it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedsky.canaries import site_training
from fedsky.config import JobConfig
from fedsky.data import (
    Batch,
    Corpus,
    Document,
    default_cache_dir,
    encode_example,
    encode_texts,
    eos_id,
    load_corpus,
    load_documents,
    load_pretrained_tokenizer,
    pack_examples,
    partition,
    to_sequences,
    train_bpe,
)
from fedsky.errors import FedskyError

log = logging.getLogger("fedsky.data")

Tokenizer = Any  # a tokenizers.Tokenizer or a transformers tokenizer


def pretrained_tokenizer(job: JobConfig) -> str | None:
    """Where the job's pretrained tokenizer lives: its own setting, else the pretrained model's
    (a pretrained model needs its own vocabulary); None: train a BPE."""
    return job.tokenizer.pretrained or job.model.pretrained


def job_tokenizer(job: JobConfig, job_dir: Path | None, corpus: Corpus) -> Tokenizer:
    """A pretrained tokenizer from a directory, or a BPE trained on public text (cached)."""
    cfg = job.tokenizer
    source = pretrained_tokenizer(job)
    if source is not None:
        return load_pretrained_tokenizer(source)
    if cfg.train_on == "eval":
        texts = [d.text for d in corpus.eval]
    elif cfg.train_on == "train":
        texts = [d.text for d in corpus.train]
    else:
        texts = [d.text for d in load_documents(cfg.train_on, job.data, job_dir)]
    return train_bpe(texts, cfg.vocab_size, default_cache_dir() / "tokenizers")


def vocab_size(tok: Tokenizer) -> int:
    return tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok)


def site_documents(
    job: JobConfig, job_dir: Path | None, corpus: Corpus | None, names: list[str] | None = None
) -> dict[str, list[Document]]:
    """Documents of the named sites (default: all): their own file (`path`), or their
    partition of the shared corpus (`corpus` may be None when no named site needs it)."""
    wanted = set(names) if names is not None else {s.name for s in job.sites}
    shared = [s for s in job.sites if s.path is None]
    out: dict[str, list[Document]] = {}
    if wanted & {s.name for s in shared}:
        assert corpus is not None, "sites without a path need the shared corpus"
        if job.data.partition == "capacity":
            shares = [s.profile.compute for s in shared]
        else:
            shares = [s.share for s in shared]
        try:
            parts = partition(
                corpus.train, shares, job.data.partition, seed=job.seed,
                alpha=job.data.dirichlet_alpha,
            )
        except FedskyError as err:
            names = ", ".join(s.name for s in shared)
            raise FedskyError(f"partitioning the corpus across sites ({names}): {err}") from None
        for site, idx in zip(shared, parts, strict=True):
            if site.name in wanted:
                out[site.name] = [corpus.train[i] for i in idx]
    for site in job.sites:
        if site.path is not None and site.name in wanted:
            out[site.name] = load_documents(site.path, job.data, job_dir)
    return out


def sequences(docs: list[Document], tok: Tokenizer, seq_len: int) -> Batch:
    """(N, seq_len) token ids, documents joined by EOS; instruction examples become Rows that
    carry labels (the loss on responses only)."""
    if any(d.turns is not None for d in docs):
        examples = [encode_example(tok, d.turns) for d in docs if d.turns is not None]
        return pack_examples(examples, seq_len, eos_id(tok))
    return to_sequences(encode_texts(tok, [d.text for d in docs]), seq_len, eos_id(tok))


def site_sequences(
    job: JobConfig,
    job_dir: Path | None,
    corpus: Corpus | None,
    tok: Tokenizer,
    names: list[str] | None = None,
) -> dict[str, Batch]:
    """Training sequences of the named sites (default: all); a site with none is an error."""
    out = {}
    for name, docs in site_documents(job, job_dir, corpus, names).items():
        seqs = sequences(docs, tok, job.training.seq_len)
        if job.audit is not None and len(seqs):  # held-out rows out, canaries in
            seqs = site_training(job, name, seqs, tok)
        if len(seqs) == 0:
            raise FedskyError(
                f"site {name} has 0 training sequences of {job.training.seq_len} tokens "
                f"({len(docs)} documents); give it a larger share or lower training.seq_len"
            )
        out[name] = seqs
    return out


def eval_sequences(job: JobConfig, corpus: Corpus, tok: Tokenizer) -> Batch:
    """The held-out set: the first `data.eval_sequences` sequences of the eval documents."""
    seqs = sequences(corpus.eval, tok, job.training.seq_len)[: job.data.eval_sequences]
    if len(seqs) == 0:
        raise FedskyError(
            f"the eval split has no sequence of {job.training.seq_len} tokens; "
            "point data.eval at a larger file or lower training.seq_len"
        )
    return seqs


def load_job_corpus(job: JobConfig, job_dir: Path | None) -> Corpus:
    corpus = load_corpus(job.data, job_dir)
    log.debug("corpus: %s", corpus.source)
    return corpus
