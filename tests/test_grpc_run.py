"""The whole job over gRPC with every site in its own process, on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import fedsky_cmd, tiny_job
from fedsky.checkpoint import load_checkpoint
from fedsky.codecs import make_codec
from fedsky.config import load_job
from fedsky.coordinator import RoundContext, run_rounds
from fedsky.metrics import RunLog, read_metrics
from fedsky.model import trainable_state
from fedsky.runner import grpc_security, grpc_transport, prepare, run_federated, spawn_workers
from fedsky.site import make_setup
from fedsky.strategies import make_strategy


def test_grpc_processes_give_the_in_process_result(tmp_path: Path, corpus_file: Path) -> None:
    job_path = tiny_job(tmp_path, corpus_file)
    proc = subprocess.run(fedsky_cmd("run", str(job_path), "--transport", "grpc",
                                     "--set", f'output_dir="{tmp_path / "grpc"}"'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"outputs in {tmp_path / 'grpc'}" in proc.stdout

    job, job_dir = load_job(job_path, [f'output_dir="{tmp_path / "inproc"}"'])
    run_federated(job, job_dir, "inprocess")
    _, over_grpc, _ = load_checkpoint(tmp_path / "grpc" / "checkpoint.safetensors")
    _, in_process, _ = load_checkpoint(tmp_path / "inproc" / "checkpoint.safetensors")
    assert over_grpc.keys() == in_process.keys()
    for name in over_grpc:
        torch.testing.assert_close(over_grpc[name], in_process[name], rtol=0, atol=1e-6)
    # the wire carried exactly the payloads the simulation counted
    grpc_rec, inproc_rec = read_metrics(tmp_path / "grpc"), read_metrics(tmp_path / "inproc")
    assert [r["bytes_up"] for r in grpc_rec] == [r["bytes_up"] for r in inproc_rec]


def test_a_frozen_site_misses_the_deadline_and_the_round_completes(
    tmp_path: Path, corpus_file: Path
) -> None:
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file),
                            ["coordinator.round_deadline_s=8", "coordinator.min_sites=2"])
    p = prepare(job, job_dir)
    security = grpc_security(job)
    transport = grpc_transport(job, security)
    procs = spawn_workers(job, transport.port, security, p.out_dir)
    frozen = procs[2]  # site "c"
    runlog = RunLog(p.out_dir, job.rounds, "deadline")
    try:
        joined = transport.start(["a", "b", "c"], make_setup(job, job_dir, p.tokenizer))
        assert joined == ["a", "b", "c"]
        os.kill(frozen.pid, signal.SIGSTOP)  # alive, connected, and silent: a hung VM
        strategy = make_strategy(job.strategy)
        params = trainable_state(p.model)
        ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                           runlog, p.out_dir / "checkpoint.safetensors")
        run_rounds(job, transport, joined, params, ctx, strategy.init_state(params))
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        transport.close()
        runlog.close()
        for proc in procs:
            proc.wait(timeout=60)
    records = read_metrics(p.out_dir)
    assert len(records) == job.rounds
    for rec in records:
        assert rec["dropped"] == ["c"] and rec["participants"] == ["a", "b"]
        assert set(rec["sites"]) == {"a", "b"} and "skipped" not in rec
        assert abs(rec["sites"]["a"]["weight"] + rec["sites"]["b"]["weight"] - 1) < 1e-9


def test_unreachable_coordinator_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(fedsky_cmd("worker", "--coordinator", f"127.0.0.1:{port}",
                                     "--site", "a", "--retries", "2", "--insecure"),
                          env={**os.environ, "FEDSKY_TOKEN": "x"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot reach coordinator" in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path, corpus_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(fedsky_cmd("coordinator", str(tiny_job(tmp_path, corpus_file)),
                                         "--port", str(port), "--set", "transport.insecure=true"),
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "already in use" in proc.stderr and "Traceback" not in proc.stderr
    assert "plaintext" in proc.stderr  # the insecure mode is never silent


def test_coordinator_without_certificates_or_insecure_is_a_clear_error(
    tmp_path: Path, corpus_file: Path
) -> None:
    proc = subprocess.run(fedsky_cmd("coordinator", str(tiny_job(tmp_path, corpus_file))),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs mutual TLS" in proc.stderr and "fedsky certs" in proc.stderr


def test_worker_without_a_certificate_or_a_secret_is_refused_locally() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDSKY_TOKEN"}
    base = ("worker", "--coordinator", "127.0.0.1:1", "--site", "a")
    proc = subprocess.run(fedsky_cmd(*base), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no certificate" in proc.stderr
    proc = subprocess.run(fedsky_cmd(*base, "--insecure"), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "FEDSKY_TOKEN" in proc.stderr


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:notaport"])
def test_malformed_coordinator_address(bad: str) -> None:
    proc = subprocess.run(fedsky_cmd("worker", "--coordinator", bad, "--site", "a",
                                     "--retries", "1", "--insecure"),
                          env={**os.environ, "FEDSKY_TOKEN": "x"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
