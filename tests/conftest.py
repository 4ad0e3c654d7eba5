"""Shared fixtures: a small real corpus that needs no download, and tiny job files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenizers trained by tests go to a fresh cache, not the user's."""
    os.environ["FEDSKY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 KB of English from Python's own docs, documents separated by blank lines."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    docs = [" ".join(topics[k].split()) for k in sorted(topics)][:120]
    path.write_text("\n\n".join(docs))
    return path


def tiny_job(tmp_path: Path, corpus: Path, extra: str = "", *, rounds: int = 2,
             sites: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """A job small enough to train in seconds on one core."""
    site_tables = "".join(f'\n[[sites]]\nname = "{s}"\n' for s in sites)
    text = f'''
name = "tiny"
seed = 7
rounds = {rounds}
output_dir = "{tmp_path / 'out'}"

[model]
n_layer = 1
n_embd = 32
n_head = 2
context = 32

[tokenizer]
vocab_size = 400
train_on = "train"

[data]
format = "text"
train = "{corpus}"
eval_fraction = 0.2
eval_sequences = 16

[training]
local_steps = 2
batch_size = 4
seq_len = 32
{extra}
{site_tables}'''
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def fedsky_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsky", *args]
