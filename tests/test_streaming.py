"""Streaming aggregation: updates folded into one running sum as their chunks arrive.

The oracle is the buffered path (`strategies.weighted_mean` over whole decoded updates). The
memory test runs a real coordinator process receiving real gRPC uploads from three site
processes and reads its peak RSS (VmHWM): 3 x 96 MiB updates, small enough for the suite's
time budget on 2 cores; the 2 GB case is `bench/transport_throughput.py --params 500e6`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedsky.codecs import RoundSeeds, make_codec
from fedsky.config import CodecConfig, FedAvgConfig
from fedsky.strategies import weighted_mean
from fedsky.streaming import RoundSum
from fedsky.wire import pack

GLOBAL = {"b": torch.zeros(5), "w": torch.zeros(7, 3)}
SAMPLES = {"s0": 10, "s1": 30, "s2": 60}


def reply(site: str, delta: dict[str, torch.Tensor], round_idx: int = 3,
          num_samples: int | None = None) -> bytes:
    """What a site sends with the plain fp32 uplink (as `fedsky.site` packs it)."""
    enc = make_codec(CodecConfig()).uplink.encode(delta, RoundSeeds(0, 0))
    return pack(enc.tensors, {"round": round_idx, "site": site, "codec": enc.header,
                              "num_samples": SAMPLES[site] if num_samples is None else num_samples,
                              "tokens": 1, "train_loss": 0.0, "compute_s": 0.0})


def deltas() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {s: {k: torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}
            for s in SAMPLES}


def feed_interleaved(acc: RoundSum, payloads: dict[str, bytes], chunk: int) -> dict:
    """Every site's payload in `chunk`-byte pieces (not whole fp32 values), round robin."""
    streams = {s: acc.open(s) for s in payloads}
    offsets = dict.fromkeys(payloads, 0)
    while any(offsets[s] < len(p) for s, p in payloads.items()):
        for s, p in payloads.items():
            if offsets[s] < len(p):
                streams[s].write(offsets[s], memoryview(p)[offsets[s] : offsets[s] + chunk])
                offsets[s] += chunk
    return {s: st.close() for s, st in streams.items()}


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_the_streamed_sum_is_the_buffered_weighted_mean(chunk: int) -> None:
    d = deltas()
    acc = RoundSum(GLOBAL, 3, FedAvgConfig())
    results = feed_interleaved(acc, {s: reply(s, d[s]) for s in d}, chunk)
    assert all(r.error is None for r in results.values())
    mean = acc.mean(set(d))
    assert acc.uploads.undone == {}
    expected = weighted_mean(list(d.values()), [float(SAMPLES[s]) for s in d])
    for name in GLOBAL:
        torch.testing.assert_close(mean[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda d: reply("s1", d, round_idx=2), "is for round 2"),  # a replay of another round
        (lambda d: reply("s1", {"w": d["w"]}), "not the model's 26 values"),  # wrong shape
        # over the norm bound in its first chunk already
        (lambda d: reply("s1", {k: v * 1e6 for k, v in d.items()}), "over the bound"),
        # headers no site would send: empty, and JSON that is not an object
        (lambda d: bytes(8) + bytes(200), "a 0-byte header"),
        (lambda d: (5).to_bytes(8, "little") + b'"abc"' + bytes(200),
         "malformed payload header"),
    ],
    ids=["wrong-round", "wrong-shape", "huge-norm", "empty-header", "string-header"],
)
def test_a_bad_update_is_refused_before_any_of_it_is_summed(bad, reason) -> None:
    d = deltas()
    payloads = {s: reply(s, d[s]) for s in d}
    payloads["s1"] = bad(d["s1"])
    acc = RoundSum(GLOBAL, 3, FedAvgConfig(), max_norm=1e3)
    results = feed_interleaved(acc, payloads, 64)
    assert reason in results["s1"].error and results["s1"].folded == 0
    good = {"s0", "s2"}
    expected = weighted_mean([d["s0"], d["s2"]], [10.0, 60.0])
    mean = acc.mean(good)
    assert acc.uploads.undone == {}  # nothing of s1 was summed: nothing to take back
    for name in GLOBAL:
        torch.testing.assert_close(mean[name], expected[name], rtol=0, atol=1e-6)


