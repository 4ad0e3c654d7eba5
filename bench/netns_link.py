"""Coordinator and sites on separate network stacks, joined by veth links shaped with `tc tbf`.

    sudo python bench/netns_link.py --sites 2 --rate-mbit 200 --update-mb 64

Each site runs in its own network namespace, joined to the coordinator's (this process's) by
a veth pair whose both ends are shaped by a token bucket (`tc qdisc ... tbf`), so every byte
crosses a real, rate-limited link with its own addresses: what a cross-cloud deployment looks
like to the transport, on one machine. The coordinator (mutual TLS, `GrpcTransport`) asks
every site for one update of `--update-mb` and folds it as it streams in (`RoundSum`);
prints JSON with the goodput per link next to the shaped rate. Needs root and `ip netns`;
anything else exits with the reason (status 0: skipped, not failed). Namespaces and links
are removed on the way out, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def site_main(address: str, site: str, pki: str, n_values: int) -> None:
    """Runs inside a site's namespace: serve one plain fp32 update."""
    import torch

    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site
    from fedsky.wire import pack

    payload = pack({"v": torch.full((n_values,), 0.5)},
                   {"round": 0, "site": site, "codec": {}, "num_samples": 1})
    tls = TlsFiles(f"{pki}/ca.pem", f"{pki}/sites/{site}.pem", f"{pki}/sites/{site}.key")
    serve_site(address, site, lambda name, setup: lambda task: payload, tls=tls)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "site":
        site_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=200.0)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="tbf queue limit")
    parser.add_argument("--update-mb", type=float, default=64.0)
    opts = parser.parse_args()
    why = usable()
    if why is not None:
        print(json.dumps({"skipped": why}))
        return

    import torch

    from fedsky import certs
    from fedsky.config import FedAvgConfig
    from fedsky.streaming import RoundSum
    from fedsky.transport.grpc_coordinator import GrpcTransport

    n_values = int(opts.update_mb * (1 << 20) / 4)
    names = [f"site{k}" for k in range(opts.sites)]
    procs: list[subprocess.Popen] = []
    try:
        links = [link_up(k, opts.rate_mbit, opts.latency_ms) for k in range(opts.sites)]
        with tempfile.TemporaryDirectory() as tmp:
            # provisioned as `fedsky certs` does: the coordinator's certificate names every
            # address a site dials
            pki = Path(tmp)
            certs.init_ca(pki, "fedsky netns bench")
            certs.issue_coordinator(pki, [here for _, here in links])
            for name in names:
                certs.issue_site(pki, name)
            server = certs.TlsFiles(str(pki / "ca.pem"), str(pki / "coordinator.pem"),
                                    str(pki / "coordinator.key"), str(pki / "revoked.txt"))
            transport = GrpcTransport("0.0.0.0", 0, names, tls=server, join_timeout_s=300)
            for name, (ns, here) in zip(names, links):
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, __file__, "site",
                     f"{here}:{transport.port}", name, tmp, str(n_values)]))
            assert transport.start(names, b"") == names, "not every site joined"
            acc = RoundSum({"v": torch.empty(n_values)}, 0, FedAvgConfig())
            started = time.perf_counter()
            got = transport.exchange(0, {s: b"go" for s in names}, 3600, sink=acc.open)
            seconds = time.perf_counter() - started
            transport.close()
        assert sorted(got) == names and all(r.error is None for r in got.values()), got
        assert float(acc.mean(set(names))["v"][-1]) == 0.5
        mbit = 8 * got[names[0]].size / 1e6 / seconds  # every link moved one update
        print(json.dumps({"sites": opts.sites, "update_mb": opts.update_mb,
                          "tbf_rate_mbit": opts.rate_mbit, "seconds": round(seconds, 2),
                          "goodput_per_link_mbit": round(mbit, 1),
                          "goodput_vs_tbf_rate": round(mbit / opts.rate_mbit, 3)}))
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for k in range(opts.sites):
            link_down(k)


if __name__ == "__main__":
    main()
