"""A multi-process site: DDP under torchrun (gloo on CPU) and gradient accumulation give the
update a single process computes on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_job

from fedsky.checkpoint import load_checkpoint
from fedsky.config import ModelConfig, TrainingConfig, load_job
from fedsky.errors import FedskyError
from fedsky.metrics import read_metrics
from fedsky.model import build_model, trainable_state
from fedsky.runner import new_tokens, run_federated
from fedsky.training import Ranks, train_steps

SGD = ['training.optimizer="sgd"', "training.lr=0.5", "training.threads=1"]


def _trained(cfg: TrainingConfig, data: torch.Tensor) -> tuple[dict, float]:
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, context=16), 300, 0)
    res = train_steps(model, data, cfg, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    return trainable_state(model), res.mean_loss


def test_gradient_accumulation_takes_the_full_batch_step() -> None:
    data = torch.randint(300, (40, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(optimizer="sgd", lr=0.5, batch_size=8, seq_len=16)
    whole, whole_loss = _trained(cfg, data)
    accum, accum_loss = _trained(cfg.model_copy(update={"grad_accum": 4}), data)
    assert accum_loss == pytest.approx(whole_loss, rel=1e-5)
    for name in whole:
        torch.testing.assert_close(accum[name], whole[name], rtol=0, atol=2e-6)
    start = trainable_state(build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2,
                                                    context=16), 300, 0))
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # it did train


def test_a_multi_process_site_needs_even_micro_batches() -> None:
    data = torch.zeros(8, 4, dtype=torch.int64)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, context=16), 300, 0)
    cfg = TrainingConfig(batch_size=6, grad_accum=2, seq_len=4)
    with pytest.raises(FedskyError, match="multiple of grad_accum x processes"):
        train_steps(model, data, cfg, 1, torch.Generator(), torch.device("cpu"),
                    ranks=Ranks(0, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_site_matches_the_single_process_site(tmp_path: Path,
                                                       corpus_file: Path) -> None:
    """Coordinator in this process, the site as 2 gloo ranks under torchrun (2 micro-batches
    each); the same job with one in-process site is the reference."""
    port = _free_port()
    job_file = tiny_job(tmp_path, corpus_file, sites=("a",))
    job, job_dir = load_job(job_file, [*SGD, "training.grad_accum=2",
                                       f"transport.port={port}", "transport.insecure=true",
                                       f'output_dir="{tmp_path / "ddp"}"'])
    tokens = new_tokens(job)
    log = (tmp_path / "torchrun.log").open("w")
    env = {**os.environ, "FEDSKY_TOKEN": tokens["a"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fedsky", "worker", "--coordinator", f"127.0.0.1:{port}", "--site", "a",
         "--retries", "8", "--insecure"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        run_federated(job, job_dir, "grpc", tokens=tokens, external=True)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert "rank 1 of 2" in out and "rank 0 of 2" in out, out[-2000:]

    single, single_dir = load_job(job_file, [*SGD, f'output_dir="{tmp_path / "single"}"'])
    run_federated(single, single_dir, "inprocess")
    _, ddp, _ = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    _, one, _ = load_checkpoint(tmp_path / "single" / "checkpoint.safetensors")
    start = trainable_state(build_model(job.model, 400, job.seed))
    assert ddp.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=1e-5)
    assert any((one[k] - start[k]).abs().max() > 1e-3 for k in one)  # far beyond the tolerance
    ddp_rec, one_rec = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    for a, b in zip(ddp_rec, one_rec, strict=True):
        assert a["sites"]["a"]["tokens"] == b["sites"]["a"]["tokens"]
        assert a["sites"]["a"]["train_loss"] == pytest.approx(b["sites"]["a"]["train_loss"],
                                                             rel=1e-5)