def _last_value(value: float) -> Callable[[dict[str, torch.Tensor]], bytes]:
    def make(d: dict[str, torch.Tensor]) -> bytes:
        d = {k: v.clone() for k, v in d.items()}
        d["w"][-1, -1] = value  # the last value sent ("w" sorts after "b")
        return reply("s1", d)
    return make


@pytest.mark.parametrize(
    ("bad", "max_norm", "reason"),
    [
        (_last_value(float("nan")), None, "include NaN or Inf"),
        (_last_value(1e6), 1e3, "over the bound"),  # the norm crosses the bound at the end
        (_last_value(float("inf")), None, "include NaN or Inf"),
    ],
    ids=["nan-late", "huge-norm", "inf-late"],
)
def test_an_update_found_bad_after_part_was_summed_is_taken_back_out(bad, max_norm,
                                                                     reason) -> None:
    d = deltas()
    payloads = {s: reply(s, d[s]) for s in d}
    payloads["s1"] = bad(d["s1"])
    acc = RoundSum(GLOBAL, 3, FedAvgConfig(), max_norm=max_norm)
    results = feed_interleaved(acc, payloads, 64)
    assert reason in results["s1"].error and results["s1"].folded > 0
    mean = acc.mean({"s0", "s2"})  # the round goes on without s1, as buffered
    assert reason in acc.uploads.undone["s1"]
    expected = weighted_mean([d["s0"], d["s2"]], [10.0, 60.0])
    for name in GLOBAL:
        torch.testing.assert_close(mean[name], expected[name], rtol=0, atol=1e-6)


def test_without_undo_logs_a_late_refusal_voids_the_sum() -> None:
    """coordinator.streaming_undo = false: nothing is logged, so the sum cannot be trusted."""
    d = deltas()
    payloads = {s: reply(s, d[s]) for s in d}
    payloads["s1"] = _last_value(float("nan"))(d["s1"])
    acc = RoundSum(GLOBAL, 3, FedAvgConfig(), undo=False)
    results = feed_interleaved(acc, payloads, 64)
    assert results["s1"].folded > 0 and acc.streams[1].log is None
    acc.uploads.settle({"s0", "s2"})
    assert "streaming_undo is off, so the round is void" in acc.uploads.void
    assert acc.uploads.undone == {}


def test_an_upload_that_never_completes_is_taken_back_out(tmp_path: Path) -> None:
    d = deltas()
    acc = RoundSum(GLOBAL, 3, FedAvgConfig(), spill_dir=tmp_path)
    payloads = {s: reply(s, d[s]) for s in d}
    acc.open("s0").write(0, memoryview(payloads["s0"])[: len(payloads["s0"]) - 8])  # vanished
    late = acc.open("s1")  # still uploading when the round is summed
    late.write(0, memoryview(payloads["s1"])[:-8])
    for s in ("s1", "s2"):  # s1's first upload was cut; it sent the whole reply again
        feed_interleaved(acc, {s: payloads[s]}, 64)
    mean = acc.mean({"s1", "s2"})
    assert set(acc.uploads.undone) == {"s0", "s1"}  # s0's part, and s1's unfinished one
    assert os.listdir(tmp_path) == []  # the undo logs are unlinked files
    late.write(len(payloads["s1"]) - 8, memoryview(payloads["s1"])[-8:])
    assert "after the round was summed" in late.close().error  # and it changes nothing
    expected = weighted_mean([d["s1"], d["s2"]], [30.0, 60.0])
    for name in GLOBAL:
        torch.testing.assert_close(mean[name], expected[name], rtol=0, atol=1e-6)


