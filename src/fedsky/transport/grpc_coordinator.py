"""Coordinator side of the gRPC transport: sites dial in and keep one stream open each.

Threads and queues, no asyncio. grpcio's sync server runs each site's Join stream on a pool
thread that sends whatever is put in that site's outbox; a reader thread per stream turns the
site's frames into arrivals on one shared inbox, which `exchange` drains until the deadline
(and `poll`, for the async loop, one arrival at a time).
A reply is matched to its round by the round number it carries, so one that comes in after
its round is over is recognised and dropped.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from fedsky.errors import FedskyError
from fedsky.transport import fedsky_pb2_grpc, frames
from fedsky.transport.base import Reply
from fedsky.transport.frames import Kind, Message

log = logging.getLogger("fedsky.transport")

# Pool threads beyond one per site: a refused or duplicate connection holds one until refused.
_SPARE_STREAMS = 4
_CLOSE_GRACE_S = 1.0  # how long close() lets streams finish delivering DONE


@dataclass(eq=False)
class _Session:
    """One connected site: what to send it, and why its stream was cut if it misbehaved."""

    site: str
    outbox: queue.Queue[Message | None] = field(default_factory=queue.Queue)
    failure: str | None = None


@dataclass(frozen=True)
class _Arrival:
    """A message from a site's stream, or `msg=None` when that stream ended."""

    session: _Session
    msg: Message | None


