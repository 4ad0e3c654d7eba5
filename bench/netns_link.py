"""Coordinator and sites on separate network stacks, joined by veth links shaped with `tc tbf`.

    sudo python bench/netns_link.py --sites 3 --rates-mbit 200,1000,2500 --update-mb 64

Each site runs in its own network namespace, joined to the coordinator's (this process's) by
a veth pair whose both ends are shaped by a token bucket (`tc qdisc ... tbf`), so every byte
crosses a real, rate-limited link with its own addresses: what a cross-cloud deployment looks
like to the transport, on one machine. The coordinator (mutual TLS, `GrpcTransport`) asks
every site for one update of `--update-mb` and folds it as it streams in (`RoundSum`). The
baseline, measured over the same links in the same run: each site sends the same bytes over a
bare TCP socket. Prints JSON per rate with both goodputs per link, their ratio, and each
against the shaped rate: where fedsky stays near the raw socket, and from which link speed
its CPU cost (TLS, gRPC, checks) shows. Needs root and `ip netns`;
anything else exits with the reason (status 0: skipped, not failed). Namespaces and links
are removed on the way out, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = f"fsk{os.getpid() % 100000}"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def usable() -> str | None:
    """Why this machine cannot run the harness (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"{PREFIX}probe"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as err:
        return f"`ip netns` does not work here: {err}"
    return None


def link_up(k: int, rate_mbit: float, latency_ms: float) -> tuple[str, str]:
    """Namespace k joined to ours by a shaped veth; returns (its name, our address)."""
    ns, ours, theirs = f"{PREFIX}s{k}", f"{PREFIX}c{k}", f"{PREFIX}p{k}"
    here, there = f"10.213.{k}.1", f"10.213.{k}.2"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs)
    sh("ip", "link", "set", theirs, "netns", ns)
    sh("ip", "addr", "add", f"{here}/30", "dev", ours)
    sh("ip", "link", "set", ours, "up")
    sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{there}/30", "dev", theirs)
    sh("ip", "netns", "exec", ns, "ip", "link", "set", theirs, "up")
    sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    burst = f"{max(32, int(rate_mbit * 1000 / 8 / 100))}kb"  # ~10 ms of traffic
    shape = ["tbf", "rate", f"{rate_mbit}mbit", "burst", burst, "latency", f"{latency_ms}ms"]
    sh("tc", "qdisc", "add", "dev", ours, "root", *shape)
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", theirs, "root", *shape)
    return ns, here


def link_down(k: int) -> None:
    for cmd in (["ip", "link", "del", f"{PREFIX}c{k}"], ["ip", "netns", "del", f"{PREFIX}s{k}"]):
        subprocess.run(cmd, check=False, capture_output=True)  # already gone is fine


def site_main(kind: str, address: str, site: str, pki: str, n_values: int) -> None:
    """Runs inside a site's namespace: send one plain fp32 update, over fedsky's gRPC
    transport (`grpc`) or a bare TCP socket (`tcp`, the baseline: the same bytes)."""
    import torch

    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site
    from fedsky.wire import pack

    payload = pack({"v": torch.full((n_values,), 0.5)},
                   {"round": 0, "site": site, "codec": {}, "num_samples": 1})
    if kind == "tcp":
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as conn:
            conn.recv(2)  # "go": the round starts
            conn.sendall(payload)  # then closed: the coordinator reads to the end
        return
    tls = TlsFiles(f"{pki}/ca.pem", f"{pki}/sites/{site}.pem", f"{pki}/sites/{site}.key")
    serve_site(address, site, lambda name, setup: lambda task: payload, tls=tls)


def _spawn(kind: str, links: list[tuple[str, str]], names: list[str], port: int, pki: str,
           n_values: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, "site", kind,
                              f"{here}:{port}", name, pki, str(n_values)])
            for name, (ns, here) in zip(names, links)]


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def raw_tcp(links: list[tuple[str, str]], names: list[str], n_values: int,
            pki: str) -> tuple[float, int]:
    """Seconds for every site to send its update's bytes over a bare TCP socket, and the
    bytes one site sent."""
    server = socket.create_server(("0.0.0.0", 0))
    procs = _spawn("tcp", links, names, server.getsockname()[1], pki, n_values)
    try:
        conns = [server.accept()[0] for _ in names]
        n_bytes = [0] * len(conns)

        def read(k: int) -> None:
            buf = memoryview(bytearray(4 << 20))
            while got := conns[k].recv_into(buf):  # to the end: the site closes when done
                n_bytes[k] += got

        threads = [threading.Thread(target=read, args=(k,)) for k in range(len(conns))]
        started = time.perf_counter()
        for conn in conns:
            conn.sendall(b"go")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        for conn in conns:
            conn.close()
        return seconds, n_bytes[0]
    finally:
        server.close()
        _reap(procs)


