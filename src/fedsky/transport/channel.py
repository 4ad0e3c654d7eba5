"""gRPC settings both ends share: message limits, keepalives, mutual-TLS credentials, and the
Join method bound to `frames.encode` / `frames.decode` (the generated stubs would copy every
chunk through protobuf)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from fedsky.certs import TlsFiles
from fedsky.errors import FedskyError
from fedsky.transport import frames

_SERVICE = "fedsky.Federation"  # as in fedsky.proto
_JOIN = f"/{_SERVICE}/Join"
# How long a keepalive ping may go unanswered before the peer is declared dead.
_KEEPALIVE_TIMEOUT_S = 20.0


def options(chunk_bytes: int, keepalive_s: float, server: bool) -> list[tuple[str, int]]:
    """Message limits of one chunk, and HTTP/2 keepalive pings every `keepalive_s`.

    Keepalives find a dead peer (a preempted VM, a dropped NAT mapping) within keepalive_s +
    20 s even while no frame is due, instead of waiting for the round's deadline; they also
    keep idle connections open through cloud load balancers and NAT, which drop them after
    minutes of silence.
    """
    limit = frames.max_frame_bytes(chunk_bytes)
    opts = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(_KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # a site trains for minutes in silence
    ]
    if server:
        # Accept the sites' pings at this rate (grpcio's default, 5 min, would make the server
        # answer a site's 30 s pings with GOAWAY "too_many_pings").
        opts += [("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 500)),
                 ("grpc.http2.max_ping_strikes", 0)]
    return opts


def read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise FedskyError(f"cannot read {what} {path}: {err.strerror}") from None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS that also requires each site's certificate, verified against the project CA."""
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key, "TLS key"), read_pem(tls.cert, "TLS certificate"))],
        root_certificates=read_pem(tls.ca, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """The site's side: trust only the project CA, and present the site's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca, "CA certificate"),
        private_key=read_pem(tls.key, "TLS key"),
        certificate_chain=read_pem(tls.cert, "TLS certificate"),
    )


def join_handler(join: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[bytes]],
                 ) -> grpc.GenericRpcHandler:
    """The server's Join method: requests decoded to `frames.Chunk`s, responses pre-encoded."""
    method = grpc.stream_stream_rpc_method_handler(
        join, request_deserializer=frames.decode, response_serializer=frames.encode)
    return grpc.method_handlers_generic_handler(_SERVICE, {"Join": method})


def join(channel: grpc.Channel, requests: Iterator[bytes]) -> Any:
    """The site's side of Join: a call that yields `frames.Chunk`s."""
    call = channel.stream_stream(_JOIN, request_serializer=frames.encode,
                                 response_deserializer=frames.decode)
    return call(requests)
