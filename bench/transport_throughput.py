"""One round's uploads over the gRPC transport vs a raw TCP socket, and the coordinator's memory.

    python bench/transport_throughput.py --params 100e6,400e6 [--modes tcp,streamed,buffered]

For each size, 3 site processes each send one update of that many float32 parameters to a
coordinator process on loopback (the same number of bytes in every mode):
- `tcp`, the baseline: plain TCP sockets, the receiver reading each site's bytes into a 4 MiB
  buffer it reuses (the raw socket's ceiling: no TLS, no framing, nothing kept);
- `streamed`: fedsky's gRPC transport with mutual TLS (`GrpcTransport.exchange`, the real code
  path: chunks, CRC-32s, offsets) with streaming aggregation: each site's payload is a real
  update (`wire.pack`), folded into one running sum (`fedsky.streaming.RoundSum`: header
  checks, finite and digest checks, the weighted add) as its chunks arrive;
- `buffered`: the same transport reassembling every site's whole payload (no aggregation).
Each is timed from the moment the coordinator asks to the moment it holds (or has summed) every
byte. The coordinator's peak RSS is its VmHWM; its idle RSS is taken after the sites joined.
The streamed coordinator holds the sum, not a global model (a real coordinator also holds
that: one more model's worth). Prints one JSON object per size, then a summary. Targets
(issue 9): gRPC >= 70% of the raw socket; peak RSS <= 1.5 x model + 256 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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
    """Accept one connection per site and read its whole update, 4 MiB at a time."""
    server = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(server.getsockname()[1]))
    conns = []
    for _ in SITES:
        conn, _ = server.accept()
        conns.append(conn)
    buffers = [bytearray(4 * MB) for _ in SITES]

    def read(conn: socket.socket, buf: bytearray) -> None:
        view, got = memoryview(buf), 0
        while got < n_bytes:
            got += conn.recv_into(view, min(n_bytes - got, 4 * MB))

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

def grpc_coordinator(n_params: int, pki_dir: str, port_file: str, mode: str,
                     chunk_bytes: int) -> None:
    import torch

    from fedsky.certs import throwaway_pki
    from fedsky.config import FedAvgConfig
    from fedsky.streaming import RoundSum
    from fedsky.transport.grpc_coordinator import GrpcTransport

    server, _ = throwaway_pki(Path(pki_dir), SITES, "127.0.0.1")
    transport = GrpcTransport("127.0.0.1", 0, SITES, tls=server, join_timeout_s=600,
                              chunk_bytes=chunk_bytes)
    Path(port_file).write_text(str(transport.port))
    assert transport.start(list(SITES), b"") == list(SITES)
    # The model's shape only; never touched, so it takes no memory (the sum does).
    acc = RoundSum({"v": torch.empty(n_params)}, 0, FedAvgConfig()) if mode == "streamed" else None
    idle_mb = peak_rss_mb()
    started = time.perf_counter()
    replies = transport.exchange(0, {s: b"go" for s in SITES}, deadline_s=3600,
                                 sink=None if acc is None else acc.open)
    elapsed = time.perf_counter() - started
    assert sorted(replies) == list(SITES)
    if acc is not None:
        assert all(r.error is None for r in replies.values()), replies
        mean = acc.mean(set(SITES))["v"]
        # sites send (k + 1) / 1000 with weights 1, 2, 3 (their num_samples): 14/6 / 1000
        assert abs(float(mean[0]) - 14 / 6000) < 1e-6 and abs(float(mean[-1]) - 14 / 6000) < 1e-6
        size = replies["s0"].size
    else:
        size = len(replies["s0"])
    transport.close()
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb(), "idle_rss_mb": idle_mb,
                      "payload_bytes": size}))


def update_payload(n_params: int, site: str) -> bytes:
    """A real plain-fp32 update of `n_params` values, as `fedsky.site` packs it."""
    import torch

    from fedsky.wire import pack

    k = SITES.index(site)
    delta = torch.full((n_params,), (k + 1) / 1000)
    blob = pack({"v": delta}, {"round": 0, "site": site, "codec": {}, "num_samples": k + 1})
    del delta
    return blob


def grpc_site(n_params: int, pki_dir: str, port: int, site: str, chunk_bytes: int) -> None:
    from fedsky.certs import TlsFiles
    from fedsky.transport.grpc_worker import serve_site

    pki = Path(pki_dir)
    tls = TlsFiles(str(pki / "ca.pem"), str(pki / "sites" / f"{site}.pem"),
                   str(pki / "sites" / f"{site}.key"))
    data = update_payload(n_params, site)
    serve_site(f"127.0.0.1:{port}", site, lambda name, setup: lambda task: data, tls=tls,
               chunk_bytes=chunk_bytes)


# ---- driver -------------------------------------------------------------------------------

def _me(*args: object) -> list[str]:
    return [sys.executable, __file__, *map(str, args)]


def _wait_port(path: Path) -> int:
    while not path.exists() or not path.read_text():
        time.sleep(0.05)
    return int(path.read_text())


def measure(kind: str, n_params: int, tmp: Path, chunk_bytes: int) -> dict:
    port_file = tmp / f"{kind}.port"
    port_file.unlink(missing_ok=True)  # a repeat: not the last run's port
    pki = tmp / "pki"
    n_bytes = len(update_payload(1, "s0")) - 4 + 4 * n_params  # what gRPC moves per site
    # glibc would keep freed chunk buffers in per-thread arenas (see docs/deployment.md)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if kind == "tcp":
        coord = subprocess.Popen(_me("tcp-receiver", n_bytes, port_file), stdout=subprocess.PIPE)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("tcp-sender", n_bytes, port)) for _ in SITES]
    else:
        coord = subprocess.Popen(_me("grpc-coordinator", n_params, pki, port_file, kind,
                                     chunk_bytes), stdout=subprocess.PIPE, env=env)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("grpc-site", n_params, pki, port, s, chunk_bytes))
                 for s in SITES]
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
         "grpc-coordinator": lambda: grpc_coordinator(int(args[0]), args[1], args[2], args[3],
                                                      int(args[4])),
         "grpc-site": lambda: grpc_site(int(args[0]), args[1], int(args[2]), args[3],
                                        int(args[4])),
         }[role]()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100e6,400e6",
                        help="comma-separated parameter counts (float32 each)")
    parser.add_argument("--modes", default="tcp,streamed,buffered",
                        help="which of tcp, streamed, buffered to run (tcp is the baseline)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20,
                        help="transport.chunk_bytes for both ends")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each mode, alternating; medians are reported")
    opts = parser.parse_args()
    modes = opts.modes.split(",")
    results = []
    for n_params in (int(float(p)) for p in opts.params.split(",")):
        model_mb = 4 * n_params / MB
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(opts.repeats):
                for mode in modes:  # alternating, so drift in the machine's load hits all
                    runs[mode].append(measure(mode, n_params, Path(tmp), opts.chunk_bytes))
        row: dict = {"params": n_params, "sites": len(SITES), "update_mb": round(model_mb, 1),
                     "chunk_bytes": opts.chunk_bytes, "repeats": opts.repeats,
                     "rss_target_mb": round(1.5 * model_mb + 256, 1)}
        med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
        for mode, rs in runs.items():
            row[f"{mode}_seconds"] = round(med[mode], 2)
            row[f"{mode}_mb_s"] = round(len(SITES) * model_mb / med[mode], 1)
            row[f"{mode}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs), 1)
            if mode != "tcp":
                row[f"{mode}_idle_rss_mb"] = round(max(r["idle_rss_mb"] for r in rs), 1)
                if "tcp" in runs:  # per repeat: each gRPC run against the TCP run beside it
                    ratios = [t["seconds"] / g["seconds"] for t, g in zip(runs["tcp"], rs)]
                    row[f"{mode}_vs_tcp"] = round(statistics.median(ratios), 3)
                    row[f"{mode}_meets_throughput_target"] = row[f"{mode}_vs_tcp"] >= 0.7
                row[f"{mode}_rss_vs_model"] = round(row[f"{mode}_peak_rss_mb"] / model_mb, 2)
                row[f"{mode}_meets_rss_target"] = (row[f"{mode}_peak_rss_mb"]
                                                   <= row["rss_target_mb"])
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"summary": results}, indent=2))


if __name__ == "__main__":
    main()
