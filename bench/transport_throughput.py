"""One round's uploads over the gRPC transport vs a raw TCP socket, and the coordinator's memory.

    python bench/transport_throughput.py --params 100e6,400e6,1e9 \
        [--modes tcp,tls,grpc,streamed,buffered]

For each size, 3 site processes each send one update of that many float32 parameters to a
coordinator process on loopback (the same bytes in every mode). Each site's update is a real
`wire`-format payload written to disk once and sent from an mmap of that file, so the sites
hold no copy of it (what lets 3 x 1B parameters fit on this machine). Modes:
- `tcp`, the baseline of issue 9's target: plain TCP sockets, the receiver reading each site's
  bytes into a 4 MiB buffer it reuses (the raw socket's ceiling: no TLS, no framing, nothing
  kept);
- `tls`: the same over mutual TLS (Python's `ssl`, the same certificates as gRPC): what
  encryption alone costs on this CPU;
- `grpc`: bare gRPC with the same mutual TLS and options, one bidirectional stream per site
  carrying the payload in `--chunk-bytes` messages, which the receiver only counts: gRPC's own
  ceiling;
- `streamed`: fedsky's gRPC transport (`GrpcTransport.exchange`, the real code path: frames,
  CRC-32s, offsets) with streaming aggregation: each payload is folded into one running sum
  (`fedsky.streaming.RoundSum`: header checks, finite and norm checks, the weighted add) as its
  chunks arrive;
- `streamed-no-undo`: the same without the undo log (`coordinator.streaming_undo = false`):
  what the transport costs alone;
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
import mmap
import os
import socket
import ssl
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


# ---- the sites' updates, on disk --------------------------------------------------------------

def update_file(tmp: Path, n_params: int, site: str) -> Path:
    """A real plain-fp32 update of `n_params` values as `fedsky.site` packs it (`wire.pack`),
    written once: site k sends (k + 1) / 1000 everywhere, with num_samples k + 1."""
    import torch

    from fedsky.wire import pack

    path = tmp / f"update-{n_params}-{site}.bin"
    if not path.exists():
        k = SITES.index(site)
        delta = torch.full((n_params,), (k + 1) / 1000)
        blob = pack({"v": delta}, {"round": 0, "site": site, "codec": {}, "num_samples": k + 1})
        del delta
        path.write_bytes(blob)
    return path


def mapped(path: str) -> mmap.mmap:
    """The file's bytes without reading them into this process's memory."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def tls_files(pki_dir: str, who: str):  # -> fedsky.certs.TlsFiles
    from fedsky.certs import TlsFiles

    pki = Path(pki_dir)
    if who == "coordinator":
        return TlsFiles(str(pki / "ca.pem"), str(pki / "coordinator.pem"),
                        str(pki / "coordinator.key"))
    return TlsFiles(str(pki / "ca.pem"), str(pki / "sites" / f"{who}.pem"),
                    str(pki / "sites" / f"{who}.key"))


# ---- raw TCP and TLS sockets --------------------------------------------------------------

def socket_receiver(n_bytes: int, port_file: str, pki_dir: str) -> None:
    """Accept one connection per site and read its whole update, 4 MiB at a time; with a
    `pki_dir` (not "-"), over mutual TLS."""
    server = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(server.getsockname()[1]))
    ctx = None
    if pki_dir != "-":
        me = tls_files(pki_dir, "coordinator")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(me.cert, me.key)
        ctx.load_verify_locations(me.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    conns = []
    for _ in SITES:
        conn, _ = server.accept()
        conns.append(conn if ctx is None else ctx.wrap_socket(conn, server_side=True))
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


def socket_sender(path: str, port: int, pki_dir: str, site: str) -> None:
    data = mapped(path)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        if pki_dir != "-":
            me = tls_files(pki_dir, site)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_cert_chain(me.cert, me.key)
            ctx.load_verify_locations(me.ca)
            conn = ctx.wrap_socket(conn, server_hostname="127.0.0.1")
        conn.recv(2)
        conn.sendall(data)
        conn.recv(1)  # the receiver closes when it has everything; TLS must not be cut first


# ---- bare gRPC: the same TLS and options, bytes in, bytes counted --------------------------

def _bare_options(chunk_bytes: int, server: bool) -> list:
    from fedsky.transport import channel

    return channel.options(chunk_bytes, 30.0, server=server)


def bare_grpc_receiver(n_bytes: int, port_file: str, pki_dir: str, chunk_bytes: int) -> None:
    from concurrent import futures

    import grpc

    from fedsky.transport import channel

    joined, go = threading.Barrier(len(SITES) + 1), threading.Event()
    done = threading.Barrier(len(SITES) + 1)

    def join(requests, context):
        next(requests)  # hello
        joined.wait()
        go.wait()
        yield b"go"
        got = 0
        while got < n_bytes:
            got += len(next(requests))
        done.wait()

    ident = lambda b: b
    method = grpc.stream_stream_rpc_method_handler(join, ident, ident)
    server = grpc.server(futures.ThreadPoolExecutor(len(SITES) + 2),
                         handlers=[grpc.method_handlers_generic_handler("b.B", {"J": method})],
                         options=_bare_options(chunk_bytes, server=True))
    port = server.add_secure_port("127.0.0.1:0", channel.server_credentials(
        tls_files(pki_dir, "coordinator")))
    server.start()
    Path(port_file).write_text(str(port))
    joined.wait()
    started = time.perf_counter()
    go.set()
    done.wait()
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb(), "idle_rss_mb": 0}))
    server.stop(1)


