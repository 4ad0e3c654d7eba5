"""Data layer: corpus loading, partitioning, BPE tokenizer caching and sequence packing.

Tests marked `shared` read the real files in ../shared/data (WikiText-2, mtsamples); the rest
build small corpora in tmp_path so they run anywhere.
"""

from __future__ import annotations

import csv
import logging
import sys
import types
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsky.config import DataConfig
from fedsky.data import (
    EOS,
    Document,
    as_hf_tokenizer,
    default_cache_dir,
    encode_texts,
    eos_id,
    fallback_documents,
    load_corpus,
    load_documents,
    load_pretrained_tokenizer,
    partition,
    resolve_data_path,
    to_sequences,
    train_bpe,
)
from fedsky.data import tokenizer as tokmod
from fedsky.errors import FedskyError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "wikitext-2" / "valid.txt").is_file(),
    reason=f"shared data folder not found at {SHARED} (WikiText-2 / mtsamples)",
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FEDSKY_DATA set in the developer's shell must not change what these tests find."""
    monkeypatch.delenv("FEDSKY_DATA", raising=False)


# ---------------------------------------------------------------- corpus: the shared data


@needs_shared
def test_wikitext_valid_has_60_articles_and_subheadings_stay_inside() -> None:
    docs = load_documents("wikitext-2/valid.txt", DataConfig(format="wikitext"), SHARED)
    assert len(docs) == 60
    assert docs[0].text.startswith("= Homarus gammarus =")
    assert "= = Description = =" in docs[0].text  # a sub-heading did not start an article
    assert all(d.text.startswith("= ") and not d.text.startswith("= =") for d in docs)
    assert all(d.label is None for d in docs)


