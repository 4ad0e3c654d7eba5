"""The fault matrix: each fault is injected for real (gRPC on loopback, real processes, real
TLS) and each test asserts the state the federation ends in, not just that nothing crashed.

Transport faults use a raw site: a real mutual-TLS gRPC stream that sends hand-made frames
(truncated, corrupted, replayed, cut off mid-upload), beside well-behaved `serve_site` sites.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from fedsky import certs
from fedsky.certs import TlsFiles
from fedsky.errors import FedskyError
from fedsky.transport import channel, fedsky_pb2_grpc, frames
from fedsky.transport.base import SiteFactory, SiteHandler
from fedsky.transport.frames import Frame, Kind, Message
from fedsky.transport.grpc_coordinator import GrpcTransport
from fedsky.transport.grpc_worker import serve_site

SITES = ("a", "b")
LONG_S = 60.0  # a deadline no healthy loopback round comes near
PAYLOAD = bytes(range(10))


def echo(site: str, setup: bytes) -> SiteHandler:
    return lambda task: site.encode() + b":" + task


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, dict[str, TlsFiles]]:
    return certs.throwaway_pki(tmp_path_factory.mktemp("pki"), SITES, "127.0.0.1")


@pytest.fixture
def federation(pki) -> Iterator[Callable[..., GrpcTransport]]:
    """A mutual-TLS coordinator for sites a and b, and a pool to run well-behaved sites."""
    made: list[GrpcTransport] = []
    with ThreadPoolExecutor(4, thread_name_prefix="test-site") as pool:

        def make(**kwargs: object) -> GrpcTransport:
            kwargs = {"tls": pki[0], "rejoin_wait_s": 0.5, **kwargs}
            made.append(GrpcTransport("127.0.0.1", 0, SITES, **kwargs))  # type: ignore[arg-type]
            made[-1].pool = pool  # type: ignore[attr-defined]
            return made[-1]

        yield make
        for transport in made:
            transport.close()


def good_site(transport: GrpcTransport, pki, site: str) -> Future[None]:
    return transport.pool.submit(  # type: ignore[attr-defined]
        serve_site, f"127.0.0.1:{transport.port}", site, echo, tls=pki[1][site])


class RawSite:
    """A site's real mutual-TLS stream, driven frame by frame."""

    def __init__(self, port: int, tls: TlsFiles, site: str) -> None:
        self.site = site
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", channel.channel_credentials(tls),
                                           options=channel.options(1 << 20, 30.0, server=False))
        self.outbox: queue.Queue[Frame | None] = queue.Queue()
        self.call = fedsky_pb2_grpc.FederationStub(self.channel).Join(iter(self.outbox.get, None))
        self.incoming = frames.messages(self.call)
        self.send(frames.to_frames(Message(Kind.HELLO, site=site), 4))

    def send(self, frame_list: Iterator[Frame] | list[Frame]) -> None:
        for frame in frame_list:
            self.outbox.put(frame)

    def reply_frames(self, task: Message, payload: bytes = PAYLOAD) -> list[Frame]:
        """A REPLY to `task` in chunks of 4 bytes (three chunks for PAYLOAD)."""
        msg = Message(Kind.REPLY, self.site, task.round_idx, payload=payload, nonce=task.nonce)
        return list(frames.to_frames(msg, 4))

    def next_kind(self, kind: Kind) -> Message:
        for msg in self.incoming:
            if msg.kind is kind:
                return msg
        raise AssertionError(f"stream ended before a {kind.name}")

    def close(self) -> None:
        """Vanish mid-conversation, as a killed process does."""
        self.call.cancel()
        self.channel.close()


def altered(frame: Frame, data: bytes, fix_crc: bool) -> Frame:
    out = Frame()
    out.CopyFrom(frame)
    out.data = data
    if fix_crc:
        out.crc32 = zlib.crc32(data)
    return out


