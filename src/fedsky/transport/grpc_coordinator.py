"""Coordinator side of the gRPC transport: sites dial in and keep one stream open each.

Threads and queues, no asyncio. grpcio's sync server runs each site's Join stream on a pool
thread that sends whatever is put in that site's outbox; a reader thread per stream turns the
site's frames into arrivals on one shared inbox, which `exchange` drains until the deadline
(and `poll`, for the async loop, one arrival at a time).
A reply is matched to its task by the round number and the task's nonce it carries: one that
comes in after its round is over is dropped, one with the right round but another nonce (a
replay, e.g. of a reply to the same round before the coordinator restarted) is rejected.
An upload cut off by a dropped connection is kept as far as it arrived; when the site
reconnects within the round it is asked to RESUME from the last byte received, instead of
being sent the task again (no retraining, no bytes sent twice). The other way round, a site
cut off while downloading its task says in its HELLO how much of which task it holds, and
gets only the rest of that same task.
With a `sink` (see `exchange`), each reply is handed on chunk by chunk as it arrives, so a
round need not hold one whole update per site (`fedsky.streaming`).

Who a site is comes from its TLS client certificate, issued by the project CA (`fedsky.certs`):
the certificate's common name must be a site of the job, must not be revoked, and is the only
name the site may use. Plaintext (no TLS) falls back to per-site secret tokens.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from fedsky import certs
from fedsky.certs import Peer, TlsFiles
from fedsky.errors import FedskyError
from fedsky.transport import channel, frames
from fedsky.transport.base import PayloadSink, Reply
from fedsky.transport.frames import Kind, Message, Partial

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
    holds: tuple[int, int, int] = (0, 0, 0)  # its HELLO: (round, nonce, bytes) of a cut task


@dataclass(frozen=True)
class _Arrival:
    """A message from a site's stream; `msg=None` when that stream ended, or, with `joined`,
    when the session was just admitted (a restarted site may take the current round's task)."""

    session: _Session
    msg: Message | None
    joined: bool = False


class GrpcTransport:
    """The coordinator's Transport over gRPC; it listens from construction until `close`.

    Args:
        host: Address to listen on ("0.0.0.0" for every interface).
        port: Port to listen on; 0 picks a free one (read it back from `.port`).
        sites: The job's site names; no other site may join.
        tls: The project CA, the coordinator's certificate and key, and the revocation list:
            mutual TLS, each site identified by its certificate. None: plaintext (tokens only),
            for a trusted network; it is logged as a warning.
        tokens: Each site's shared secret, checked on join (required in plaintext; with TLS an
            optional second factor).
        chunk_bytes: Largest piece of a payload in one gRPC message.
        join_timeout_s: How long `start` waits for the sites to join.
        keepalive_s: Interval of HTTP/2 keepalive pings that detect dead sites.
        rejoin_wait_s: How long a round waits for a site that disconnected after getting its
            task to come back (it then gets the task again), within the round's deadline.

    Raises:
        FedskyError: The port is taken, a TLS file is unreadable, or plaintext without tokens.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sites: Sequence[str],
        *,
        tls: TlsFiles | None = None,
        tokens: Mapping[str, str] | None = None,
        chunk_bytes: int = 1 << 20,
        join_timeout_s: float = 120.0,
        keepalive_s: float = 30.0,
        rejoin_wait_s: float = 30.0,
    ) -> None:
        if tls is None and tokens is None:
            raise FedskyError("a plaintext coordinator needs per-site tokens to tell sites apart")
        self._sites = frozenset(sites)
        self._tls = tls
        self._tokens = dict(tokens) if tokens is not None else None
        if tls is not None:
            certs.read_revoked(tls.revoked)  # fail now, not at the first site, on a bad list
        self._chunk_bytes = chunk_bytes
        self._join_timeout_s = join_timeout_s
        self._rejoin_wait_s = rejoin_wait_s
        self._lock = threading.Condition()  # guards _sessions and _setup; notified on join/leave
        self._sessions: dict[str, _Session] = {}
        self._async_nonces: dict[str, int] = {}  # the task each site is on (`submit`)
        self._setup: bytes | None = None  # None until start(): joiners wait for their WELCOME
        self._inbox: queue.Queue[_Arrival] = queue.Queue()
        self._partials: dict[str, Partial] = {}  # uploads cut off mid-payload, by site
        # The round in progress: (round, nonce) each site's reply must carry to be streamed
        # into the sink, and the sink's factory (None: replies are reassembled in memory).
        self._expected: dict[str, tuple[int, int]] = {}
        self._sink: Callable[[str], PayloadSink] | None = None
        # Each open stream holds a pool thread for its whole life.
        self._pool = ThreadPoolExecutor(len(self._sites) + _SPARE_STREAMS, "fedsky-join")
        self._server = grpc.server(
            self._pool,
            options=[
                # Without this, Linux lets a second server bind the same port and the kernel
                # splits the sites between the two coordinators.
                ("grpc.so_reuseport", 0),
                *channel.options(chunk_bytes, keepalive_s, server=True),
            ],
        )
        self._server.add_generic_rpc_handlers((channel.join_handler(self.Join),))
        self.port = _bind(self._server, host, port, tls)
        self._server.start()
        if tls is None:
            log.warning("coordinator listening on %s:%d in PLAINTEXT (insecure): updates and "
                        "tokens cross the network unencrypted and sites are known by token only",
                        host, self.port)
        else:
            log.info("coordinator listening on %s:%d (mutual TLS)", host, self.port)

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
        unknown = [s for s in missing if s not in self._sites]
        if unknown:
            log.warning("%s are not sites of this job, so they can never join", ", ".join(unknown))
        return joined

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float,
        sink: Callable[[str], PayloadSink] | None = None,
    ) -> dict[str, Any]:
        """Send each connected site its task; gather this round's replies until `deadline_s`.

        A site that (re)joins during the round, e.g. one restarted after a crash, gets its task
        then, or, if its upload was cut off, is asked to resume it from the last byte that
        arrived; one that disconnects after getting it is waited for `rejoin_wait_s`.
        With `sink`, each site's reply goes chunk by chunk into `sink(site)` as it arrives and
        the result holds what that sink's `close` returned, not the payload; a site whose
        upload never completes leaves its sink unclosed (the caller sees which).
        """
        try:
            with self._lock:
                self._sink = sink
            return self._exchange(round_idx, tasks, deadline_s)
        finally:
            with self._lock:
                self._sink = None
                self._expected.clear()
                self._partials.clear()  # an upload not resumed within its round is void

    def _exchange(self, round_idx: int, tasks: Mapping[str, bytes],
                  deadline_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        waiting: dict[str, _Session | None] = {}  # None: disconnected, may still rejoin
        rejoin_by: dict[str, float] = {}  # when a disconnected site stops being waited for
        nonces: dict[str, int] = {}
        settled: set[str] = set()  # replied, failed or rejected: done for this round
        resuming: set[str] = set()  # asked to RESUME a cut-off upload
        with self._lock:
            for site, task in tasks.items():
                session = self._sessions.get(site)
                if session is None:
                    log.warning("round %d: site %s is not connected; it gets its task if it "
                                "joins before the round ends", round_idx, site)
                    continue
                nonces[site] = _send_task(session, round_idx, task)
                self._expected[site] = (round_idx, nonces[site])
                waiting[site] = session

        replies: dict[str, Any] = {}
        while waiting:
            now = time.monotonic()
            for site in [s for s, t in rejoin_by.items() if t <= now]:
                log.warning("round %d: site %s did not come back; the round goes on without it",
                            round_idx, site)
                del waiting[site], rejoin_by[site]
            if not waiting or now >= deadline:
                break
            try:
                arrival = self._inbox.get(timeout=min([deadline, *rejoin_by.values()]) - now)
            except queue.Empty:
                continue
            session, msg = arrival.session, arrival.msg
            site = session.site
            current = waiting.get(site) is session
            if arrival.joined:
                if site in tasks and site not in settled and not current:
                    with self._lock:
                        if self._sessions.get(site) is session:
                            part = self._partials.get(site)
                            if part is not None and (part.round_idx, part.nonce) == (
                                    round_idx, nonces.get(site)):
                                log.info("round %d: site %s rejoined; resuming its upload at "
                                         "byte %d of %d", round_idx, site, part.received,
                                         part.size)
                                session.outbox.put(Message(Kind.RESUME, site, round_idx,
                                                           nonce=part.nonce,
                                                           offset=part.received))
                                resuming.add(site)
                            elif _holds_part_of(session, round_idx, nonces.get(site),
                                                tasks[site]):
                                held = session.holds[2]
                                log.info("round %d: site %s rejoined; resuming its task's "
                                         "download at byte %d of %d", round_idx, site, held,
                                         len(tasks[site]))
                                session.outbox.put(Message(Kind.TASK, site, round_idx,
                                                           payload=tasks[site],
                                                           nonce=nonces[site], offset=held))
                            else:
                                log.info("round %d: site %s (re)joined; sending it this "
                                         "round's task", round_idx, site)
                                nonces[site] = _send_task(session, round_idx, tasks[site])
                                self._expected[site] = (round_idx, nonces[site])
                            waiting[site] = session
                            rejoin_by.pop(site, None)
            elif msg is None:
                if current:
                    log.warning("round %d: site %s disconnected before replying; waiting up to "
                                "%gs for it to rejoin", round_idx, site, self._rejoin_wait_s)
                    waiting[site] = None
                    rejoin_by[site] = min(deadline, now + self._rejoin_wait_s)
            elif msg.round_idx != round_idx or not current:
                log.info("round %d: discarded a %s from site %s for round %d (too late)",
                         round_idx, msg.kind.name, site, msg.round_idx)
                if msg.kind is Kind.REPLY:
                    session.outbox.put(Message(Kind.REJECT, site, msg.round_idx, message=(
                        f"arrived during round {round_idx}, too late to count")))
            elif msg.nonce != nonces[site]:
                self._reject(session, round_idx, "replayed reply: it answers another task of "
                             f"round {round_idx} (nonce mismatch)")
                settled.add(site)
                del waiting[site]
            elif msg.kind is Kind.ERROR and site in resuming:
                # A restarted process no longer holds the reply: it gets the task again.
                log.info("round %d: site %s cannot resume its upload (%s); sending it this "
                         "round's task", round_idx, site, msg.message)
                resuming.discard(site)
                with self._lock:
                    nonces[site] = _send_task(session, round_idx, tasks[site])
                    self._expected[site] = (round_idx, nonces[site])
            elif msg.kind is Kind.ERROR:
                log.warning("round %d: site %s failed: %s", round_idx, site, msg.message)
                settled.add(site)
                del waiting[site]
            else:
                replies[site] = msg.payload if msg.result is None else msg.result
                settled.add(site)
                del waiting[site]
        if waiting:
            log.warning("round %d: no reply within %.1fs from %s", round_idx, deadline_s,
                        ", ".join(sorted(waiting)))
        return replies

    def wait_connected(self, site: str, timeout_s: float) -> bool:
        """Whether `site` is connected, waiting up to `timeout_s` for it to (re)join."""
        with self._lock:
            return self._lock.wait_for(lambda: site in self._sessions, timeout=timeout_s)

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        """Tell `site` its reply for `round_idx` was refused, and why (it keeps serving)."""
        with self._lock:
            session = self._sessions.get(site)
        if session is not None:
            session.outbox.put(Message(Kind.REJECT, site, round_idx, message=reason))

    def _reject(self, session: _Session, round_idx: int, reason: str) -> None:
        log.warning("round %d: rejected the reply of site %s: %s", round_idx, session.site, reason)
        session.outbox.put(Message(Kind.REJECT, session.site, round_idx, message=reason))

    def submit(self, site: str, tag: int, task: bytes) -> bool:
        """Queue a task for a connected site and return at once (the async loop)."""
        with self._lock:
            session = self._sessions.get(site)
            if session is None:
                return False
            self._async_nonces[site] = _send_task(session, tag, task)
        return True

    def poll(self, timeout_s: float) -> Reply | None:
        """The next arrival from any site: a reply, a failure or a disconnect (joins and
        replies that answer no outstanding task are not arrivals for the async loop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                arrival = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if arrival.joined:
                continue
            site, msg = arrival.session.site, arrival.msg
            if msg is None:
                return Reply(site, None, None, "disconnected")
            if msg.nonce != self._async_nonces.get(site):
                self._reject(arrival.session, msg.round_idx, "replayed reply: it answers no "
                             "outstanding task (nonce mismatch)")
                continue
            if msg.kind is Kind.ERROR:
                return Reply(site, msg.round_idx, None, msg.message)
            return Reply(site, msg.round_idx, msg.payload)

    def _open_sink(self, session: _Session, first: Any) -> PayloadSink | None:
        """A sink for the reply that `first` starts, if it answers the site's current task
        (anything else is reassembled and then refused: a replay, or too late)."""
        with self._lock:
            if (self._sink is None or first.site != session.site
                    or self._expected.get(session.site) != (first.round, first.nonce)):
                return None
            return self._sink(session.site)

    def _take_partial(self, session: _Session, first: Any) -> Partial | None:
        """The cut-off upload that `first` resumes (a site resumes only its own)."""
        with self._lock:
            if first.site != session.site:
                return None
            return self._partials.pop(session.site, None)

    def close(self) -> None:
        """Send DONE to every connected site, then stop listening."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.outbox.put(Message(Kind.DONE, site=session.site))
            session.outbox.put(None)  # ends the stream after DONE
        self._server.stop(grace=_CLOSE_GRACE_S).wait()
        self._pool.shutdown(wait=False)  # grpcio leaves the executor it was given running

    def Join(
        self, request_iterator: Iterator[frames.Chunk], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """One site's stream; grpcio runs it on a pool thread and sends what it yields."""
        peer = self._identify(context)
        try:
            # max_bytes=0: nothing is buffered for a peer that has not authenticated.
            hello = frames.read_message(request_iterator, max_bytes=0)
        except FedskyError as err:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except grpc.RpcError:
            return  # the peer left before saying hello
        if hello is None:
            return
        session = self._admit(hello, peer, context)
        threading.Thread(
            target=self._read, args=(session, request_iterator),
            name=f"fedsky-read-{session.site}", daemon=True,
        ).start()
        yield from frames.stream(session.outbox, self._chunk_bytes)
        if session.failure is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.failure)

    def _identify(self, context: grpc.ServicerContext) -> Peer | None:
        """The site named by the verified client certificate (None in plaintext); refuses
        revoked certificates and certificates that are not site certificates."""
        if self._tls is None:
            return None
        pem = context.auth_context().get("x509_pem_cert")
        if not pem:  # grpcio verified the chain; without a certificate it never gets here
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        peer = certs.peer_of(pem[0])
        if not peer.client_auth:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate {peer.name!r} is not a site certificate (no clientAuth)")
        try:
            revoked = certs.read_revoked(self._tls.revoked)  # reread: revocation needs no restart
        except FedskyError as err:  # fail closed: a broken list must not readmit anyone
            _refuse(context, grpc.StatusCode.UNAVAILABLE, str(err))
        if peer.serial in revoked:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                    f"the certificate of site {peer.name!r} (serial {peer.serial:x}) is revoked")
        return peer

    def _admit(self, hello: Message, peer: Peer | None, context: grpc.ServicerContext) -> _Session:
        """Register the site that said `hello`, or abort its stream with the reason."""
        if hello.kind is not Kind.HELLO:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "the first message must be HELLO")
        if hello.site not in self._sites:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"unknown site {hello.site!r}")
        if peer is not None and peer.name != hello.site:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate is for site {peer.name!r}, not {hello.site!r}")
        if self._tokens is not None:
            expected = self._tokens.get(hello.site, "")
            if not expected or not hmac.compare_digest(hello.token.encode(), expected.encode()):
                _refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                        f"wrong token for site {hello.site!r}")
        with self._lock:
            taken = hello.site in self._sessions
            if not taken:
                session = _Session(hello.site, holds=(hello.round_idx, hello.nonce, hello.offset))
                self._sessions[hello.site] = session
                if self._setup is not None:
                    session.outbox.put(Message(Kind.WELCOME, hello.site, payload=self._setup))
                self._lock.notify_all()
        if taken:
            _refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                    f"site {hello.site!r} is already connected")
        log.info("site %s joined from %s", hello.site, context.peer())
        self._inbox.put(_Arrival(session, None, joined=True))
        return session

    def _read(self, session: _Session, request_iterator: Iterator[frames.Chunk]) -> None:
        """Reader thread: the site's replies go to the inbox until its stream ends; an upload
        cut off mid-payload is kept for the site to resume."""
        try:
            while (msg := frames.read_message(
                    request_iterator,
                    open_sink=lambda first: self._open_sink(session, first),
                    resume=lambda first: self._take_partial(session, first))) is not None:
                if msg.kind not in (Kind.REPLY, Kind.ERROR):
                    raise FedskyError(f"got {msg.kind.name}; only REPLY or ERROR follow HELLO")
                if msg.site != session.site:  # a site speaks only as itself
                    raise FedskyError(f"a {msg.kind.name} for site {msg.site!r} on the stream "
                                      f"of site {session.site!r}")
                self._inbox.put(_Arrival(session, msg))
        except frames.Interrupted as err:
            if err.partial.kind is Kind.REPLY and err.partial.site == session.site:
                log.info("site %s: upload cut off after %d of %d bytes", session.site,
                         err.partial.received, err.partial.size)
                with self._lock:
                    self._partials[session.site] = err.partial
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