def test_a_streamed_run_gives_the_buffered_result(tmp_path: Path, corpus_file: Path) -> None:
    """In process (gRPC's sink path is the memory test's, below: a whole job over gRPC costs
    a minute of this 2-core machine)."""
    from conftest import tiny_job  # here: the memory test's processes need not import these

    from fedsky.checkpoint import checkpoint_info, load_checkpoint
    from fedsky.config import load_job
    from fedsky.metrics import read_metrics
    from fedsky.runner import run_federated

    job_path = tiny_job(tmp_path, corpus_file, "threads = 1\n")
    out = {}
    for mode, streaming in [("buffered", "false"), ("streamed", "true")]:
        job, job_dir = load_job(job_path, [f'output_dir="{tmp_path / mode}"',
                                           f"coordinator.streaming={streaming}"])
        run_federated(job, job_dir, "inprocess")
        out[mode] = load_checkpoint(tmp_path / mode / "checkpoint.safetensors")[1]
    # The sum is fp32 in arrival order, the buffered mean fp64: they differ in the last bits,
    # which the second round's training carries on (1e-6 is exceeded, 1e-5 is not).
    for name, value in out["buffered"].items():
        torch.testing.assert_close(out["streamed"][name], value, rtol=0, atol=1e-5)
    buffered, streamed = read_metrics(tmp_path / "buffered"), read_metrics(tmp_path / "streamed")
    assert [r["bytes_up"] for r in streamed] == [r["bytes_up"] for r in buffered]
    assert [r["participants"] for r in streamed] == [["a", "b", "c"]] * 2
    assert all(r["sites"][s]["weight"] > 0 for r in streamed for s in "abc")
    # the checkpoint says who contributed to the round it holds
    info = checkpoint_info(tmp_path / "streamed" / "checkpoint.safetensors")
    assert info == {"contributors": ["a", "b", "c"], "dropped": []}


def late_fault(site: str, value: float):
    """The real site factory, but `site` replies with `value` as its update's last value (a
    NaN, or a spike past the norm bound, in the upload's last chunk)."""
    from fedsky.site import site_factory
    from fedsky.wire import unpack

    inner = site_factory()

    def factory(name: str, setup: bytes):
        handler = inner(name, setup)
        if name != site:
            return handler

        def handle(task: bytes) -> bytes:
            tensors, header = unpack(handler(task))
            tensors["v"][-1] = value
            return pack(tensors, header)

        return handle

    return factory


@pytest.mark.parametrize(("value", "reason"), [(float("nan"), "include NaN or Inf"),
                                               (1e6, "over the bound")], ids=["nan", "norm"])
def test_a_run_with_an_update_refused_late_equals_the_buffered_run(
        tmp_path: Path, corpus_file: Path, caplog, value: float, reason: str) -> None:
    from conftest import tiny_job

    from fedsky.checkpoint import load_checkpoint
    from fedsky.config import load_job
    from fedsky.metrics import read_metrics
    from fedsky.runner import run_federated

    job_path = tiny_job(tmp_path, corpus_file, "threads = 1\n", rounds=1)
    out = {}
    for mode in ("buffered", "streamed"):
        # n_embd 160: 1.5 MB updates, so b's last value is in its second 1 MiB piece
        job, job_dir = load_job(job_path, [f'output_dir="{tmp_path / mode}"',
                                           "model.n_embd=160", "coordinator.max_update_norm=1e3",
                                           f"coordinator.streaming={mode == 'streamed'}"])
        with caplog.at_level("INFO", logger="fedsky.coordinator"):
            run_federated(job, job_dir, "inprocess", factory=late_fault("b", value))
        out[mode] = load_checkpoint(tmp_path / mode / "checkpoint.safetensors")[1]
        assert sum(v.numel() for v in out[mode].values()) > 1 << 18
        [rec] = read_metrics(tmp_path / mode)
        assert "skipped" not in rec and rec["participants"] == ["a", "c"], rec
        assert rec["dropped"] == ["b"]
    assert re.search(rf"rejected update from b: .*{reason}", caplog.text)
    assert "the part of b's update already summed was taken back out" in caplog.text
    # The streamed sum is fp32 with b's part added and subtracted, the buffered mean fp64:
    # they agree to the last bits (max |difference| measured: see the report / docs).
    diff = max(float((out["streamed"][k] - v).abs().max()) for k, v in out["buffered"].items())
    print(f"max |streamed - buffered| = {diff:.3g}")
    assert diff <= 1e-6, diff