def start_with_raw_a(federation, pki, **kwargs: object) -> tuple[GrpcTransport, RawSite]:
    transport = federation(**kwargs)
    raw = RawSite(transport.port, pki[1]["a"], "a")
    good_site(transport, pki, "b")
    assert sorted(transport.start(list(SITES), b"setup")) == ["a", "b"]
    raw.next_kind(Kind.WELCOME)
    return transport, raw


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        # a chunk cut short, with a CRC that matches what is left: the next chunk's offset catches it
        (lambda f: altered(f, f.data[:2], fix_crc=True),
         "is truncated: chunk 2 starts at byte 8, but 6 bytes came before it"),
        # a flipped byte: the CRC catches it
        (lambda f: altered(f, b"\xff" + f.data[1:], fix_crc=False), "corrupted"),
    ],
    ids=["truncated-chunk", "corrupted-chunk"],
)
def test_a_damaged_chunk_is_refused_and_the_round_goes_on(federation, pki, caplog, damage,
                                                         reason) -> None:
    transport, raw = start_with_raw_a(federation, pki)
    with caplog.at_level(logging.WARNING, logger="fedsky.transport"):
        transport.pool.submit(lambda: raw.send([  # type: ignore[attr-defined]
            (damage(f) if f.seq == 1 else f) for f in raw.reply_frames(raw.next_kind(Kind.TASK))
        ]))
        replies = transport.exchange(1, {"a": b"t1", "b": b"t1"}, deadline_s=LONG_S)

    assert replies == {"b": b"b:t1"}  # a's damaged reply never reaches the coordinator's caller
    assert "site a sent a malformed stream; disconnecting it" in caplog.text and reason in caplog.text
    with pytest.raises(grpc.RpcError) as cut:
        raw.next_kind(Kind.DONE)
    assert cut.value.code() is grpc.StatusCode.INVALID_ARGUMENT and reason in cut.value.details()
    # the round after goes on with the healthy site
    assert transport.exchange(2, {"b": b"t2"}, deadline_s=LONG_S) == {"b": b"b:t2"}


def test_a_site_killed_mid_upload_is_dropped_then_rejoins_the_next_round(federation, pki,
                                                                         caplog) -> None:
    transport, raw = start_with_raw_a(federation, pki)
    def upload_half_then_die() -> None:
        first = raw.reply_frames(raw.next_kind(Kind.TASK))
        raw.send(first[:1])  # one chunk of three
        raw.close()

    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        transport.pool.submit(upload_half_then_die)  # type: ignore[attr-defined]
        replies = transport.exchange(1, {"a": b"t1", "b": b"t1"}, deadline_s=LONG_S)
    assert replies == {"b": b"b:t1"}
    assert "site a disconnected before replying" in caplog.text
    assert "site a did not come back" in caplog.text

    # the site's process is restarted: it rejoins, gets the setup again, and serves
    restarted = good_site(transport, pki, "a")
    assert transport.wait_connected("a", LONG_S)
    assert transport.exchange(2, {"a": b"t2", "b": b"t2"}, deadline_s=LONG_S) == {
        "a": b"a:t2", "b": b"b:t2"}
    assert not restarted.done()


def test_a_site_that_dies_mid_round_and_restarts_gets_the_same_round_again(federation,
                                                                           pki) -> None:
    transport, raw = start_with_raw_a(federation, pki, rejoin_wait_s=LONG_S)  # a patient round

    def die_then_restart() -> None:
        raw.next_kind(Kind.TASK)  # it was training when it died
        raw.close()
        good_site(transport, pki, "a")

    transport.pool.submit(die_then_restart)  # type: ignore[attr-defined]
    replies = transport.exchange(1, {"a": b"t1", "b": b"t1"}, deadline_s=LONG_S)
    assert replies == {"a": b"a:t1", "b": b"b:t1"}  # same round, answered by the new process


