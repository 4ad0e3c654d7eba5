"""The fault matrix, with the real model and real site processes: bad updates, a site killed
mid-training, the coordinator killed and resumed. Each ends in a state the test checks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from fedsky.runner import (
    grpc_security,
    grpc_transport,
    prepare,
    run_federated,
    spawn_workers,
    worker_cmd,
)
from fedsky.site import make_setup, site_factory
from fedsky.strategies import make_strategy
from fedsky.transport.grpc_worker import serve_site
from fedsky.wire import pack, unpack

ONE_THREAD = "training.threads=1"  # also makes gRPC and in-process runs agree bit for bit


def assert_same_params(a: Path, b: Path) -> None:
    _, x, _ = load_checkpoint(a)
    _, y, _ = load_checkpoint(b)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-6)


def poisoning_factory(genuine: dict[str, bytes]):
    """Real sites; all but "a" spoil their update on its way out, each in its own way."""
    real = site_factory()

    def spoil(site: str, v: torch.Tensor) -> torch.Tensor:
        if site == "nan":
            return torch.cat([v[:-1], torch.tensor([float("nan")])])
        if site == "inf":
            return torch.cat([torch.tensor([float("inf")]), v[1:]])
        if site == "shape":
            return v[:-1]
        return v * 1e9  # "huge": finite, but far over the norm bound

    def factory(site: str, setup: bytes):
        handler = real(site, setup)

        def handle(task: bytes) -> bytes:
            reply = handler(task)
            if site == "a":
                genuine[site] = reply
                return reply
            tensors, header = unpack(reply)
            return pack({k: spoil(site, t) for k, t in tensors.items()}, header)

        return handle

    return factory


def test_bad_updates_are_rejected_the_sites_told_and_the_model_moves_by_the_good_one(
    tmp_path: Path, corpus_file: Path, caplog
) -> None:
    sites = ("a", "nan", "inf", "shape", "huge")
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file, rounds=1, sites=sites),
                            [ONE_THREAD, "coordinator.max_update_norm=1000"])
    p = prepare(job, job_dir)
    security = grpc_security(job)
    transport = grpc_transport(job, security)
    genuine: dict[str, bytes] = {}
    strategy = make_strategy(job.strategy)
    initial = trainable_state(p.model)
    runlog = RunLog(p.out_dir, job.rounds, "bad updates")
    with ThreadPoolExecutor(len(sites)) as pool, caplog.at_level(logging.INFO):
        workers = [pool.submit(serve_site, f"127.0.0.1:{transport.port}", s,
                               poisoning_factory(genuine), tls=security.sites[s])
                   for s in sites]
        try:
            assert transport.start(list(sites), make_setup(job, job_dir, p.tokenizer)) == list(sites)
            ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                               runlog, p.out_dir / "checkpoint.safetensors")
            final = run_rounds(job, transport, list(sites), dict(initial), ctx,
                               strategy.init_state(initial))
        finally:
            transport.close()
            runlog.close()
        for w in workers:
            assert w.result(timeout=60) is None  # each site served to the end

    rec = read_metrics(p.out_dir)[0]
    assert rec["participants"] == ["a"] and sorted(rec["dropped"]) == sorted(sites[1:])
    # the model moved by exactly the good update: FedAvg of one site
    tensors, header = unpack(genuine["a"])
    delta = make_codec(job.codec).uplink.decode(tensors, header["codec"], initial)
    for name in initial:
        torch.testing.assert_close(final[name], initial[name] + delta[name], rtol=0, atol=1e-7)
    # each rejection was logged at the coordinator and told to its site, with its reason
    for site, reason in [("nan", "NaN or Inf"), ("inf", "NaN or Inf"),
                         ("shape", "cannot be decoded"), ("huge", "over the bound")]:
        assert f"rejected update from {site}: update from {site}" in caplog.text
        told = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"site {site}: the coordinator rejected")]
        assert told and reason in told[0], site


class KillMidRound:
    """The real gRPC transport; at `round_idx`, site `victim`'s process is frozen before its
    task is sent (so it cannot answer), killed while the round waits, and started again."""

    def __init__(self, inner, round_idx: int, victim: subprocess.Popen, restart) -> None:
        self.inner, self.round_idx, self.victim, self.restart = inner, round_idx, victim, restart
        self.restarted: subprocess.Popen | None = None

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        return self.inner.start(sites, setup)

    def exchange(self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float):
        if round_idx == self.round_idx:
            os.kill(self.victim.pid, signal.SIGSTOP)

            def kill_and_restart() -> None:
                os.kill(self.victim.pid, signal.SIGKILL)
                self.victim.wait()
                self.restarted = self.restart()

            threading.Timer(1.0, kill_and_restart).start()
        return self.inner.exchange(round_idx, tasks, deadline_s)

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        self.inner.reject(round_idx, site, reason)

    def close(self) -> None:
        self.inner.close()


def test_a_site_killed_mid_training_is_restarted_and_answers_the_same_round(
    tmp_path: Path, corpus_file: Path
) -> None:
    job_path = tiny_job(tmp_path, corpus_file)
    overrides = [ONE_THREAD, "coordinator.rejoin_wait_s=240", "coordinator.round_deadline_s=300"]
    job, job_dir = load_job(job_path, overrides)
    p = prepare(job, job_dir)
    security = grpc_security(job)
    transport = grpc_transport(job, security)
    procs = spawn_workers(job, transport.port, security, p.out_dir)

    def restart() -> subprocess.Popen:
        with open(p.out_dir / "logs" / "site-c-restarted.log", "w") as out:
            return subprocess.Popen(worker_cmd(f"127.0.0.1:{transport.port}", "c",
                                               security.sites["c"]),
                                    stdout=out, stderr=subprocess.STDOUT)

    faulty = KillMidRound(transport, 1, procs[2], restart)
    runlog = RunLog(p.out_dir, job.rounds, "kill a site")
    strategy = make_strategy(job.strategy)
    params = trainable_state(p.model)
    try:
        assert faulty.start(["a", "b", "c"], make_setup(job, job_dir, p.tokenizer)) == ["a", "b", "c"]
        ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                           runlog, p.out_dir / "checkpoint.safetensors")
        run_rounds(job, faulty, ["a", "b", "c"], params, ctx, strategy.init_state(params))
    finally:
        faulty.close()
        runlog.close()
        for proc in [*procs, faulty.restarted]:
            if proc is not None:
                proc.wait(timeout=120)
    assert procs[2].returncode == -signal.SIGKILL and faulty.restarted is not None
    assert faulty.restarted.returncode == 0
    records = read_metrics(p.out_dir)
    assert [r["participants"] for r in records] == [["a", "b", "c"]] * 2  # nothing was lost
    # and the result is the undisturbed one
    ref, ref_dir = load_job(job_path, [*overrides, f'output_dir="{tmp_path / "ref"}"'])
    run_federated(ref, ref_dir, "inprocess")
    assert_same_params(p.out_dir / "checkpoint.safetensors",
                       tmp_path / "ref" / "checkpoint.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_the_coordinator_killed_mid_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, corpus_file: Path, strategy: str
) -> None:
    """Synchronous: the final parameters equal an uninterrupted run's. Asynchronous (FedBuff
    over gRPC, on the real clock, so arrival order is not repeatable): the resumed run goes on
    from the checkpoint's version and delivers exactly the remaining budget."""
    # Provision as a deployment would: a project CA, the coordinator's and each site's pair.
    pki = tmp_path / "pki"
    for args in (["init", str(pki)], ["coordinator", "--host", "127.0.0.1", "--dir", str(pki)],
                 *(["site", s, "--dir", str(pki)] for s in ("a", "b", "c"))):
        subprocess.run(fedsky_cmd("certs", *args), check=True, capture_output=True)
    job_path = tiny_job(tmp_path, corpus_file, rounds=3)
    port = free_port()
    tls = [f'transport.tls_cert="{pki / "coordinator.pem"}"',
           f'transport.tls_key="{pki / "coordinator.key"}"',
           f'transport.tls_ca="{pki / "ca.pem"}"',
           f'transport.revocation_list="{pki / "revoked.txt"}"']
    # Rounds long enough (~1 s) that the test sees round 0's line well before round 2 ends.
    slow = "training.local_steps=60"
    algo = [f'strategy={{name="{strategy}"}}'] + (["strategy.buffer_size=2"]
                                                  if strategy == "fedbuff" else [])
    sets = [arg for s in [ONE_THREAD, slow, *algo, *tls] for arg in ("--set", s)]
    coordinator_cmd = fedsky_cmd("coordinator", str(job_path), "--port", str(port), *sets)
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    logs.mkdir()

    def launch(cmd: list[str], name: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    first = launch(coordinator_cmd, "coordinator-1")
    workers = [launch(fedsky_cmd("worker", "--coordinator", f"127.0.0.1:{port}", "--site", s,
                                 "--tls-ca", str(pki / "ca.pem"),
                                 "--tls-cert", str(pki / "sites" / f"{s}.pem"),
                                 "--tls-key", str(pki / "sites" / f"{s}.key")), f"site-{s}")
               for s in ("a", "b", "c")]
    try:
        deadline = time.monotonic() + 400
        # Round 0's checkpoint is written just after its metrics line: wait for both.
        while not (out / "checkpoint.safetensors").is_file() or not read_metrics(out):
            assert first.poll() is None, (logs / "coordinator-1.log").read_text()
            assert time.monotonic() < deadline, "the first round never finished"
            time.sleep(0.02)
        first.kill()  # preempted: no goodbye to the sites
        first.wait()
        before = read_metrics(out)
        assert len(before) < 3, "all rounds ended before the kill: nothing left to resume"
        kept = load_checkpoint(out / "checkpoint.safetensors")[0] + 1  # rounds it holds
        second = launch([*coordinator_cmd, "--resume"], "coordinator-2")
        assert second.wait(timeout=400) == 0, (logs / "coordinator-2.log").read_text()
        for w, s in zip(workers, "abc"):  # they reconnected to the new coordinator, saw it end
            assert w.wait(timeout=120) == 0, (logs / f"site-{s}.log").read_text()[-3000:]
    finally:
        for proc in [first, *workers]:
            if proc.poll() is None:
                proc.kill()
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert "rejoined" in (logs / "site-a.log").read_text() or "joined" in (
        logs / "site-a.log").read_text()
    if strategy == "fedbuff":
        # The resumed run started from the checkpoint's version and model, and the budget (3
        # windows x 3 sites) was delivered once: no window repeated, none lost.
        assert records[:kept] == before[:kept]
        versions = [r["version"] for r in records]
        assert versions == sorted(versions) and versions[kept] > versions[kept - 1]
        assert sum(len(r["arrivals"]) for r in records) == 3 * 3
        assert load_checkpoint(out / "checkpoint.safetensors")[2]["loop"]["version"] == (
            versions[-1])
        return
    ref, ref_dir = load_job(job_path, [ONE_THREAD, slow, f'output_dir="{tmp_path / "ref"}"'])
    run_federated(ref, ref_dir, "inprocess")
    assert_same_params(out / "checkpoint.safetensors", tmp_path / "ref" / "checkpoint.safetensors")