class GrpcTransport(fedsky_pb2_grpc.FederationServicer):
    """The coordinator's Transport over gRPC; it listens from construction until `close`.

    Args:
        host: Address to listen on ("0.0.0.0" for every interface).
        port: Port to listen on; 0 picks a free one (read it back from `.port`).
        tokens: Each site's name and shared secret; no other site may join.
        chunk_bytes: Largest piece of a payload in one gRPC message.
        tls_cert: PEM certificate file; with `tls_key`, sites must connect over TLS.
        tls_key: PEM private key file for `tls_cert`.
        join_timeout_s: How long `start` waits for the sites to join.

    Raises:
        FedskyError: The port is taken, or the TLS files are missing or half given.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tokens: dict[str, str],
        chunk_bytes: int = 1 << 20,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        join_timeout_s: float = 120.0,
    ) -> None:
        self._tokens = dict(tokens)
        self._chunk_bytes = chunk_bytes
        self._join_timeout_s = join_timeout_s
        self._lock = threading.Condition()  # guards _sessions and _setup; notified on join/leave
        self._sessions: dict[str, _Session] = {}
        self._setup: bytes | None = None  # None until start(): joiners wait for their WELCOME
        self._inbox: queue.Queue[_Arrival] = queue.Queue()
        limit = frames.max_frame_bytes(chunk_bytes)
        # Each open stream holds a pool thread for its whole life.
        self._pool = ThreadPoolExecutor(len(tokens) + _SPARE_STREAMS, "fedsky-join")
        self._server = grpc.server(
            self._pool,
            options=[
                # Without this, Linux lets a second server bind the same port and the kernel
                # splits the sites between the two coordinators.
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        fedsky_pb2_grpc.add_FederationServicer_to_server(self, self._server)
        self.port = _bind(self._server, host, port, tls_cert, tls_key)
        self._server.start()
        log.info("coordinator listening on %s:%d (%s)", host, self.port,
                 "TLS" if tls_cert else "plaintext, no TLS")

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        """Hand `setup` to every joined site and wait up to `join_timeout_s` for the rest.

        Call once. A site that joins later, or rejoins after a disconnect, gets `setup` too.
        """
        with self._lock:
            self._setup = setup
            for session in self._sessions.values():
                session.outbox.put(Message(Kind.WELCOME, site=session.site, payload=setup))
            self._lock.wait_for(
                lambda: all(s in self._sessions for s in sites), timeout=self._join_timeout_s
            )
            joined = [s for s in sites if s in self._sessions]
        missing = [s for s in sites if s not in joined]
        if missing:
            log.warning("%d of %d sites did not join within %gs: %s", len(missing),
                        len(sites), self._join_timeout_s, ", ".join(missing))
        unknown = [s for s in missing if s not in self._tokens]
        if unknown:
            log.warning("no token configured for %s, so they can never join", ", ".join(unknown))
        return joined

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, bytes]:
        """Send each connected site its task; gather this round's replies until `deadline_s`."""
        deadline = time.monotonic() + deadline_s
        waiting: dict[str, _Session] = {}
        with self._lock:
            for site, task in tasks.items():
                session = self._sessions.get(site)
                if session is None:
                    log.warning("round %d: site %s is not connected; skipped", round_idx, site)
                    continue
                session.outbox.put(Message(Kind.TASK, site, round_idx, payload=task))
                waiting[site] = session

        replies: dict[str, bytes] = {}
        while waiting:
            try:
                arrival = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            site, msg = arrival.session.site, arrival.msg
            current = waiting.get(site) is arrival.session
            if msg is None:
                if current:
                    log.warning("round %d: site %s disconnected before replying", round_idx, site)
                    del waiting[site]
            elif msg.round_idx != round_idx or not current:
                log.info("round %d: discarded a %s from site %s for round %d (too late)",
                         round_idx, msg.kind.name, site, msg.round_idx)
            elif msg.kind is Kind.ERROR:
                log.warning("round %d: site %s failed: %s", round_idx, site, msg.message)
                del waiting[site]
            else:
                replies[site] = msg.payload
                del waiting[site]
        if waiting:
            log.warning("round %d: no reply within %.1fs from %s", round_idx, deadline_s,
                        ", ".join(sorted(waiting)))
        return replies

    def submit(self, site: str, tag: int, task: bytes) -> bool:
        """Queue a task for a connected site and return at once (the async loop)."""
        with self._lock:
            session = self._sessions.get(site)
            if session is None:
                return False
            session.outbox.put(Message(Kind.TASK, site, tag, payload=task))
        return True

    def poll(self, timeout_s: float) -> Reply | None:
        """The next arrival from any site: a reply, a failure or a disconnect."""
        try:
            arrival = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        site, msg = arrival.session.site, arrival.msg
        if msg is None:
            return Reply(site, None, None, "disconnected")
        if msg.kind is Kind.ERROR:
            return Reply(site, msg.round_idx, None, msg.message)
        return Reply(site, msg.round_idx, msg.payload)

    def close(self) -> None:
        """Send DONE to every connected site, then stop listening."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.outbox.put(Message(Kind.DONE, site=session.site))
            session.outbox.put(None)  # ends the stream after DONE
        self._server.stop(grace=_CLOSE_GRACE_S).wait()
        self._pool.shutdown(wait=False)  # grpcio leaves the executor it was given running

    def Join(  # noqa: N802 (the rpc's name in fedsky.proto)
        self, request_iterator: Iterator[frames.Frame], context: grpc.ServicerContext
    ) -> Iterator[frames.Frame]:
        """One site's stream; grpcio runs it on a pool thread and sends what it yields."""
        try:
            # max_bytes=0: nothing is buffered for a peer that has not authenticated.
            hello = frames.read_message(request_iterator, max_bytes=0)
        except FedskyError as err:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except grpc.RpcError:
            return  # the peer left before saying hello
        if hello is None:
            return
        session = self._admit(hello, context)
        threading.Thread(
            target=self._read, args=(session, request_iterator),
            name=f"fedsky-read-{session.site}", daemon=True,
        ).start()
        yield from frames.stream(session.outbox, self._chunk_bytes)
        if session.failure is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.failure)

    def _admit(self, hello: Message, context: grpc.ServicerContext) -> _Session:
        """Register the site that said `hello`, or abort its stream with the reason."""
        expected = self._tokens.get(hello.site)
        if hello.kind is not Kind.HELLO:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "the first message must be HELLO")
        if expected is None:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"unknown site {hello.site!r}")
        if not hmac.compare_digest(hello.token.encode(), expected.encode()):
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                    f"wrong token for site {hello.site!r}")
        with self._lock:
            taken = hello.site in self._sessions
            if not taken:
                session = _Session(hello.site)
                self._sessions[hello.site] = session
                if self._setup is not None:
                    session.outbox.put(Message(Kind.WELCOME, hello.site, payload=self._setup))
                self._lock.notify_all()
        if taken:
            _refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                    f"site {hello.site!r} is already connected")
        log.info("site %s joined from %s", hello.site, context.peer())
        return session

    def _read(self, session: _Session, request_iterator: Iterator[frames.Frame]) -> None:
        """Reader thread: the site's replies go to the inbox until its stream ends."""
        try:
            for msg in frames.messages(request_iterator):
                if msg.kind not in (Kind.REPLY, Kind.ERROR):
                    raise FedskyError(f"got {msg.kind.name}; only REPLY or ERROR follow HELLO")
                self._inbox.put(_Arrival(session, msg))
        except FedskyError as err:
            log.warning("site %s sent a malformed stream; disconnecting it: %s", session.site, err)
            session.failure = str(err)
        except grpc.RpcError:
            pass  # the connection dropped: the same as a clean end for us
        with self._lock:
            if self._sessions.get(session.site) is session:
                del self._sessions[session.site]
                self._lock.notify_all()
        log.info("site %s disconnected", session.site)
        self._inbox.put(_Arrival(session, None))
        session.outbox.put(None)  # lets the Join stream finish and free its pool thread


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
    """Log why a connection is refused (never its token) and end it with that status."""
    log.warning("refused a connection from %s: %s", context.peer(), reason)
    context.abort(code, reason)
    raise AssertionError("unreachable: context.abort raises")


def _bind(server: grpc.Server, host: str, port: int, cert: str | None, key: str | None) -> int:
    """Add the listening port (TLS when a certificate is given); return the bound port."""
    if (cert is None) != (key is None):
        raise FedskyError("set both tls_cert and tls_key, or neither")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = None
    if cert is not None and key is not None:
        credentials = grpc.ssl_server_credentials([(_read_pem(key), _read_pem(cert))])
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio gives no reason; a taken port is by far the usual one
        raise FedskyError(
            f"port {port} on {host} is already in use (or {host} is not an address of this "
            "machine); stop what holds it or choose another port (0 picks a free one)"
        ) from None


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise FedskyError(f"cannot read TLS file {path}: {err.strerror}") from None
