"""The paper experiments, end to end. Not in the default suite: `pytest -m experiment`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA


def run_smoke(paper: str, data: str, tmp_path: Path) -> str:
    """The experiment's runner at 2 rounds of 2 steps; returns its results.md."""
    if not (SHARED_DATA / data).is_file():
        pytest.skip(f"{data} not found under {SHARED_DATA}")
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / paper / "run.py"),
         "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
         "--set", "rounds=2", "--set", "training.local_steps=2"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "results.md").read_text()


@pytest.mark.experiment
def test_paper_a_smoke(tmp_path: Path) -> None:
    table = run_smoke("paper_a", "wikitext-2/valid.txt", tmp_path)
    assert table.count("\n|") == 10  # header rule + 9 arms
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.experiment
def test_paper_b_smoke(tmp_path: Path) -> None:
    table = run_smoke("paper_b", "mtsamples/mtsamples.csv", tmp_path)
    assert table.count("\n|") == 7  # header rule + 6 arms
    for plot in ("leakage", "communication", "computation"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 10_000
