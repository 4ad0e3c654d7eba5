"""The coordinator's peak memory in one masked (secure) round: streamed vs buffered.

    python bench/secure_stream_rss.py [--params 16e6] [--bits 32]

A coordinator process runs one real secure round (`secure_round.run_secure_round`: keys,
sealed shares, masked replies, unmask) over the gRPC transport with mutual TLS against 3 site
processes, each masking a random update of N values with the real site code
(`fedsky.secure_site`). `streamed`: `coordinator.streaming` (each masked reply summed as it
arrives, `fedsky.streaming_masked`); `buffered`: every masked reply held whole, then summed
(the baseline, measured in the same run). The coordinator's peak RSS is its VmHWM, its idle
RSS taken after the sites joined (it holds the N-value global model then). Prints one JSON
object per mode, then the ratio of what each grew by.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = ("s0", "s1", "s2")


def job(bits: int, streaming: bool):
    from fedsky.config import parse_job

    return parse_job({
        "name": "rss", "seed": 1, "rounds": 1,
        "data": {"format": "text", "train": "unused.txt"},
        "sites": [{"name": s} for s in SITES],
        "secure": {"bits": bits},
        "coordinator": {"streaming": streaming, "round_deadline_s": 600.0},
    })


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def coordinator(n: int, bits: int, streaming: bool, pki: str, port_file: str) -> None:
    import torch

    from fedsky.certs import throwaway_pki
    from fedsky.secure_round import run_secure_round
    from fedsky.transport.grpc_coordinator import GrpcTransport
    from fedsky.wire import pack

    server, _ = throwaway_pki(Path(pki), SITES, "127.0.0.1")
    transport = GrpcTransport("127.0.0.1", 0, SITES, tls=server, join_timeout_s=120)
    Path(port_file).write_text(str(transport.port))
    assert transport.start(list(SITES), b"") == list(SITES)
    like = {"v": torch.zeros(n)}
    idle = peak_rss_mb()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as spill:
        out = run_secure_round(job(bits, streaming), transport, 0,
                               {s: pack({}, {"round": 0}) for s in SITES}, like,
                               streamed=streaming, spill_dir=Path(spill))
    seconds = time.perf_counter() - started
    transport.close()
    assert out.failed is None, out.failed
    mean = out.mean["v"]
    # sites send (k + 1) / 100 everywhere with weights 1, 2, 3: (1 + 4 + 9) / 6 / 100
    assert abs(float(mean.min()) - 14 / 600) < 1e-4 and abs(float(mean.max()) - 14 / 600) < 1e-4
    print(json.dumps({"mode": "streamed" if streaming else "buffered", "params": n,
                      "bits": bits, "idle_mb": round(idle, 1), "peak_mb": round(peak_rss_mb(), 1),
                      "seconds": round(seconds, 2)}))


def site(n: int, bits: int, name: str, pki: str, port: str) -> None:
    import torch

    from fedsky import secure_site
    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site
    from fedsky.wire import unpack

    cfg = job(bits, False)
    k = SITES.index(name)
    state: dict = {}

    def handle(task: bytes) -> bytes:
        tensors, header = unpack(task)
        phase = header.get("phase", "train")
        if phase == "train":
            state["p"] = secure_site.PendingRound(
                0, {"v": torch.full((n,), (k + 1) / 100)}, math.log(k + 1))
            return secure_site.keys_reply(cfg, name, state["p"],
                                          {"tokens": 1, "compute_s": "0"})
        if phase == "shares":
            return secure_site.shares_reply(cfg, name, state["p"], header)
        if phase == "masked":
            return secure_site.masked_reply(cfg, name, state["p"], header, None, k)
        return secure_site.unmask_reply(cfg, name, state["p"], header, tensors, None)

    tls = TlsFiles(f"{pki}/ca.pem", f"{pki}/sites/{name}.pem", f"{pki}/sites/{name}.key")
    serve_site(f"127.0.0.1:{port}", name, lambda site, setup: handle, tls=tls)


def measure(n: int, bits: int, streaming: bool, tmp: Path) -> dict:
    import os

    me = [sys.executable, __file__]
    port_file = tmp / f"port-{streaming}"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    coord = subprocess.Popen([*me, "--role", "coordinator", "--params", str(n), "--bits",
                              str(bits), "--streaming", str(int(streaming)), "--pki",
                              str(tmp / "pki"), "--port-file", str(port_file)],
                             stdout=subprocess.PIPE, text=True, env=env)
    while not port_file.exists() or not port_file.read_text():
        assert coord.poll() is None, "the coordinator died"
        time.sleep(0.05)
    sites = [subprocess.Popen([*me, "--role", "site", "--params", str(n), "--bits", str(bits),
                               "--name", s, "--pki", str(tmp / "pki"), "--port",
                               port_file.read_text()]) for s in SITES]
    out, _ = coord.communicate(timeout=900)
    for p in sites:
        p.wait(timeout=60)
    assert coord.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=16e6)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--role", default="main")
    ap.add_argument("--streaming", type=int, default=0)
    ap.add_argument("--pki", default="")
    ap.add_argument("--port-file", default="")
    ap.add_argument("--port", default="")
    ap.add_argument("--name", default="")
    opts = ap.parse_args()
    n = int(opts.params)
    if opts.role == "coordinator":
        coordinator(n, opts.bits, bool(opts.streaming), opts.pki, opts.port_file)
        return
    if opts.role == "site":
        site(n, opts.bits, opts.name, opts.pki, opts.port)
        return
    with tempfile.TemporaryDirectory() as tmp:
        got = {m: measure(n, opts.bits, m == "streamed", Path(tmp))
               for m in ("buffered", "streamed")}
    for rec in got.values():
        print(json.dumps(rec))
    grown = {m: r["peak_mb"] - r["idle_mb"] for m, r in got.items()}
    print(json.dumps({"masked_vector_mb": round(n * opts.bits / 8 / 2**20, 1),
                      "grown_mb": {m: round(g, 1) for m, g in grown.items()},
                      "streamed_over_buffered": round(grown["streamed"] / grown["buffered"], 3)}))


if __name__ == "__main__":
    main()