def bare_grpc_sender(path: str, port: int, pki_dir: str, site: str, chunk_bytes: int) -> None:
    import grpc

    from fedsky.transport import channel

    data = memoryview(mapped(path))
    started = threading.Event()

    def requests():
        yield b"hello"
        started.wait()
        for at in range(0, len(data), chunk_bytes):
            yield bytes(data[at : at + chunk_bytes])  # gRPC wants bytes: one copy, as ours

    ident = lambda b: b
    with grpc.secure_channel(f"127.0.0.1:{port}", channel.channel_credentials(
            tls_files(pki_dir, site)), options=_bare_options(chunk_bytes, server=False)) as ch:
        call = ch.stream_stream("/b.B/J", request_serializer=ident, response_deserializer=ident)
        replies = call(requests())
        next(replies)  # "go"
        started.set()
        for _ in replies:
            pass


# ---- fedsky's gRPC transport ----------------------------------------------------------------

def grpc_coordinator(n_params: int, pki_dir: str, port_file: str, mode: str,
                     chunk_bytes: int) -> None:
    import torch

    from fedsky.config import FedAvgConfig
    from fedsky.streaming import RoundSum
    from fedsky.transport.grpc_coordinator import GrpcTransport

    transport = GrpcTransport("127.0.0.1", 0, SITES, tls=tls_files(pki_dir, "coordinator"),
                              join_timeout_s=600, chunk_bytes=chunk_bytes)
    Path(port_file).write_text(str(transport.port))
    assert transport.start(list(SITES), b"") == list(SITES)
    # The model's shape only; never touched, so it takes no memory (the sum does).
    acc = (RoundSum({"v": torch.empty(n_params)}, 0, FedAvgConfig(), undo=mode == "streamed")
           if mode.startswith("streamed") else None)
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


def grpc_site(path: str, pki_dir: str, port: int, site: str, chunk_bytes: int) -> None:
    from fedsky.transport.grpc_worker import serve_site

    data = mapped(path)
    serve_site(f"127.0.0.1:{port}", site, lambda name, setup: lambda task: data,
               tls=tls_files(pki_dir, site), chunk_bytes=chunk_bytes)


# ---- driver -------------------------------------------------------------------------------