@needs_shared
def test_mtsamples_csv_without_header() -> None:
    path = SHARED / "mtsamples" / "mtsamples.csv"
    with path.open(newline="", encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == 401
    cfg = DataConfig(format="csv", csv_header=False, text_column=4, label_column=2)
    docs = load_documents(str(path), cfg, None)
    assert len(docs) == 397  # 4 rows have an empty transcription
    labels = Counter(d.label for d in docs)
    assert labels["Surgery"] == 221 and labels["Urology"] == 156  # stripped: no leading space
    assert all(d.text == d.text.strip() and d.text for d in docs)
    assert docs[0].text.startswith("SUBJECTIVE:")


@needs_shared
def test_load_corpus_train_valid_eval_test() -> None:
    cfg = DataConfig(train="wikitext-2/valid.txt", eval="wikitext-2/test.txt")
    corpus = load_corpus(cfg, SHARED)
    assert len(corpus.train) == 60
    # test.txt: 62 top-level ` = Title = ` lines (the README's 64 counts two table-legend lines)
    assert len(corpus.eval) == 62
    assert "valid.txt" in corpus.source and "test.txt" in corpus.source
    assert "fallback" not in corpus.source


@needs_shared
def test_fedsky_data_env_finds_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSKY_DATA", str(SHARED))
    found = resolve_data_path("wikitext-2/valid.txt", tmp_path)
    assert found == SHARED / "wikitext-2" / "valid.txt"


@needs_shared
def test_contiguous_partition_of_wikitext_is_complete() -> None:
    docs = load_documents("wikitext-2/valid.txt", DataConfig(format="wikitext"), SHARED)
    sites = partition(docs, [1, 1, 1, 1], "contiguous", seed=0)
    assert sorted(i for s in sites for i in s) == list(range(60))
    total = sum(len(d.text) for d in docs)
    biggest = max(len(d.text) for d in docs)
    for site in sites:
        assert abs(sum(len(docs[i].text) for i in site) - total / 4) <= biggest


# ---------------------------------------------------------------- corpus: small local files


def test_wikitext_split_on_titles_only(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text(
        " \n = Alpha = \n \n Alpha text . \n \n = = History = = \n \n More alpha . \n"
        " = = = Deep = = = \n deeper . \n = Beta = \n \n Beta text . \n \n"
    )
    docs = load_documents("w.txt", DataConfig(format="wikitext"), tmp_path)
    assert [d.text.splitlines()[0].strip() for d in docs] == ["= Alpha =", "= Beta ="]
    assert "More alpha ." in docs[0].text and "deeper ." in docs[0].text
    assert "Beta" not in docs[0].text


def test_text_file_documents_split_on_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n\nfirst line\nsecond line\n\n\n   \nthird doc\n\n\nlast\n")
    docs = load_documents("t.txt", DataConfig(format="text"), tmp_path)
    assert [d.text for d in docs] == ["first line\nsecond line", "third doc", "last"]


def test_text_directory_one_document_per_file_sorted(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("bravo\n\nstill bravo")
    (folder / "a.txt").write_text("  alpha  ")
    (folder / "empty.txt").write_text("\n \n")
    (folder / "notes.md").write_text("not text format")
    docs = load_documents("corpus", DataConfig(format="text"), tmp_path)
    assert [d.text for d in docs] == ["alpha", "bravo\n\nstill bravo"]


def test_csv_with_header_names(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        'id,topic,body\n1, sports ," goal, scored "\n2,news,   \n3,news,"multi\nline"\n'
    )
    cfg = DataConfig(format="csv", text_column="body", label_column="topic")
    docs = load_documents("d.csv", cfg, tmp_path)
    assert docs == [Document("goal, scored", "sports"), Document("multi\nline", "news")]


def test_csv_bad_column_lists_available_columns(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("id,topic,body\n1,a,text\n")
    with pytest.raises(FedskyError, match=r"'content' is not a column.*'topic'.*'body'"):
        load_documents("d.csv", DataConfig(format="csv", text_column="content"), tmp_path)
    with pytest.raises(FedskyError, match=r"label_column = 7 is out of range.*2: 'body'"):
        load_documents("d.csv", DataConfig(format="csv", label_column=7), tmp_path)
    no_header = DataConfig(format="csv", csv_header=False, text_column=3)
    with pytest.raises(FedskyError, match=r"out of range.*0\.\.2"):
        load_documents("d.csv", no_header, tmp_path)


def test_missing_path_names_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSKY_DATA", str(tmp_path / "shared"))
    with pytest.raises(FedskyError) as info:
        load_documents("nowhere/valid.txt", DataConfig(), tmp_path)
    msg = str(info.value)
    assert "nowhere/valid.txt" in msg and str(tmp_path) in msg and "FEDSKY_DATA" in msg


def test_resolve_prefers_job_dir_then_fedsky_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, shared = tmp_path / "job", tmp_path / "shared"
    for d in (job, shared):
        d.mkdir()
        (d / "x.txt").write_text(d.name)
    (shared / "only_shared.txt").write_text("s")
    monkeypatch.setenv("FEDSKY_DATA", str(shared))
    assert resolve_data_path("x.txt", job) == job / "x.txt"
    assert resolve_data_path("only_shared.txt", job) == shared / "only_shared.txt"
    assert resolve_data_path(str(shared / "x.txt"), job) == shared / "x.txt"
    assert resolve_data_path("missing.txt", job) is None
    assert resolve_data_path(str(tmp_path / "missing.txt"), job) is None


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n \n\n   \n")
    with pytest.raises(FedskyError, match="is empty"):
        load_documents("blank.txt", DataConfig(format="wikitext"), tmp_path)
    with pytest.raises(FedskyError, match="is empty"):
        load_documents("blank.txt", DataConfig(format="text"), tmp_path)


def test_fallback_corpus_when_train_path_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsky.data"):
        corpus = load_corpus(DataConfig(train="nope/valid.txt", fallback=True), tmp_path)
    assert "fallback" in corpus.source and "nope/valid.txt" in corpus.source
    assert any("nope/valid.txt" in r.getMessage() for r in caplog.records)
    fallback = fallback_documents()
    assert len(fallback) > 50 and all(d.text for d in fallback)
    assert corpus.train + corpus.eval == fallback
    assert len(corpus.eval) == round(len(fallback) * 0.1)


def test_no_fallback_when_disabled_or_for_csv(tmp_path: Path) -> None:
    with pytest.raises(FedskyError, match="not found"):
        load_corpus(DataConfig(train="nope.txt", fallback=False), tmp_path)
    with pytest.raises(FedskyError, match="not found"):
        load_corpus(DataConfig(format="csv", train="nope.csv", fallback=True), tmp_path)


def test_eval_held_out_from_train_when_no_eval_file(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n\n".join(f"doc {i}" for i in range(10)))
    cfg = DataConfig(format="text", train="t.txt", eval=None, eval_fraction=0.2)
    corpus = load_corpus(cfg, tmp_path)
    assert [d.text for d in corpus.train] == [f"doc {i}" for i in range(8)]
    assert [d.text for d in corpus.eval] == ["doc 8", "doc 9"]
    # a tiny fraction still holds out one document
    corpus = load_corpus(cfg.model_copy(update={"eval_fraction": 0.01}), tmp_path)
    assert (len(corpus.train), len(corpus.eval)) == (9, 1)


def test_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FedskyError, match=r"pip install 'fedsky\[hf\]'"):
        load_documents("wikitext", DataConfig(format="hf"), None)


def _fake_datasets(load_dataset: object) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hf_offline_suggests_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(FedskyError, match=r"could not fetch.*'wikitext'.*local file"):
        load_documents("wikitext", DataConfig(format="hf"), None)


def test_hf_reads_text_and_label_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDataset:
        column_names = ["label", "text"]
        rows = [{"label": 1, "text": " a "}, {"label": 0, "text": ""}, {"label": 0, "text": "b"}]

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(self.rows)

    seen = {}

    def load(name: str, split: str) -> FakeDataset:
        seen.update(name=name, split=split)
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load))
    cfg = DataConfig(format="hf", text_column="text", label_column=0)
    docs = load_documents("ag_news", cfg, None, split="test")
    assert docs == [Document("a", "1"), Document("b", "0")]
    assert seen == {"name": "ag_news", "split": "test"}


# ---------------------------------------------------------------- partition


def _synthetic_docs(n: int = 200, n_labels: int = 10, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document("x" * int(rng.integers(50, 150)), f"topic{i % n_labels}") for i in range(n)]


@pytest.mark.parametrize("scheme", ["iid", "contiguous", "dirichlet", "capacity"])
def test_partition_is_disjoint_and_complete(scheme: str) -> None:
    docs = _synthetic_docs()
    sites = partition(docs, [1.0, 2.0, 3.0, 4.0], scheme, seed=3)
    assert len(sites) == 4 and all(sites)
    flat = [i for s in sites for i in s]
    assert sorted(flat) == list(range(len(docs)))  # each exactly once
    assert all(s == sorted(s) for s in sites)
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("scheme", ["iid", "contiguous", "capacity"])
def test_partition_respects_shares_within_a_document(scheme: str) -> None:
    docs = _synthetic_docs()
    shares = [1.0, 2.0, 3.0, 4.0]
    sites = partition(docs, shares, scheme, seed=1)
    total = sum(len(d.text) for d in docs)
    biggest = max(len(d.text) for d in docs)
    for site, share in zip(sites, shares, strict=True):
        chars = sum(len(docs[i].text) for i in site)
        # each end of a site's run is within half a document of its target cut
        assert abs(chars - total * share / sum(shares)) <= biggest
    sizes = [len(s) for s in sites]
    assert sizes == sorted(sizes) and sizes[3] > 3 * sizes[0]


def test_contiguous_keeps_corpus_order() -> None:
    sites = partition(_synthetic_docs(), [1, 1, 1], "contiguous", seed=0)
    assert sites[0][0] == 0
    for a, b in pairwise(sites):
        assert b[0] == a[-1] + 1
    for s in sites:
        assert s == list(range(s[0], s[-1] + 1))


def test_iid_is_seeded() -> None:
    docs = _synthetic_docs()
    a = partition(docs, [1, 1, 1], "iid", seed=7)
    assert a == partition(docs, [1, 1, 1], "iid", seed=7)
    assert a != partition(docs, [1, 1, 1], "iid", seed=8)
    assert a[0] != list(range(len(a[0])))  # actually shuffled
    d = partition(docs, [1, 1, 1], "dirichlet", seed=7)
    assert d == partition(docs, [1, 1, 1], "dirichlet", seed=7)


def _mean_max_label_fraction(docs: list[Document], sites: list[list[int]]) -> float:
    fractions = []
    for site in sites:
        counts = Counter(docs[i].label for i in site)
        fractions.append(max(counts.values()) / len(site))
    return float(np.mean(fractions))


def test_dirichlet_small_alpha_concentrates_labels() -> None:
    docs = _synthetic_docs(n=500, n_labels=10)

    def concentration(alpha: float) -> float:
        runs = [partition(docs, [1] * 5, "dirichlet", seed=s, alpha=alpha) for s in range(5)]
        return float(np.mean([_mean_max_label_fraction(docs, sites) for sites in runs]))

    skewed, near_iid = concentration(0.05), concentration(100.0)
    # 10 balanced labels over 5 sites: near iid each site's top label is ~1/10 of its docs;
    # with alpha = 0.05 each label lands almost whole on one site, so a site holds ~2 labels.
    assert near_iid < 0.15
    assert skewed > 0.4
    assert skewed > 3 * near_iid


def test_dirichlet_needs_labels() -> None:
    docs = [Document("text")] * 10
    with pytest.raises(FedskyError, match="label"):
        partition(docs, [1, 1], "dirichlet", seed=0)


def test_zero_document_site_is_an_error() -> None:
    docs = [Document("y" * 100) for _ in range(10)]
    with pytest.raises(FedskyError, match=r"site 0 gets no documents.*fewer sites"):
        partition(docs, [1.0, 1.0, 1000.0], "iid", seed=0)
    with pytest.raises(FedskyError, match=r"site 1 gets no documents"):
        partition(docs, [1.0, 0.001, 1.0], "contiguous", seed=0)


def test_more_sites_than_documents_is_an_error() -> None:
    with pytest.raises(FedskyError, match="3 sites but only 2 documents"):
        partition([Document("a"), Document("b")], [1, 1, 1], "iid", seed=0)
    with pytest.raises(FedskyError, match="unknown partition scheme"):
        partition([Document("a"), Document("b")], [1, 1], "random", seed=0)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    return [d.text for d in fallback_documents()[:8]]


def test_bpe_is_cached_and_not_retrained(
    small_texts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train_bpe(small_texts, 320, tmp_path)
    files = list(tmp_path.glob("bpe-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(tokmod.trainers, "BpeTrainer", no_training)
    second = train_bpe(small_texts, 320, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    sample = ["The quick brown fox.", "def f(x): return x ** 2"]
    assert encode_texts(second, sample) == encode_texts(first, sample)
    monkeypatch.undo()

    train_bpe(small_texts, 330, tmp_path)  # another vocab size is another cache entry
    assert len(list(tmp_path.glob("bpe-*.json"))) == 2


def test_bpe_training_is_deterministic(small_texts: list[str], tmp_path: Path) -> None:
    a = train_bpe(small_texts, 320, tmp_path / "a")
    b = train_bpe(small_texts, 320, tmp_path / "b")
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 320


def test_bpe_round_trip_and_eos(small_texts: list[str], tmp_path: Path) -> None:
    tok = train_bpe(small_texts, 320, tmp_path)
    sentence = "The café's naïve façade — 3.14 × 2 = 6.28 🙂\n\tindented"
    ids = encode_texts(tok, [sentence])[0]
    assert tok.decode(ids) == sentence
    assert eos_id(tok) == 0 and tok.id_to_token(0) == EOS
    assert 0 not in ids  # no special tokens added by encoding


def test_hf_wrapper_save_and_load(small_texts: list[str], tmp_path: Path) -> None:
    tok = train_bpe(small_texts, 320, tmp_path / "cache")
    hf = as_hf_tokenizer(tok)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 0, 0)
    texts = ["Hello world", "Another document, longer than the first."]
    assert encode_texts(hf, texts) == encode_texts(tok, texts)
    hf.save_pretrained(tmp_path / "model")
    loaded = load_pretrained_tokenizer(str(tmp_path / "model"))
    assert encode_texts(loaded, texts) == encode_texts(tok, texts)
    assert eos_id(loaded) == 0


def test_pretrained_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FedskyError, match="no such directory"):
        load_pretrained_tokenizer(str(tmp_path / "absent"))


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSKY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FEDSKY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedsky"


# ---------------------------------------------------------------- sequences


def test_sequences_concatenate_with_eos_and_drop_tail() -> None:
    rows = to_sequences([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream: 1 2 3 EOS 4 5 EOS 6 7 8 9 (11 tokens; the empty doc adds nothing) -> 2 full rows
    assert rows.dtype == torch.long
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]


def test_sequences_shape_and_empty() -> None:
    docs = [list(range(1, 11))] * 5  # 5 docs * 10 tokens + 4 EOS = 54 tokens
    rows = to_sequences(docs, seq_len=8, eos_id=99)
    assert rows.shape == (6, 8)
    assert (rows == 99).sum().item() == 4
    assert to_sequences([[1, 2]], seq_len=8, eos_id=0).shape == (0, 8)
    assert to_sequences([], seq_len=8, eos_id=0).shape == (0, 8)