def test_over_grpc_a_late_nan_and_a_site_killed_mid_upload_leave_the_others_mean(
        tmp_path: Path, corpus_file: Path, caplog) -> None:
    """Four real mutual-TLS sites: a sends a NaN in its last chunk (it is told why), b and d
    are good, c dies after its first 1 MiB chunk. The round is b's and d's weighted mean."""
    from conftest import tiny_job
    from test_faults import RawSite

    from fedsky import certs
    from fedsky.config import load_job
    from fedsky.coordinator import gather_streamed
    from fedsky.transport import frames
    from fedsky.transport.frames import Kind, Message
    from fedsky.transport.grpc_coordinator import GrpcTransport
    from fedsky.transport.grpc_worker import serve_site

    sites = ("a", "b", "c", "d")
    job, _ = load_job(tiny_job(tmp_path, corpus_file, sites=sites), ["training.threads=1"])
    like = {"v": torch.zeros(1 << 19)}  # 2 MiB: two chunks and a bit
    gen = torch.Generator().manual_seed(1)
    deltas = {s: {"v": torch.randn(1 << 19, generator=gen)} for s in sites}
    deltas["a"]["v"][-1] = float("nan")
    samples = {"a": 5, "b": 20, "c": 40, "d": 60}
    payloads = {s: reply(s, deltas[s], 3, samples[s]) for s in sites}
    server, tls = certs.throwaway_pki(tmp_path / "pki", sites, "127.0.0.1")
    transport = GrpcTransport("127.0.0.1", 0, sites, tls=server, rejoin_wait_s=0.5)
    address = f"127.0.0.1:{transport.port}"
    raw = RawSite(transport.port, tls["c"], "c")

    def die_mid_upload() -> None:
        task = raw.next_kind(Kind.TASK)
        msg = Message(Kind.REPLY, "c", task.round_idx, payload=payloads["c"], nonce=task.nonce)
        raw.send(list(frames.to_frames(msg, 1 << 20))[:1])  # 1 MiB of 2
        raw.outbox.put(None)  # its stream ends there, after that chunk was delivered

    with ThreadPoolExecutor(4) as pool, caplog.at_level("INFO"):
        for s in ("a", "b", "d"):
            pool.submit(serve_site, address, s,
                        lambda name, setup: lambda task: payloads[name], tls=tls[s])
        try:
            assert sorted(transport.start(list(sites), b"")) == list(sites)
            raw.next_kind(Kind.WELCOME)
            pool.submit(die_mid_upload)
            updates, got = gather_streamed(job, transport, 3, dict.fromkeys(sites, b"go"), like,
                                           tmp_path)
        finally:
            transport.close()
            raw.close()
    assert "site c: upload cut off after 1048576 of" in caplog.text
    assert [u.site for u in updates] == ["b", "d"] and got["dropped"] == ["c", "a"]
    assert re.search(r"site a: the coordinator rejected its reply for round 3: .*NaN",
                     caplog.text)  # a was told why
    assert "the part of a's update already summed was taken back out" in caplog.text
    assert "the part of c's update already summed was taken back out" in caplog.text
    expected = weighted_mean([deltas["b"], deltas["d"]], [20.0, 60.0])["v"]
    torch.testing.assert_close(got["mean"]["v"], expected, rtol=0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if "undo" in p.name] == []


