"""Site side of the gRPC transport: dial the coordinator and answer its tasks until DONE.

The site always dials out, so it needs no open inbound port: it works from behind NAT and
cloud firewalls. It proves who it is with its TLS client certificate (`fedsky certs site`).
A lost connection (the coordinator restarted, the network dropped, keepalives found the peer
dead) is not the end: the site reconnects with exponential backoff and jitter and joins again;
if the coordinator's setup is unchanged it keeps its state (error feedback, optimizer), and it
takes the current round's task if that round is still open; if it was cut off mid-upload, the
coordinator asks it to RESUME and it sends the rest of the same reply (the site keeps its last
reply until the next task for this); if it was cut off while downloading its task, it keeps
what arrived and its HELLO says how far it got, so the coordinator sends only the rest of that
same task (a multi-GB model is not sent twice). The handler runs on the calling
thread; grpcio sends the replies from its own thread by pulling them out of a queue.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import grpc

from fedsky.certs import TlsFiles
from fedsky.errors import FedskyError
from fedsky.transport import channel as grpc_channel
from fedsky.transport import frames
from fedsky.transport.base import SiteFactory, SiteHandler
from fedsky.transport.frames import Kind, Message, Partial

log = logging.getLogger("fedsky.transport")

_FIRST_WAIT_S = 0.5  # the first attempt's wait; it doubles after each failure
_MAX_WAIT_S = 30.0  # ... up to this (10 tries: about 2.5 minutes in all)
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
             grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass
class _Held:
    """What survives a reconnect: the setup this site was built from, its handler, and its
    last reply (an upload the coordinator may ask to resume)."""

    setup: bytes | None = None
    handler: SiteHandler | None = None
    last_reply: Message | None = None
    task_part: Partial | None = None  # a task download cut off part-way

    def resume_task(self, first: Any) -> Partial | None:
        """The cut-off download a TASK frame starting past byte 0 continues (`frames.read_message`
        checks it is the same task and starts where it ended)."""
        part, self.task_part = self.task_part, None
        return part

    def hello(self, site: str, token: str) -> Message:
        """HELLO, saying which task (round, nonce) this site holds how many bytes of."""
        part = self.task_part
        if part is None:
            return Message(Kind.HELLO, site=site, token=token)
        return Message(Kind.HELLO, site=site, token=token, round_idx=part.round_idx,
                       nonce=part.nonce, offset=part.received)


def serve_site(
    address: str,
    site: str,
    factory: SiteFactory,
    *,
    token: str = "",
    tls: TlsFiles | None = None,
    connect_retries: int = 5,
    chunk_bytes: int = 1 << 20,
    keepalive_s: float = 30.0,
) -> None:
    """Join the federation at `address` as `site` and serve tasks until the coordinator is done.

    Args:
        address: The coordinator's "host:port".
        site: This site's name, as the coordinator knows it (and as its certificate says).
        factory: Builds the task handler from the setup payload, once joined.
        token: This site's shared secret, if the coordinator checks one (always in plaintext).
        tls: The project CA and this site's certificate and key; None for plaintext.
        connect_retries: Attempts to reach the coordinator, and lost connections in a row
            (without rejoining in between), before giving up.
        chunk_bytes: Largest piece of a reply in one gRPC message.
        keepalive_s: Interval of keepalive pings that detect a dead coordinator.

    Raises:
        FedskyError: The coordinator is unreachable, refuses this site, or keeps dropping it.
    """
    held = _Held()
    lost = 0
    while True:
        channel = _connect(address, tls, connect_retries, chunk_bytes, keepalive_s)
        try:
            done, welcomed = _serve_once(channel, address, site, token, factory, held,
                                         chunk_bytes)
        finally:
            channel.close()
        if done:
            return
        lost = 0 if welcomed else lost + 1
        if lost >= connect_retries:
            raise FedskyError(f"the coordinator at {address} dropped site {site!r} {lost} times "
                              "in a row before welcoming it; giving up")
        wait_s = _backoff(lost)
        log.warning("site %s: reconnecting to %s in %.1fs", site, address, wait_s)
        time.sleep(wait_s)


def _serve_once(channel: grpc.Channel, address: str, site: str, token: str,
                factory: SiteFactory, held: _Held, chunk_bytes: int) -> tuple[bool, bool]:
    """One session on a ready channel; returns (the coordinator said DONE, it welcomed us)."""
    outbox: queue.Queue[Message | None] = queue.Queue()
    outbox.put(held.hello(site, token))
    responses = grpc_channel.join(channel, frames.stream(outbox, chunk_bytes))
    welcomed = False
    try:
        incoming = frames.messages(responses, resume=held.resume_task)
        welcome = next(incoming, None)
        if welcome is None:
            log.warning("site %s: the coordinator at %s closed the stream before welcoming it",
                        site, address)
            return False, False
        if welcome.kind is not Kind.WELCOME:
            raise FedskyError(f"coordinator at {address} did not welcome site {site!r}")
        welcomed = True
        if held.handler is None or welcome.payload != held.setup:
            held.handler = factory(site, welcome.payload)
            held.setup = welcome.payload
            log.info("site %s joined the coordinator at %s", site, address)
        else:
            log.info("site %s rejoined the coordinator at %s (same job: state kept)", site,
                     address)
        for msg in incoming:
            if msg.kind is Kind.DONE:
                log.info("site %s: the coordinator is done", site)
                return True, True
            if msg.kind is Kind.REJECT:
                log.warning("site %s: the coordinator rejected its reply for round %d: %s",
                            site, msg.round_idx, msg.message)
                continue
            if msg.kind is Kind.RESUME:
                outbox.put(_resume(held, site, msg))
                continue
            if msg.kind is not Kind.TASK:
                raise FedskyError(f"coordinator at {address} sent an unexpected {msg.kind.name}")
            held.last_reply = held.task_part = None  # a new task: nothing older resumes
            held.last_reply = _answer(held.handler, site, msg)
            outbox.put(held.last_reply)
        log.warning("site %s: the coordinator at %s ended the session without DONE", site,
                    address)
        return False, welcomed
    except frames.Interrupted as err:
        if err.partial.kind is Kind.TASK:
            held.task_part = err.partial
            log.warning("site %s: lost the connection to %s after %d of the %d bytes of its "
                        "task for round %d; it will ask for the rest", site, address,
                        err.partial.received, err.partial.size, err.partial.round_idx)
        else:
            log.warning("site %s: lost the connection to %s: %s", site, address, err)
        return False, welcomed
    except grpc.RpcError as err:
        if err.code() in _REFUSALS:
            raise FedskyError(
                f"coordinator at {address} refused site {site!r}: {err.details()}"
            ) from None
        log.warning("site %s: lost the connection to the coordinator at %s: %s: %s", site,
                    address, err.code().name, err.details())
        return False, welcomed
    finally:
        outbox.put(None)
        responses.cancel()


def _answer(handler: SiteHandler, site: str, task: Message) -> Message:
    """Run the handler on one task; a failure becomes an ERROR for that round, not a crash.
    The reply carries the task's nonce, which is how the coordinator tells it from a replay."""
    try:
        reply = handler(task.payload)
        if not isinstance(reply, bytes):
            # Any bytes-like reply is sent as it lies, e.g. an mmap of an update file on disk:
            # a multi-GB update then crosses the wire without a copy in the site's memory.
            try:
                reply = memoryview(reply).cast("B")
            except TypeError:
                raise TypeError(f"the site handler returned {type(reply).__name__}, not "
                                "bytes-like") from None
    except Exception as err:
        log.exception("site %s: task for round %d failed", site, task.round_idx)
        return Message(Kind.ERROR, site, task.round_idx, message=str(err) or type(err).__name__,
                       nonce=task.nonce)
    return Message(Kind.REPLY, site, task.round_idx, payload=reply, nonce=task.nonce)