def fedsky_grpc(links: list[tuple[str, str]], names: list[str], n_values: int,
                pki: Path) -> tuple[float, int]:
    """Seconds for fedsky's transport (mutual TLS, streamed into a RoundSum) to take one update
    from every site, and the payload size."""
    import torch

    from fedsky import certs
    from fedsky.config import FedAvgConfig
    from fedsky.streaming import RoundSum
    from fedsky.transport.grpc_coordinator import GrpcTransport

    server = certs.TlsFiles(str(pki / "ca.pem"), str(pki / "coordinator.pem"),
                            str(pki / "coordinator.key"), str(pki / "revoked.txt"))
    transport = GrpcTransport("0.0.0.0", 0, names, tls=server, join_timeout_s=300)
    procs = _spawn("grpc", links, names, transport.port, str(pki), n_values)
    try:
        assert transport.start(names, b"") == names, "not every site joined"
        acc = RoundSum({"v": torch.empty(n_values)}, 0, FedAvgConfig())
        started = time.perf_counter()
        got = transport.exchange(0, {s: b"go" for s in names}, 3600, sink=acc.open)
        seconds = time.perf_counter() - started
        transport.close()
    finally:
        _reap(procs)
    assert sorted(got) == names and all(r.error is None for r in got.values()), got
    assert float(acc.mean(set(names))["v"][-1]) == 0.5
    return seconds, got[names[0]].size


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "site":
        site_main(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rates-mbit", default="200",
                        help="comma-separated tbf rates, each measured on its own links")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="tbf queue limit")
    parser.add_argument("--update-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each transport per rate, alternating; medians reported")
    opts = parser.parse_args()
    why = usable()
    if why is not None:
        print(json.dumps({"skipped": why}))
        return

    from fedsky import certs

    n_values = int(opts.update_mb * (1 << 20) / 4)
    names = [f"site{k}" for k in range(opts.sites)]
    rows = []
    for rate in (float(r) for r in opts.rates_mbit.split(",")):
        try:
            links = [link_up(k, rate, opts.latency_ms) for k in range(opts.sites)]
            with tempfile.TemporaryDirectory() as tmp:
                # provisioned as `fedsky certs` does: the coordinator's certificate names
                # every address a site dials
                pki = Path(tmp)
                certs.init_ca(pki, "fedsky netns bench")
                certs.issue_coordinator(pki, [here for _, here in links])
                for name in names:
                    certs.issue_site(pki, name)
                tcp_s, grpc_s = [], []
                for _ in range(opts.repeats):
                    seconds, tcp_bytes = raw_tcp(links, names, n_values, tmp)
                    tcp_s.append(seconds)
                    seconds, size = fedsky_grpc(links, names, n_values, pki)
                    grpc_s.append(seconds)
        finally:
            for k in range(opts.sites):
                link_down(k)
        assert tcp_bytes == size, (tcp_bytes, size)  # the same bytes both ways
        tcp_mbit = 8 * tcp_bytes / 1e6 / statistics.median(tcp_s)  # per link
        grpc_mbit = 8 * size / 1e6 / statistics.median(grpc_s)
        row = {"sites": opts.sites, "update_mb": opts.update_mb, "tbf_rate_mbit": rate,
               "repeats": opts.repeats, "raw_tcp_mbit_per_link": round(tcp_mbit, 1),
               "fedsky_mbit_per_link": round(grpc_mbit, 1),
               "raw_tcp_vs_tbf_rate": round(tcp_mbit / rate, 3),
               "fedsky_vs_tbf_rate": round(grpc_mbit / rate, 3),
               "fedsky_vs_raw_tcp": round(statistics.median(
                   [t / g for t, g in zip(tcp_s, grpc_s)]), 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"summary": rows}, indent=2))


if __name__ == "__main__":
    main()