ROLES = {
    "socket-receiver": lambda a: socket_receiver(int(a[0]), a[1], a[2]),
    "socket-sender": lambda a: socket_sender(a[0], int(a[1]), a[2], a[3]),
    "bare-grpc-receiver": lambda a: bare_grpc_receiver(int(a[0]), a[1], a[2], int(a[3])),
    "bare-grpc-sender": lambda a: bare_grpc_sender(a[0], int(a[1]), a[2], a[3], int(a[4])),
    "grpc-coordinator": lambda a: grpc_coordinator(int(a[0]), a[1], a[2], a[3], int(a[4])),
    "grpc-site": lambda a: grpc_site(a[0], a[1], int(a[2]), a[3], int(a[4])),
}


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
    files = [update_file(tmp, n_params, s) for s in SITES]
    n_bytes = files[0].stat().st_size  # what every mode moves per site
    # glibc would keep freed chunk buffers in per-thread arenas (see docs/deployment.md)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if kind in ("tcp", "tls"):
        keys = "-" if kind == "tcp" else pki
        coord = subprocess.Popen(_me("socket-receiver", n_bytes, port_file, keys),
                                 stdout=subprocess.PIPE)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("socket-sender", f, port, keys, s))
                 for f, s in zip(files, SITES)]
    elif kind == "grpc":
        coord = subprocess.Popen(_me("bare-grpc-receiver", n_bytes, port_file, pki,
                                     chunk_bytes), stdout=subprocess.PIPE, env=env)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("bare-grpc-sender", f, port, pki, s, chunk_bytes))
                 for f, s in zip(files, SITES)]
    else:
        coord = subprocess.Popen(_me("grpc-coordinator", n_params, pki, port_file, kind,
                                     chunk_bytes), stdout=subprocess.PIPE, env=env)
        port = _wait_port(port_file)
        sites = [subprocess.Popen(_me("grpc-site", f, pki, port, s, chunk_bytes))
                 for f, s in zip(files, SITES)]
    out, _ = coord.communicate()
    for s in sites:
        s.wait()
    if coord.returncode != 0:
        raise SystemExit(f"{kind} coordinator failed")
    return json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--"):
        role, *args = sys.argv[1:]
        ROLES[role](args)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100e6,400e6",
                        help="comma-separated parameter counts (float32 each)")
    parser.add_argument("--modes", default="tcp,tls,grpc,streamed,buffered",
                        help="which of tcp, tls, grpc, streamed, streamed-no-undo, buffered "
                             "to run (tcp is the baseline)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20,
                        help="transport.chunk_bytes for both ends")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each mode, alternating; medians are reported")
    parser.add_argument("--dir", default=None,
                        help="where the update files go (default: a temporary directory; "
                             "3 x 4 GB at 1B parameters)")
    opts = parser.parse_args()
    modes = opts.modes.split(",")
    results = []
    from fedsky.certs import throwaway_pki

    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp_dir:
        tmp = Path(tmp_dir)
        throwaway_pki(tmp / "pki", SITES, "127.0.0.1")
        for n_params in (int(float(p)) for p in opts.params.split(",")):
            results.append(run_size(n_params, modes, tmp, opts))
            for f in tmp.glob("update-*"):
                f.unlink()  # 12 GB at 1B: one size's files at a time
    print(json.dumps({"summary": results}, indent=2))


def run_size(n_params: int, modes: list[str], tmp: Path, opts: argparse.Namespace) -> dict:
    model_mb = 4 * n_params / MB
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(opts.repeats):
        for mode in modes:  # alternating, so drift in the machine's load hits all
            runs[mode].append(measure(mode, n_params, tmp, opts.chunk_bytes))
    row: dict = {"params": n_params, "sites": len(SITES), "update_mb": round(model_mb, 1),
                 "chunk_bytes": opts.chunk_bytes, "repeats": opts.repeats,
                 "load_avg_1min": round(os.getloadavg()[0], 2),
                 "rss_target_mb": round(1.5 * model_mb + 256, 1)}
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    for mode, rs in runs.items():
        row[f"{mode}_seconds"] = round(med[mode], 2)
        row[f"{mode}_mb_s"] = round(len(SITES) * model_mb / med[mode], 1)
        row[f"{mode}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs), 1)
        if mode == "tcp":
            continue
        if "tcp" in runs:  # per repeat: each run against the TCP run beside it
            ratios = [t["seconds"] / g["seconds"] for t, g in zip(runs["tcp"], rs)]
            row[f"{mode}_vs_tcp"] = round(statistics.median(ratios), 3)
        for base in ("tls", "grpc"):
            if mode not in ("tls", "grpc") and base in runs:
                ratios = [b["seconds"] / g["seconds"] for b, g in zip(runs[base], rs)]
                row[f"{mode}_vs_{base}"] = round(statistics.median(ratios), 3)
        if mode not in ("tls", "grpc"):
            if "tcp" in runs:
                row[f"{mode}_meets_throughput_target"] = row[f"{mode}_vs_tcp"] >= 0.7
            row[f"{mode}_idle_rss_mb"] = round(max(r["idle_rss_mb"] for r in rs), 1)
            row[f"{mode}_rss_vs_model"] = round(row[f"{mode}_peak_rss_mb"] / model_mb, 2)
            row[f"{mode}_meets_rss_target"] = row[f"{mode}_peak_rss_mb"] <= row["rss_target_mb"]
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
