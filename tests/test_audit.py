"""The leakage audit: the coordinator's recorded view, planted canaries, and the attacks
validated on tiny real runs (plaintext, masked, CKKS, DP-SGD)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fedsky_cmd, tiny_job

from fedsky.attacks import auc, exposure, otsu_split, row_scores
from fedsky.audit import audit_run
from fedsky.audit_trace import blob, read_trace
from fedsky.canaries import holdout_split, make_canaries, site_training
from fedsky.codecs import make_codec
from fedsky.config import JobConfig, load_job
from fedsky.data import encode_texts
from fedsky.errors import FedskyError
from fedsky.runner import prepare, run_federated
from fedsky.wire import unpack
from fedsky.workload import sequences, site_documents

SITES = ("a", "b", "c")
WTE = "transformer.wte.weight"


# Three sites with ~50 rows each, so five rounds of 10 steps of 8 rows cover their data; a
# model just large enough to memorise a canary planted 16 times.
SIZES = ["seed=3", "model.n_layer=2", "model.n_embd=64", "model.context=64",
         "training.local_steps=10", "training.batch_size=8", "training.seq_len=64"]
AUDIT = '[audit]\nholdout = 0.2\n[audit.canaries]\nsite = "a"\n'


def audit_job(tmp_path: Path, corpus: Path, extra: str = "", rounds: int = 5,
              overrides: tuple[str, ...] = ()) -> tuple[JobConfig, Path]:
    """`extra` starts in [training] (tables may follow it)."""
    path = tiny_job(tmp_path, corpus, f"lr = 0.01\nthreads = 1\n{extra}\n{AUDIT}",
                    rounds=rounds, sites=SITES)
    return load_job(path, [*SIZES, *overrides])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("small") / "docs.txt"
    path.write_text("\n\n".join(" ".join(topics[k].split())[:2000] for k in sorted(topics)[:30]))
    return path


def run_and_audit(tmp_path: Path, corpus: Path, extra: str = "") -> dict[str, Any]:
    job, job_dir = audit_job(tmp_path, corpus, extra)
    run_federated(job, job_dir, "inprocess")
    return audit_run(job.output_dir, candidates=200, max_records=64)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> dict[str, Any]:
    return run_and_audit(tmp_path_factory.mktemp("plain"), small_corpus)


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> dict[str, Any]:
    return run_and_audit(tmp_path_factory.mktemp("masked"), small_corpus, "[secure]")


def test_token_sets_are_read_from_plaintext_updates(plain: dict[str, Any]) -> None:
    for site in SITES:
        t = plain["sites"][site]["token_set"]
        assert t["recall"] > 0.9 and t["precision"] > 0.9, t
        assert t["recall"] > t["chance_recall"] + 0.3
        assert t["auc"] > 0.95
    unique = sum(plain["sites"][s]["token_set"]["unique_tokens"] for s in SITES)
    found = sum(plain["sites"][s]["token_set"]["unique_recovered"] for s in SITES)
    assert unique >= 5 and found / unique > 0.7


def _at_chance(t: dict[str, float]) -> None:
    assert abs(t["auc"] - 0.5) < 0.15, t
    assert abs(t["recall"] - t["chance_recall"]) < 0.15, t
    assert t["precision"] < t["base_rate"] + 0.15, t


def test_token_set_attack_is_at_chance_on_masked_updates(masked: dict[str, Any]) -> None:
    for site in SITES:
        _at_chance(masked["sites"][site]["token_set"])


def test_token_set_attack_is_at_chance_on_ckks_ciphertexts(tmp_path: Path,
                                                           small_corpus: Path) -> None:
    he = run_and_audit(tmp_path, small_corpus, '[secure]\nsensitive = "he"')
    for site in SITES:
        _at_chance(he["sites"][site]["token_set"])


def test_canary_exposure_rises_with_repetitions_and_falls_with_dp(
        plain: dict[str, Any], tmp_path: Path, small_corpus: Path) -> None:
    bits = {c["repetitions"]: c["exposure_bits"] for c in plain["sites"]["a"]["canaries"]}
    assert bits[16] > bits[1] + 2.0, bits
    assert bits[16] > 4.0  # of at most log2(201) = 7.65
    assert "canaries" not in plain["sites"]["b"]
    dp = run_and_audit(tmp_path, small_corpus, 'sampling = "poisson"\n[privacy]\n'
                       'secure_mode = false\n[privacy.dp_sgd]\nnoise_multiplier = 1.0')
    dp_bits = {c["repetitions"]: c["exposure_bits"] for c in dp["sites"]["a"]["canaries"]}
    assert dp_bits[16] < bits[16] - 2.0, (dp_bits, bits)


def test_leakage_rate_counts_what_beats_chance(plain: dict[str, Any],
                                               masked: dict[str, Any]) -> None:
    for result in (plain, masked):
        for site in SITES:
            lk = result["sites"][site]["leakage"]
            t = result["sites"][site]["token_set"]
            digits = 24 if site == "a" else 0
            assert lk["items"] == t["unique_tokens"] + digits
            excess = (max(0, t["unique_recovered"] - t["unique_chance"])
                      + max(0, lk["canary_digits"][0] - digits / 10))
            assert lk["rate"] == pytest.approx(excess / lk["items"])
    rate, tokens = {}, {}
    for name, r in (("plain", plain), ("masked", masked)):
        lks = [r["sites"][s]["leakage"] for s in SITES]
        rate[name] = sum(lk["excess"] for lk in lks) / sum(lk["items"] for lk in lks)
        unique = sum(lk["unique_tokens"][1] for lk in lks)
        found = sum(lk["unique_tokens"][0] for lk in lks)
        tokens[name] = (found - sum(lk["unique_chance"] for lk in lks)) / unique
    # site-unique tokens found beyond chance: most in plaintext, none on masked updates
    assert tokens["plain"] > 0.5 and tokens["masked"] < 0.2, tokens
    assert rate["plain"] > rate["masked"] + 0.15 and rate["masked"] < 0.1, rate


def test_trace_holds_what_the_coordinator_received(plain: dict[str, Any],
                                                   masked: dict[str, Any]) -> None:
    meta, lines = read_trace(plain["run"])
    assert meta == {"tags": "plain"}
    ups = [x for x in lines if x["dir"] == "up"]
    assert sorted((x["tag"], x["site"]) for x in ups) == [(r, s) for r in range(5) for s in SITES]
    downs = [x for x in lines if x["dir"] == "down"]
    assert len(downs) == 15 and len({x["sha256"] for x in downs}) == 5  # one model a round
    tensors, header = unpack(blob(plain["run"], ups[0]["sha256"]))
    assert header["site"] == ups[0]["site"] and "codec" in header
    meta, lines = read_trace(masked["run"])
    assert meta["tags"] == "secure"
    masked_ups = [x for x in lines if x["dir"] == "up" and x["tag"] % 8 == 2]
    assert len(masked_ups) == 15
    tensors, header = unpack(blob(masked["run"], masked_ups[0]["sha256"]))
    assert header["phase"] == "masked" and set(tensors) == {"masked", "masked_weight"}
    truth = json.loads((Path(plain["run"]) / "audit" / "truth.json").read_text())
    assert [c["repetitions"] for c in truth["canaries"]] == [1, 4, 16]


def test_canaries_are_planted_in_one_site_and_held_out_rows_left_out(
        tmp_path: Path, small_corpus: Path) -> None:
    job, job_dir = audit_job(tmp_path, small_corpus)
    p = prepare(job, job_dir)
    docs = site_documents(job, job_dir, p.corpus)
    canaries = make_canaries(job)
    assert len({c.secret for c in canaries}) == 3 and all(len(c.secret) == 8 for c in canaries)
    for site in SITES:
        raw = sequences(docs[site], p.tokenizer, job.training.seq_len)
        train, held = holdout_split(job, site, len(raw))
        assert len(held) == round(0.2 * len(raw)) and not set(train.tolist()) & set(held.tolist())
        rows = site_training(job, site, raw, p.tokenizer)
        planted = 21 if site == "a" else 0
        assert len(rows) == len(train) + planted
        torch.testing.assert_close(rows[: len(train)], raw[train])
    rows = site_training(job, "a", sequences(docs["a"], p.tokenizer, 64), p.tokenizer)
    ids = encode_texts(p.tokenizer, [canaries[2].text])[0]
    starts = sum(row[: len(ids)].tolist() == ids for row in rows)
    assert starts == 16


def test_audit_of_a_run_without_a_trace_is_a_clear_error(tmp_path: Path,
                                                         small_corpus: Path) -> None:
    job, job_dir = audit_job(tmp_path, small_corpus, rounds=1,
                             overrides=("audit=false", f'output_dir="{tmp_path / "no-audit"}"'))
    assert job.audit is None
    run_federated(job, job_dir, "inprocess")
    with pytest.raises(FedskyError, match="no audit trace"):
        audit_run(tmp_path / "no-audit")
    proc = subprocess.run(fedsky_cmd("audit", str(tmp_path / "no-audit")), check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no audit trace" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_grpc_trace_matches_the_in_process_one(tmp_path: Path, small_corpus: Path) -> None:
    job, job_dir = audit_job(tmp_path, small_corpus, rounds=1)
    sets = [x for o in SIZES for x in ("--set", o)]
    proc = subprocess.run(fedsky_cmd("run", str(job_dir / "job.toml"), "--transport", "grpc",
                                     "--no-report", *sets,
                                     "--set", f'output_dir="{tmp_path / "grpc"}"'),
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    job, job_dir = audit_job(tmp_path, small_corpus, rounds=1,
                             overrides=(f'output_dir="{tmp_path / "inproc"}"',))
    run_federated(job, job_dir, "inprocess")
    p = prepare(job, job_dir)
    like = {k: v.detach() for k, v in p.model.named_parameters()}
    codec = make_codec(job.codec).uplink
    seen = {}
    for run in ("grpc", "inproc"):
        _, lines = read_trace(tmp_path / run)
        seen[run] = {}
        for x in lines:
            if x["dir"] == "up":
                tensors, header = unpack(blob(tmp_path / run, x["sha256"]))
                seen[run][x["site"]] = codec.decode(tensors, header["codec"], like)[WTE]
    assert seen["grpc"].keys() == set(SITES)
    for site in SITES:
        torch.testing.assert_close(seen["grpc"][site], seen["inproc"][site], rtol=0, atol=1e-6)


def test_attack_math_against_closed_forms() -> None:
    assert auc(torch.tensor([3.0, 4.0]).numpy(), torch.tensor([1.0, 2.0]).numpy()) == 1.0
    assert auc(torch.tensor([1.0]).numpy(), torch.tensor([1.0]).numpy()) == 0.5
    rank, bits = exposure(-1.0, -torch.arange(2.0, 1025.0).numpy())  # above all 1023
    assert rank == 1 and bits == pytest.approx(10.0)
    rank, bits = exposure(-5000.0, -torch.arange(2.0, 1025.0).numpy())  # below all
    assert rank == 1024 and bits == pytest.approx(0.0)
    low, high = torch.full((50,), 0.01), torch.full((30,), 1.0)
    cut = otsu_split(torch.cat([low, high]).numpy())
    assert 0.01 < cut < 1.0
    rows = torch.zeros(10, 4)
    rows[3] = 1.0
    scores = row_scores(rows)
    assert int(scores.argmax()) == 3 and float(scores[0]) == 0.0
