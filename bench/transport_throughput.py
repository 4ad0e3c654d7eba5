"""One round's uploads over the gRPC transport vs a raw TCP socket, and the coordinator's memory.

    python bench/transport_throughput.py --params 100e6,400e6

For each size, 3 site processes each send one update of that many float32 parameters to a
coordinator process on loopback, first over plain TCP sockets (the baseline: the receiver
keeps each site's bytes in a preallocated buffer), then over fedsky's gRPC transport with
mutual TLS (`GrpcTransport.exchange`, the real code path: chunks, CRC-32s, reassembly). Both
are timed from the moment the coordinator asks to the moment it holds every byte. The
coordinator's peak RSS is its VmHWM. Prints one JSON object per size, then a summary.
Targets (issue 9): gRPC >= 70% of the raw socket; peak RSS <= 1.5 x model + 256 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SITES = ("s0", "s1", "s2")
MB = 1 << 20


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def payload(n_bytes: int) -> bytes:
    """Incompressible-looking bytes, made fast (a repeated random MiB)."""
    block = os.urandom(MB)
    return (block * (n_bytes // MB + 1))[:n_bytes]


# ---- raw TCP ------------------------------------------------------------------------------

def tcp_receiver(n_bytes: int, port_file: str) -> None:
    """Accept one connection per site and read its whole update into its own buffer."""
    server = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(server.getsockname()[1]))
    conns = []
    for _ in SITES:
        conn, _ = server.accept()
        conns.append(conn)
    buffers = [bytearray(n_bytes) for _ in SITES]

    def read(conn: socket.socket, buf: bytearray) -> None:
        view, got = memoryview(buf), 0
        while got < n_bytes:
            got += conn.recv_into(view[got:], min(n_bytes - got, 4 * MB))

    started = time.perf_counter()
    for conn in conns:
        conn.sendall(b"go")  # the round starts: every site may send now
    threads = [threading.Thread(target=read, args=(c, b)) for c, b in zip(conns, buffers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb()}))


def tcp_sender(n_bytes: int, port: int) -> None:
    data = payload(n_bytes)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.recv(2)
        conn.sendall(data)


# ---- gRPC ---------------------------------------------------------------------------------

def grpc_coordinator(n_bytes: int, pki_dir: str, port_file: str) -> None:
    from fedsky.certs import throwaway_pki
    from fedsky.transport.grpc_coordinator import GrpcTransport

    server, _ = throwaway_pki(Path(pki_dir), SITES, "127.0.0.1")
    transport = GrpcTransport("127.0.0.1", 0, SITES, tls=server, join_timeout_s=300)
    Path(port_file).write_text(str(transport.port))
    assert transport.start(list(SITES), b"") == list(SITES)
    idle_mb = peak_rss_mb()
    started = time.perf_counter()
    replies = transport.exchange(0, {s: b"go" for s in SITES}, deadline_s=3600)
    elapsed = time.perf_counter() - started
    assert sorted(replies) == list(SITES) and all(len(r) == n_bytes for r in replies.values())
    transport.close()
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb(), "idle_rss_mb": idle_mb}))


def grpc_site(n_bytes: int, pki_dir: str, port: int, site: str) -> None:
    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site

    pki = Path(pki_dir)
    tls = TlsFiles(str(pki / "ca.pem"), str(pki / "sites" / f"{site}.pem"),
                   str(pki / "sites" / f"{site}.key"))
    data = payload(n_bytes)
    serve_site(f"127.0.0.1:{port}", site, lambda name, setup: lambda task: data, tls=tls)


# ---- driver -------------------------------------------------------------------------------

def _me(*args: object) -> list[str]:
    return [sys.executable, __file__, *map(str, args)]


def _wait_port(path: Path) -> int:
    while not path.exists() or not path.read_text():
        time.sleep(0.05)
    return int(path.read_text())


def measure(kind: str, n_bytes: int, tmp: Path) -> dict:
    port_file = tmp / f"{kind}.port"
    pki = tmp / "pki"
    if kind == "tcp":
        coord = subprocess.Popen(_me("tcp-receiver", n_bytes, port_file), stdout=subprocess.PIPE)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("tcp-sender", n_bytes, port)) for _ in SITES]
    else:
        coord = subprocess.Popen(_me("grpc-coordinator", n_bytes, pki, port_file),
                                 stdout=subprocess.PIPE)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("grpc-site", n_bytes, pki, port, s)) for s in SITES]
    out, _ = coord.communicate()
    for s in sites:
        s.wait()
    if coord.returncode != 0:
        raise SystemExit(f"{kind} coordinator failed")
    return json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--"):
        role, *args = sys.argv[1:]
        {"tcp-receiver": lambda: tcp_receiver(int(args[0]), args[1]),
         "tcp-sender": lambda: tcp_sender(int(args[0]), int(args[1])),
         "grpc-coordinator": lambda: grpc_coordinator(int(args[0]), args[1], args[2]),
         "grpc-site": lambda: grpc_site(int(args[0]), args[1], int(args[2]), args[3]),
         }[role]()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100e6,400e6",
                        help="comma-separated parameter counts (float32 each)")
    opts = parser.parse_args()
    results = []
    for n_params in (int(float(p)) for p in opts.params.split(",")):
        n_bytes = 4 * n_params
        with tempfile.TemporaryDirectory() as tmp:
            tcp = measure("tcp", n_bytes, Path(tmp))
            grpc = measure("grpc", n_bytes, Path(tmp))
        total_mb = len(SITES) * n_bytes / MB
        model_mb = n_bytes / MB
        row = {
            "params": n_params,
            "sites": len(SITES),
            "update_mb": round(model_mb, 1),
            "raw_tcp_mb_s": round(total_mb / tcp["seconds"], 1),
            "grpc_mb_s": round(total_mb / grpc["seconds"], 1),
            "grpc_vs_tcp": round(tcp["seconds"] / grpc["seconds"], 3),
            "grpc_seconds": round(grpc["seconds"], 2),
            "tcp_seconds": round(tcp["seconds"], 2),
            "coordinator_peak_rss_mb": round(grpc["peak_rss_mb"], 1),
            "coordinator_idle_rss_mb": round(grpc["idle_rss_mb"], 1),
            "tcp_receiver_peak_rss_mb": round(tcp["peak_rss_mb"], 1),
            "rss_target_mb": round(1.5 * model_mb + 256, 1),
            "rss_vs_model": round(grpc["peak_rss_mb"] / model_mb, 2),
        }
        row["meets_throughput_target"] = row["grpc_vs_tcp"] >= 0.7
        row["meets_rss_target"] = row["coordinator_peak_rss_mb"] <= row["rss_target_mb"]
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"summary": results}, indent=2))


if __name__ == "__main__":
    main()