# ---- the coordinator's memory, measured in a real process ---------------------------------

N_VALUES = 32 << 20  # 128 MiB of fp32 per site
SITES = ("s0", "s1", "s2")


def _coordinator(pki: str, port_file: str, streaming: bool) -> None:
    from fedsky.certs import throwaway_pki
    from fedsky.transport.grpc_coordinator import GrpcTransport

    like = {"v": torch.zeros(N_VALUES)}
    server, _ = throwaway_pki(Path(pki), SITES, "127.0.0.1")
    transport = GrpcTransport("127.0.0.1", 0, SITES, tls=server, join_timeout_s=120)
    Path(port_file).write_text(str(transport.port))
    assert transport.start(list(SITES), b"") == list(SITES)
    idle = _peak_rss_mb()
    acc = RoundSum(like, 3, FedAvgConfig()) if streaming else None
    started = time.perf_counter()
    got = transport.exchange(3, {s: b"go" for s in SITES}, 600,
                             sink=acc.open if acc else None)
    seconds = time.perf_counter() - started
    assert sorted(got) == list(SITES)
    mean = acc.mean(set(SITES))["v"] if acc else None
    transport.close()
    print(json.dumps({"idle_mb": idle, "peak_mb": _peak_rss_mb(), "seconds": seconds,
                      "mean": None if mean is None else [float(mean.min()), float(mean.max())]}))


def _site(pki: str, port: int, site: str) -> None:
    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site

    i = SITES.index(site)
    payload = reply(site, {"v": torch.full((N_VALUES,), float(i + 1))})
    tls = TlsFiles(f"{pki}/ca.pem", f"{pki}/sites/{site}.pem", f"{pki}/sites/{site}.key")
    serve_site(f"127.0.0.1:{port}", site, lambda name, setup: lambda task: payload, tls=tls)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _measure(tmp_path: Path, streaming: bool) -> dict:
    me = [sys.executable, __file__]
    port_file = tmp_path / f"port-{streaming}"
    # glibc keeps freed chunk buffers in per-thread arenas (tens of MB with three reader
    # threads); docs/deployment.md sets the same for a coordinator that streams.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    coord = subprocess.Popen([*me, "coordinator", str(tmp_path / "pki"), str(port_file),
                              str(int(streaming))], stdout=subprocess.PIPE, text=True, env=env)
    while not port_file.exists() or not port_file.read_text():
        assert coord.poll() is None, "the coordinator died"
        time.sleep(0.05)
    sites = [subprocess.Popen([*me, "site", str(tmp_path / "pki"), port_file.read_text(), s])
             for s in SITES]
    out, _ = coord.communicate(timeout=600)
    for s in sites:
        s.wait(timeout=60)
    assert coord.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_the_coordinator_holds_one_sum_not_one_update_per_site(tmp_path: Path) -> None:
    update_mb = 4 * N_VALUES / (1 << 20)
    streamed = _measure(tmp_path, streaming=True)
    # sum_k n_k * (k + 1) / sum_k n_k with n = 10, 30, 60: (10 + 60 + 180) / 100 = 2.5
    assert streamed["mean"] == [2.5, 2.5]
    # The sum (1x) and what is in flight: gRPC's HTTP/2 windows, which its BDP probing grows
    # to tens of MB per stream on a fast link (65 to 105 MB in all measured here; 22 MB with
    # the probing off). Buffering the three updates instead grows it by over 3x (5.4x
    # measured with `_measure(tmp_path, streaming=False)`: 520 MB for 96 MiB updates).
    grown = streamed["peak_mb"] - streamed["idle_mb"]
    assert grown < update_mb + 128, streamed


if __name__ == "__main__":  # the processes of the memory test
    role, *args = sys.argv[1:]
    if role == "coordinator":
        _coordinator(args[0], args[1], bool(int(args[2])))
    else:
        _site(args[0], int(args[1]), args[2])