def _resume(held: _Held, site: str, msg: Message) -> Message:
    """The rest of the reply the coordinator asks for, from the byte it got up to."""
    last = held.last_reply
    if last is None or (last.kind, last.round_idx, last.nonce) != (Kind.REPLY, msg.round_idx,
                                                                   msg.nonce):
        return Message(Kind.ERROR, site, msg.round_idx, nonce=msg.nonce,
                       message="asked to resume an upload this site no longer holds")
    log.info("site %s: resuming its upload for round %d at byte %d of %d", site,
             msg.round_idx, msg.offset, len(last.payload))
    return replace(last, offset=msg.offset)


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so sites that lost one coordinator do not all
    reconnect in the same instant."""
    return min(_MAX_WAIT_S, _FIRST_WAIT_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def _connect(address: str, tls: TlsFiles | None, retries: int, chunk_bytes: int,
             keepalive_s: float) -> grpc.Channel:
    """A channel that is ready, after up to `retries` waits that double (with jitter)."""
    options = [
        *grpc_channel.options(chunk_bytes, keepalive_s, server=False),
        # grpcio shares one connection among all channels to a target in a process; a site
        # gets its own, so a retry really reconnects and sites in one process stay apart.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    credentials = None if tls is None else grpc_channel.channel_credentials(tls)
    for attempt in range(1, retries + 1):
        # A fresh channel per attempt, so grpcio's own reconnect backoff (up to minutes)
        # does not stretch our bounded schedule.
        if credentials is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, credentials, options=options)
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=_backoff(attempt))
            return channel
        except grpc.FutureTimeoutError:
            ready.cancel()
            channel.close()
            log.info("coordinator at %s not reachable (attempt %d of %d)", address, attempt,
                     retries)
    raise FedskyError(
        f"cannot reach coordinator at {address} after {retries} attempts; check the address, "
        "that the coordinator is running, the firewall, and the TLS files (a TLS handshake "
        "fails the same way: wrong CA, or a certificate the coordinator does not accept)"
    )
