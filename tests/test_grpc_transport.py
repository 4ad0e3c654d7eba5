"""The gRPC transport over real loopback sockets, with sites running in threads of this process.

Deadlines here only ever decide *whether* a reply counts, never how fast something was.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsky import certs
from fedsky.certs import TlsFiles
from fedsky.errors import FedskyError
from fedsky.transport import frames
from fedsky.transport.base import SiteFactory, SiteHandler
from fedsky.transport.frames import Kind, Message
from fedsky.transport.grpc_coordinator import GrpcTransport
from fedsky.transport.grpc_worker import serve_site

REPO = Path(__file__).resolve().parents[1]
SITES = ("a", "b", "c")
TOKENS = {"a": "token-a-3f9c", "b": "token-b-81d0", "c": "token-c-5e27"}
LONG_S = 30.0  # a deadline no healthy loopback round comes near


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, dict[str, TlsFiles]]:
    """A project CA with the coordinator's certificate and one per site (and one for
    "mallory", a site the job does not have)."""
    return certs.throwaway_pki(tmp_path_factory.mktemp("pki"), [*SITES, "mallory"], "127.0.0.1")


def tagging_factory(site: str, setup: bytes) -> SiteHandler:
    """Each reply names its site and setup and reverses the task, so a mix-up shows."""
    return lambda task: b"|".join([site.encode(), setup, task[::-1]])


def expected_reply(site: str, setup: bytes, task: bytes) -> bytes:
    return b"|".join([site.encode(), setup, task[::-1]])


def never_called(site: str, setup: bytes) -> SiteHandler:
    raise AssertionError("a refused or unconnected site must never be set up")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-site") as executor:
        yield executor


@pytest.fixture
def coordinator(pool: ThreadPoolExecutor, pki) -> Iterator[Callable[..., GrpcTransport]]:
    """Builds mutual-TLS coordinators on 127.0.0.1 with a free port; closes them before the
    sites' pool."""
    made: list[GrpcTransport] = []

    def make(**kwargs: object) -> GrpcTransport:
        kwargs = {"host": "127.0.0.1", "port": 0, "sites": SITES, "tls": pki[0], **kwargs}
        made.append(GrpcTransport(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for transport in made:
        transport.close()


@pytest.fixture
def spawn(pool: ThreadPoolExecutor, pki) -> Callable[..., Future[None]]:
    """Runs `serve_site` for a site, with its own certificate, on a pool thread; its Future
    re-raises what it raised."""

    def start(transport: GrpcTransport, site: str, factory: SiteFactory,
              **kwargs: object) -> Future[None]:
        kwargs = {"tls": pki[1][site], **kwargs}
        return pool.submit(serve_site, f"127.0.0.1:{transport.port}", site, factory=factory,
                           **kwargs)

    return start


def test_round_trip_three_sites(coordinator, spawn) -> None:
    transport = coordinator()
    sites = [spawn(transport, s, tagging_factory) for s in ("a", "b", "c")]

    assert sorted(transport.start(["a", "b", "c"], b"setup")) == ["a", "b", "c"]
    for round_idx in (1, 2):
        tasks = {s: f"task {round_idx} for {s}".encode() for s in ("a", "b", "c")}
        replies = transport.exchange(round_idx, tasks, deadline_s=LONG_S)
        assert replies == {s: expected_reply(s, b"setup", t) for s, t in tasks.items()}

    transport.close()
    for site in sites:
        assert site.result(timeout=LONG_S) is None  # DONE ends each site normally


def test_payload_over_64_mb_is_chunked_and_byte_exact(coordinator, spawn) -> None:
    transport = coordinator(chunk_bytes=1 << 20)
    spawn(transport, "a", lambda site, setup: lambda task: task[::-1], chunk_bytes=1 << 20)
    big = random.Random(0).randbytes(70 << 20)
    transport.start(["a"], b"")

    replies = transport.exchange(1, {"a": big}, deadline_s=LONG_S)

    assert replies["a"] == big[::-1]


def test_a_reply_mapped_from_a_file_is_sent_as_it_lies(coordinator, spawn, tmp_path) -> None:
    """A site may answer with any bytes-like object, e.g. an mmap of an update on disk (how a
    multi-GB update is sent without a copy in the site's memory); a non-bytes-like reply is
    that round's ERROR, not a crash."""
    update = random.Random(1).randbytes((3 << 20) + 5)
    path = tmp_path / "update.bin"
    path.write_bytes(update)

    def factory(site: str, setup: bytes) -> SiteHandler:
        def handle(task: bytes) -> object:  # deliberately not always bytes
            if task == b"bad":
                return 42
            with path.open("rb") as f:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return handle

    transport = coordinator(chunk_bytes=1 << 20)
    spawn(transport, "a", factory, chunk_bytes=1 << 20)
    transport.start(["a"], b"")

    assert transport.exchange(1, {"a": b"go"}, deadline_s=LONG_S) == {"a": update}
    assert transport.exchange(2, {"a": b"bad"}, deadline_s=LONG_S) == {}


def test_late_site_is_absent_and_its_late_reply_is_discarded(coordinator, spawn, caplog) -> None:
    release = threading.Event()

    def factory(site: str, setup: bytes) -> SiteHandler:
        def handle(task: bytes) -> bytes:
            if task == b"stall":
                release.wait(LONG_S)  # held until round 1 is over, so it is surely late
            return f"{site} answers {task.decode()}".encode()

        return handle

    transport = coordinator()
    spawn(transport, "a", factory)
    spawn(transport, "b", factory)
    transport.start(["a", "b"], b"")

    first = transport.exchange(1, {"a": b"one", "b": b"stall"}, deadline_s=1.0)
    assert first == {"a": b"a answers one"}

    release.set()  # b now replies to round 1, then gets round 2's task
    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        second = transport.exchange(2, {"a": b"two", "b": b"two"}, deadline_s=LONG_S)
    assert second == {"a": b"a answers two", "b": b"b answers two"}
    assert "discarded a REPLY from site b for round 1" in caplog.text


def test_failing_handler_is_absent_and_site_keeps_serving(coordinator, spawn, caplog) -> None:
    def factory(site: str, setup: bytes) -> SiteHandler:
        def handle(task: bytes) -> bytes:
            if task == b"boom":
                raise ValueError("out of memory on shard 3")
            return task

        return handle

    transport = coordinator()
    site = spawn(transport, "a", factory)
    transport.start(["a"], b"")

    with caplog.at_level(logging.WARNING, logger="fedsky.transport"):
        assert transport.exchange(1, {"a": b"boom"}, deadline_s=LONG_S) == {}
    assert "site a failed: out of memory on shard 3" in caplog.text
    assert transport.exchange(2, {"a": b"fine"}, deadline_s=LONG_S) == {"a": b"fine"}
    assert not site.done()


def test_site_that_drops_out_can_rejoin_and_gets_setup_again(coordinator, spawn) -> None:
    def broken(site: str, setup: bytes) -> SiteHandler:
        raise RuntimeError("no GPU on this node")

    rejoined = threading.Event()

    def working(site: str, setup: bytes) -> SiteHandler:
        assert setup == b"setup"
        rejoined.set()
        return lambda task: task + b"!"

    transport = coordinator()
    first = spawn(transport, "a", broken)
    assert transport.start(["a"], b"setup") == ["a"]
    with pytest.raises(RuntimeError, match="no GPU"):
        first.result(timeout=LONG_S)
    # Returns once the coordinator has seen the site leave, so it may join again.
    assert transport.exchange(1, {"a": b"x"}, deadline_s=LONG_S) == {}

    spawn(transport, "a", working)
    assert rejoined.wait(LONG_S)
    assert transport.exchange(2, {"a": b"x"}, deadline_s=LONG_S) == {"a": b"x!"}


def test_plaintext_coordinator_refuses_a_wrong_token_and_an_unknown_site(coordinator,
                                                                          caplog) -> None:
    transport = coordinator(join_timeout_s=0.5, tls=None, tokens=TOKENS)
    address = f"127.0.0.1:{transport.port}"

    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        with pytest.raises(FedskyError, match="refused site 'a': wrong token"):
            serve_site(address, "a", never_called, token="stolen-guess")
        with pytest.raises(FedskyError, match="refused site 'mallory': unknown site"):
            serve_site(address, "mallory", never_called, token=TOKENS["a"])
        assert transport.start(["a", "b"], b"") == []

    assert "PLAINTEXT" in caplog.text  # the insecure mode is never silent
    assert "2 of 2 sites did not join" in caplog.text
    assert "stolen-guess" not in caplog.text and TOKENS["a"] not in caplog.text


def test_a_site_can_only_join_as_its_certificate_says(coordinator, pki, caplog,
                                                      capfd) -> None:
    server, site_files = pki
    transport = coordinator(join_timeout_s=0.5)
    address = f"127.0.0.1:{transport.port}"
    as_coordinator = TlsFiles(server.ca, server.cert, server.key)

    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        with pytest.raises(FedskyError, match="certificate is for site 'a', not 'b'"):
            serve_site(address, "b", never_called, tls=site_files["a"])
        with pytest.raises(FedskyError, match="refused site 'mallory': unknown site"):
            serve_site(address, "mallory", never_called, tls=site_files["mallory"])
        # the coordinator's own certificate is for servers only: the TLS handshake refuses it
        with pytest.raises(FedskyError, match="cannot reach coordinator"):
            serve_site(address, "a", never_called, tls=as_coordinator, connect_retries=1)
        assert transport.start(["a", "b"], b"") == []
    # each refusal is logged with its reason (the handshake's by gRPC, on stderr)
    assert "refused a connection from ipv4:127.0.0.1" in caplog.text
    for reason in ("certificate is for site 'a', not 'b'", "unknown site 'mallory'"):
        assert reason in caplog.text
    assert "unsupported certificate purpose" in capfd.readouterr().err


def test_a_revoked_certificate_is_refused_without_a_restart(coordinator, spawn, pki, tmp_path,
                                                            caplog) -> None:
    server, site_files = pki
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# nobody yet\n")
    transport = coordinator(tls=TlsFiles(server.ca, server.cert, server.key, str(revoked)))
    spawn(transport, "a", tagging_factory)
    assert transport.start(["a"], b"") == ["a"]

    serial = certs.peer_of(Path(site_files["b"].cert).read_bytes()).serial
    revoked.write_text(f"{serial:x}  # b: laptop stolen\n")
    with (caplog.at_level(logging.WARNING, logger="fedsky.transport"),
          pytest.raises(FedskyError, match=f"site 'b' \\(serial {serial:x}\\) is revoked")):
        serve_site(f"127.0.0.1:{transport.port}", "b", never_called, tls=site_files["b"])
    assert f"(serial {serial:x}) is revoked" in caplog.text
    # the others are unaffected
    assert transport.exchange(1, {"a": b"x"}, deadline_s=LONG_S) == {
        "a": expected_reply("a", b"", b"x")}


def test_second_connection_for_a_site_is_refused(coordinator, spawn, pki) -> None:
    transport = coordinator()
    spawn(transport, "a", tagging_factory)
    assert transport.start(["a"], b"") == ["a"]

    with pytest.raises(FedskyError, match="refused site 'a': site 'a' is already connected"):
        serve_site(f"127.0.0.1:{transport.port}", "a", never_called, tls=pki[1]["a"])
    assert transport.exchange(1, {"a": b"still"}, deadline_s=LONG_S) == {
        "a": expected_reply("a", b"", b"still")
    }


def test_port_in_use_is_a_clear_error(coordinator, pki) -> None:
    first = coordinator()
    with pytest.raises(FedskyError, match=f"port {first.port} on 127.0.0.1 is already in use"):
        GrpcTransport("127.0.0.1", first.port, SITES, tls=pki[0])


def test_plaintext_coordinator_needs_tokens() -> None:
    with pytest.raises(FedskyError, match="needs per-site tokens"):
        GrpcTransport("127.0.0.1", 0, SITES)


def test_unreachable_coordinator_gives_up_after_bounded_retries(pki) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FedskyError, match=f"cannot reach coordinator at 127.0.0.1:{port} after 2"):
        serve_site(f"127.0.0.1:{port}", "a", never_called, tls=pki[1]["a"], connect_retries=2)


def reply_frames(payload: bytes, chunk_bytes: int) -> list[frames.Frame]:
    return list(frames.to_frames(Message(Kind.REPLY, "a", 7, payload=payload, nonce=99),
                                 chunk_bytes))


def test_frames_round_trip_in_small_chunks() -> None:
    payload = bytes(range(10))
    chunks = reply_frames(payload, chunk_bytes=4)
    assert [len(f.data) for f in chunks] == [4, 4, 2]
    assert frames.read_message(iter(chunks)) == Message(Kind.REPLY, "a", 7, payload=payload,
                                                        nonce=99)
    assert frames.read_message(iter([])) is None


@pytest.mark.parametrize(
    ("corrupt", "max_bytes", "error"),
    [
        (lambda fs: [fs[0], fs[2]], None, "missing chunks before chunk 2"),
        (lambda fs: [fs[0], fs[0], fs[1], fs[2]], None, "duplicate chunk 0"),
        (lambda fs: fs[:2], None, "stream ended in the middle"),
        (lambda fs: fs, 9, "over the 9-byte payload limit"),
    ],
    ids=["gap", "duplicate", "truncated", "oversized"],
)
def test_frames_reject_a_broken_chunk_stream(corrupt, max_bytes, error) -> None:
    chunks = corrupt(reply_frames(bytes(10), chunk_bytes=4))
    limit = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(FedskyError, match=error):
        frames.read_message(iter(chunks), **limit)


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", "scripts/gen_proto.sh", str(tmp_path)], cwd=REPO, env=env, check=True)
    fresh = sorted(p.name for p in (tmp_path / "fedsky/transport").iterdir())
    assert fresh == ["fedsky_pb2.py", "fedsky_pb2.pyi", "fedsky_pb2_grpc.py"]
    for name in fresh:
        committed = REPO / "src/fedsky/transport" / name
        assert (tmp_path / "fedsky/transport" / name).read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: run scripts/gen_proto.sh and commit the result"
        )
