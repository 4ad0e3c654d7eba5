"""End to end in one process: determinism, outputs, checkpoint, centralized ceiling."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_job
from fedsky.checkpoint import load_checkpoint
from fedsky.config import load_job
from fedsky.metrics import read_metrics
from fedsky.runner import run_centralized, run_federated

TIMING = {"round_s", "eval_s", "wall_s", "compute_s"}


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING}
    return obj


def _run(tmp_path: Path, corpus: Path, *overrides: str) -> tuple[dict, list[dict]]:
    job, job_dir = load_job(tiny_job(tmp_path, corpus), list(overrides))
    summary = run_federated(job, job_dir, "inprocess")
    return summary, read_metrics(Path(summary["output_dir"]))


def test_same_seed_same_metrics_different_seed_different(tmp_path: Path,
                                                         corpus_file: Path) -> None:
    _, first = _run(tmp_path / "1", corpus_file)
    _, second = _run(tmp_path / "2", corpus_file)
    _, other = _run(tmp_path / "3", corpus_file, "seed=8")
    assert len(first) == 2
    assert [_strip_timing(r) for r in first] == [_strip_timing(r) for r in second]
    assert first[-1]["eval_loss"] != other[-1]["eval_loss"]
    p1 = load_checkpoint(tmp_path / "1" / "out" / "checkpoint.safetensors")[1]
    p2 = load_checkpoint(tmp_path / "2" / "out" / "checkpoint.safetensors")[1]
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_outputs_metrics_and_checkpoint_loadable_by_transformers(tmp_path: Path,
                                                                 corpus_file: Path) -> None:
    summary, records = _run(tmp_path, corpus_file)
    out = Path(summary["output_dir"])
    assert (out / "summary.json").is_file() and summary["rounds_completed"] == 2
    rec = records[-1]
    assert set(rec["sites"]) == {"a", "b", "c"}
    assert abs(sum(s["weight"] for s in rec["sites"].values()) - 1) < 1e-9
    # bytes: every site received the global tensors and sent an update of the same size
    assert len(set(rec["bytes_down"].values())) == 1 and rec["bytes_up"].keys() == {"a", "b", "c"}
    assert summary["bytes_total"] == sum(sum(r["bytes_up"].values()) + sum(r["bytes_down"].values())
                                         for r in records)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] + 1.0

    round_idx, params, _ = load_checkpoint(out / "checkpoint.safetensors")
    assert round_idx == 1
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    loaded = dict(model.named_parameters())
    for name, tensor in params.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_centralized_takes_the_same_number_of_steps(tmp_path: Path, corpus_file: Path) -> None:
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file))
    summary = run_centralized(job, job_dir)
    records = read_metrics(Path(summary["output_dir"]))
    assert summary["mode"] == "centralized" and len(records) == job.rounds
    # one round = 3 sites x 2 local steps x 4 sequences x 32 tokens
    assert all(r["sites"]["centralized"]["tokens"] == 3 * 2 * 4 * 32 for r in records)
    assert summary["bytes_total"] == 0


def test_lora_federates_only_adapters(tmp_path: Path, corpus_file: Path) -> None:
    summary, records = _run(tmp_path, corpus_file, 'model.lora={r=2, target_modules=["c_attn"]}')
    _, params, _ = load_checkpoint(Path(summary["output_dir"]) / "checkpoint.safetensors")
    assert params and all("lora_" in name for name in params)
    assert (Path(summary["output_dir"]) / "model" / "adapter_config.json").is_file()