def test_a_replayed_reply_is_rejected_and_the_site_is_told(federation, pki, caplog) -> None:
    transport, raw = start_with_raw_a(federation, pki)
    captured: list[list[Frame]] = []

    def answer() -> None:
        captured.append(raw.reply_frames(raw.next_kind(Kind.TASK), b"genuine"))
        raw.send(captured[0])

    transport.pool.submit(answer)  # type: ignore[attr-defined]
    assert transport.exchange(1, {"a": b"t", "b": b"t"}, LONG_S) == {"a": b"genuine",
                                                                     "b": b"b:t"}

    # Round 1 again (as after a coordinator restart): a new task, a new nonce; the old reply
    # is replayed word for word.
    def replay() -> None:
        raw.next_kind(Kind.TASK)
        raw.send(captured[0])

    with caplog.at_level(logging.WARNING, logger="fedsky.transport"):
        transport.pool.submit(replay)  # type: ignore[attr-defined]
        assert transport.exchange(1, {"a": b"t", "b": b"t"}, LONG_S) == {"b": b"b:t"}
    assert "rejected the reply of site a: replayed reply" in caplog.text
    told = raw.next_kind(Kind.REJECT)
    assert told.round_idx == 1 and "replayed reply" in told.message

    # A reply for an old round during a later one is not counted either, and the site is told.
    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        transport.pool.submit(replay)  # type: ignore[attr-defined]
        assert transport.exchange(2, {"a": b"t", "b": b"t"}, deadline_s=2.0) == {"b": b"b:t"}
    assert "discarded a REPLY from site a for round 1 (too late)" in caplog.text
    assert "too late" in raw.next_kind(Kind.REJECT).message


def test_a_site_cannot_send_frames_in_another_sites_name(federation, pki, caplog) -> None:
    transport, raw = start_with_raw_a(federation, pki)

    def impersonate() -> None:
        task = raw.next_kind(Kind.TASK)
        raw.send(frames.to_frames(Message(Kind.REPLY, "b", 1, payload=b"forged",
                                          nonce=task.nonce), 4))

    with caplog.at_level(logging.WARNING, logger="fedsky.transport"):
        transport.pool.submit(impersonate)  # type: ignore[attr-defined]
        assert transport.exchange(1, {"a": b"t", "b": b"t"}, LONG_S) == {"b": b"b:t"}
    assert "a REPLY for site 'b' on the stream of site 'a'" in caplog.text


@pytest.mark.parametrize("client", ["no-certificate", "other-ca"])
def test_a_client_without_a_project_certificate_never_joins(federation, pki, tmp_path, capfd,
                                                           client) -> None:
    transport = federation(join_timeout_s=0.5)
    address = f"127.0.0.1:{transport.port}"
    if client == "no-certificate":
        # TLS that trusts the project CA but presents no certificate of its own
        ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            Path(pki[0].ca).read_bytes()))
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=3)
        ch.close()
        expected = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    else:
        # a well-formed certificate for site "a", from someone else's CA
        _, theirs = certs.throwaway_pki(tmp_path / "other", ["a"], "127.0.0.1")
        forged = TlsFiles(pki[0].ca, theirs["a"].cert, theirs["a"].key)
        with pytest.raises(FedskyError, match="cannot reach coordinator"):
            serve_site(address, "a", echo, tls=forged, connect_retries=1)
        expected = "CERTIFICATE_VERIFY_FAILED"
    assert transport.start(["a"], b"") == []  # nobody got in
    assert expected in capfd.readouterr().err  # the handshake failure, logged by gRPC


