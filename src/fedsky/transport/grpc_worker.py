"""Site side of the gRPC transport: dial the coordinator and answer its tasks until DONE.

The site always dials out, so it needs no open inbound port: it works from behind NAT and
cloud firewalls. The handler runs on the calling thread; grpcio sends the replies from its own
thread by pulling them out of a queue.
"""

from __future__ import annotations

import logging
import queue
import random
from pathlib import Path

import grpc

from fedsky.errors import FedskyError
from fedsky.transport import fedsky_pb2_grpc, frames
from fedsky.transport.base import SiteFactory, SiteHandler
from fedsky.transport.frames import Kind, Message

log = logging.getLogger("fedsky.transport")

_FIRST_WAIT_S = 0.5  # the first attempt's wait; it doubles after each failure (5 tries: ~15 s)
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS)


def serve_site(
    address: str,
    site: str,
    token: str,
    factory: SiteFactory,
    *,
    tls_ca: str | None = None,
    connect_retries: int = 5,
    chunk_bytes: int = 1 << 20,
) -> None:
    """Join the federation at `address` as `site` and serve tasks until the coordinator is done.

    Args:
        address: The coordinator's "host:port".
        site: This site's name, as the coordinator knows it.
        token: This site's shared secret.
        factory: Builds the task handler from the setup payload, once joined.
        tls_ca: PEM file of the CA (or self-signed certificate) to trust; None for plaintext.
        connect_retries: How many times to try reaching the coordinator before giving up.
        chunk_bytes: Largest piece of a reply in one gRPC message.

    Raises:
        FedskyError: The coordinator is unreachable, refuses this site, or drops the
            connection before saying DONE.
    """
    channel = _connect(address, tls_ca, connect_retries, chunk_bytes)
    outbox: queue.Queue[Message | None] = queue.Queue()
    outbox.put(Message(Kind.HELLO, site=site, token=token))
    responses = fedsky_pb2_grpc.FederationStub(channel).Join(frames.stream(outbox, chunk_bytes))
    try:
        incoming = frames.messages(responses)
        welcome = next(incoming, None)
        if welcome is None or welcome.kind is not Kind.WELCOME:
            raise FedskyError(f"coordinator at {address} did not welcome site {site!r}")
        log.info("site %s joined the coordinator at %s", site, address)
        handler = factory(site, welcome.payload)
        for msg in incoming:
            if msg.kind is Kind.DONE:
                log.info("site %s: the coordinator is done", site)
                return
            if msg.kind is not Kind.TASK:
                raise FedskyError(f"coordinator at {address} sent an unexpected {msg.kind.name}")
            outbox.put(_answer(handler, site, msg))
        raise FedskyError(f"coordinator at {address} ended the session without DONE")
    except grpc.RpcError as err:
        if err.code() in _REFUSALS:
            raise FedskyError(
                f"coordinator at {address} refused site {site!r}: {err.details()}"
            ) from None
        raise FedskyError(
            f"lost the connection to the coordinator at {address}: "
            f"{err.code().name}: {err.details()}"
        ) from None
    finally:
        outbox.put(None)
        responses.cancel()
        channel.close()


def _answer(handler: SiteHandler, site: str, task: Message) -> Message:
    """Run the handler on one task; a failure becomes an ERROR for that round, not a crash."""
    try:
        reply = handler(task.payload)
        if not isinstance(reply, bytes):
            raise TypeError(f"the site handler returned {type(reply).__name__}, not bytes")
    except Exception as err:  # noqa: BLE001 (any handler failure is reported, then we go on)
        log.exception("site %s: task for round %d failed", site, task.round_idx)
        return Message(Kind.ERROR, site, task.round_idx, message=str(err) or type(err).__name__)
    return Message(Kind.REPLY, site, task.round_idx, payload=reply)


def _connect(address: str, tls_ca: str | None, retries: int, chunk_bytes: int) -> grpc.Channel:
    """A channel that is ready, after up to `retries` waits that double (with jitter)."""
    limit = frames.max_frame_bytes(chunk_bytes)
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # grpcio shares one connection among all channels to a target in a process; a site
        # gets its own, so a retry really reconnects and sites in one process stay apart.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    credentials = None
    if tls_ca is not None:
        try:
            ca = Path(tls_ca).read_bytes()
        except OSError as err:
            raise FedskyError(f"cannot read TLS CA file {tls_ca}: {err.strerror}") from None
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    wait_s = _FIRST_WAIT_S
    for attempt in range(1, retries + 1):
        # A fresh channel per attempt, so grpcio's own reconnect backoff (up to minutes)
        # does not stretch our bounded schedule.
        if credentials is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, credentials, options=options)
        ready = grpc.channel_ready_future(channel)
        try:
            # Jitter spreads out many sites retrying against one coordinator.
            ready.result(timeout=wait_s * random.uniform(0.8, 1.2))
            return channel
        except grpc.FutureTimeoutError:
            ready.cancel()
            channel.close()
            log.info("coordinator at %s not reachable (attempt %d of %d)", address, attempt,
                     retries)
        wait_s *= 2
    raise FedskyError(
        f"cannot reach coordinator at {address} after {retries} attempts; check the address, "
        "that the coordinator is running, the firewall, and the TLS settings (tls_ca)"
    )