def _holds_part_of(session: _Session, round_idx: int, nonce: int | None, task: bytes) -> bool:
    """Whether the rejoined site said it holds the first bytes of exactly this task (the nonce
    is fresh per task, so a match means the same bytes), and not all of them."""
    held_round, held_nonce, held = session.holds
    return (nonce is not None and (held_round, held_nonce) == (round_idx, nonce)
            and 0 < held < len(task))


def _send_task(session: _Session, round_idx: int, task: bytes) -> int:
    """Queue a task with a fresh nonce (from the OS CSPRNG); return the nonce."""
    nonce = int.from_bytes(os.urandom(8), "little") or 1  # 0 is what an unset field reads as
    session.outbox.put(Message(Kind.TASK, session.site, round_idx, payload=task, nonce=nonce))
    return nonce


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
    """Log why a connection is refused (never its token) and end it with that status."""
    log.warning("refused a connection from %s: %s", context.peer(), reason)
    context.abort(code, reason)
    raise AssertionError("unreachable: context.abort raises")


def _bind(server: grpc.Server, host: str, port: int, tls: TlsFiles | None) -> int:
    """Add the listening port (mutual TLS unless `tls` is None); return the bound port."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = None if tls is None else channel.server_credentials(tls)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio gives no reason; a taken port is by far the usual one
        raise FedskyError(
            f"port {port} on {host} is already in use (or {host} is not an address of this "
            "machine); stop what holds it or choose another port (0 picks a free one)"
        ) from None