class CuttingProxy:
    """A real TCP relay in front of the coordinator that cuts its first connection once
    `cut_after` bytes have gone from the site to the coordinator (or `cut_down_after` bytes the
    other way), as a dropped link does; later connections are relayed untouched. Counts the
    bytes each way per connection."""

    def __init__(self, target_port: int, cut_after: int | None = None,
                 cut_down_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_down_after = cut_down_after
        self.upstream: list[int] = []  # bytes site -> coordinator, per connection
        self.downstream: list[int] = []  # bytes coordinator -> site, per connection
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                site_side, _ = self.server.accept()
            except OSError:
                return
            index = len(self.upstream)
            self.upstream.append(0)
            self.downstream.append(0)
            coord_side = socket.create_connection(("127.0.0.1", self.target_port))
            first = index == 0
            for args in ((site_side, coord_side, self.upstream, index,
                          self.cut_after if first else None),
                         (coord_side, site_side, self.downstream, index,
                          self.cut_down_after if first else None)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counts: list[int], index: int,
              limit: int | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if limit is not None and counts[index] + len(data) > limit:
                    data = data[: limit - counts[index]]
                dst.sendall(data)
                counts[index] += len(data)
                if limit is not None and counts[index] >= limit:
                    break  # the link drops
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


def round_over_a_cut_link(federation, pki, caplog, trainer: SiteFactory,
                          tasks: dict[str, bytes], **cut: int) -> tuple[dict, CuttingProxy]:
    """One round with site a behind a CuttingProxy (64 KiB chunks) and site b direct."""
    transport = federation(rejoin_wait_s=LONG_S, chunk_bytes=1 << 16)
    proxy = CuttingProxy(transport.port, **cut)
    transport.pool.submit(serve_site, f"127.0.0.1:{proxy.port}", "a",  # type: ignore[attr-defined]
                          trainer, tls=pki[1]["a"], chunk_bytes=1 << 16)
    good_site(transport, pki, "b")
    assert sorted(transport.start(list(SITES), b"setup")) == ["a", "b"]
    with caplog.at_level(logging.INFO, logger="fedsky.transport"):
        replies = transport.exchange(1, tasks, deadline_s=LONG_S)
    proxy.close()
    return replies, proxy


def test_a_task_download_cut_mid_transfer_resumes_from_the_last_byte_received(federation, pki,
                                                                             caplog) -> None:
    task = os.urandom(8 << 20)  # a model-sized task: 8 MiB in 128 chunks of 64 KiB
    calls: list[bytes] = []

    def trainer(site: str, setup: bytes) -> SiteHandler:
        def handle(got: bytes) -> bytes:
            calls.append(got)
            return b"trained on " + hashlib.sha256(got).digest()
        return handle

    replies, proxy = round_over_a_cut_link(federation, pki, caplog, trainer,
                                           {"a": task, "b": b"t1"}, cut_down_after=3 << 20)

    assert calls == [task]  # the site trained once, on the byte-identical task
    assert replies["a"] == b"trained on " + hashlib.sha256(task).digest()
    assert replies["b"] == b"b:t1"
    resumed_at = int(re.search(r"resuming its task's download at byte (\d+) of", caplog.text)[1])
    assert 1 << 20 < resumed_at < len(task)  # what had arrived before the cut was kept
    assert len(proxy.downstream) == 2  # cut once, reconnected once
    # After the cut, the coordinator sent only the bytes the site did not have (plus the
    # setup, TLS, HTTP/2 and frame headers: well under 256 KiB here), not the task again.
    assert proxy.downstream[1] < len(task) - resumed_at + (256 << 10)


def test_an_upload_cut_mid_transfer_resumes_from_the_last_byte_received(federation, pki,
                                                                        caplog) -> None:
    payload = os.urandom(8 << 20)  # 8 MiB in 128 chunks of 64 KiB
    calls: list[bytes] = []

    def trainer(site: str, setup: bytes) -> SiteHandler:
        def handle(task: bytes) -> bytes:
            calls.append(task)
            return payload
        return handle

    replies, proxy = round_over_a_cut_link(federation, pki, caplog, trainer,
                                           {"a": b"t1", "b": b"t1"}, cut_after=3 << 20)

    assert replies["a"] == payload  # byte-identical, reassembled across two connections
    assert replies["b"] == b"b:t1"
    assert calls == [b"t1"]  # the site was not asked to train again
    resumed_at = int(re.search(r"resuming its upload at byte (\d+) of", caplog.text)[1])
    assert 0 < resumed_at < len(payload) and resumed_at % (1 << 16) == 0
    assert len(proxy.upstream) == 2  # cut once, reconnected once
    # After the cut, the site sent only the bytes the coordinator did not have (plus TLS,
    # HTTP/2 and frame headers: well under 256 KiB here), not the update again.
    assert proxy.upstream[1] < len(payload) - resumed_at + (256 << 10)
    assert resumed_at > 1 << 20  # and what had arrived before the cut was kept
