"""Messages <-> protobuf Frames: the only module that touches the generated message classes.

A message (HELLO, WELCOME, TASK, REPLY, DONE, ERROR) travels as one or more Frames. Payloads
are cut into chunks of at most `chunk_bytes` so that no single gRPC message is large: gRPC
refuses messages over 4 MiB by default and protobuf cannot encode one over 2 GiB, while a model
update can be many GiB. Every chunk carries a CRC-32 of its data and the payload's total size,
so a corrupted or truncated chunk is caught at the frame it arrives in, end to end (TLS protects
the wire, not the buffers on either side of it). Everything that arrives is checked, because it
comes from the network.
"""

from __future__ import annotations

import enum
import queue
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fedsky.errors import FedskyError
from fedsky.transport.fedsky_pb2 import Frame

MAX_PAYLOAD_BYTES = 16 << 30  # default cap on one reassembled payload (16 GiB)
MAX_TEXT_CHARS = 4096  # an ERROR message is cut to this, so a frame's header stays small
_HEADER_ROOM = 64 << 10  # bytes a frame may need beyond its chunk: names, token, message
_GRPC_DEFAULT_LIMIT = 4 << 20  # grpcio's default maximum receive size (4 MiB)


class Kind(enum.IntEnum):
    """What a message is; the values are the wire values of `Frame.Kind`."""

    HELLO = Frame.HELLO
    WELCOME = Frame.WELCOME
    TASK = Frame.TASK
    REPLY = Frame.REPLY
    DONE = Frame.DONE
    ERROR = Frame.ERROR
    REJECT = Frame.REJECT


# Only these kinds carry a payload; the others are one frame with no data, so a peer that has
# not said HELLO yet cannot make us buffer anything.
_PAYLOAD_KINDS = frozenset({Kind.WELCOME, Kind.TASK, Kind.REPLY})


@dataclass(frozen=True)
class Message:
    """One whole message, as the coordinator and the worker see it."""

    kind: Kind
    site: str = ""
    round_idx: int = 0
    token: str = ""  # HELLO only
    payload: bytes = b""  # WELCOME, TASK, REPLY
    message: str = ""  # ERROR and REJECT
    nonce: int = 0  # TASK: fresh per task; the REPLY or ERROR to it carries the same


def max_frame_bytes(chunk_bytes: int) -> int:
    """The gRPC message size limit both sides set: one chunk plus headers, never a payload.

    Never below grpcio's default, so two sides configured with different small chunk sizes
    still understand each other.
    """
    return max(chunk_bytes + _HEADER_ROOM, _GRPC_DEFAULT_LIMIT)


def to_frames(msg: Message, chunk_bytes: int) -> Iterator[Frame]:
    """Split a message into Frames, each carrying at most `chunk_bytes` of its payload."""
    if chunk_bytes < 1:
        raise FedskyError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if msg.payload and msg.kind not in _PAYLOAD_KINDS:
        raise FedskyError(f"a {msg.kind.name} message carries no payload")
    header = dict(
        kind=int(msg.kind),
        site=msg.site,
        round=msg.round_idx,
        token=msg.token,
        message=msg.message[:MAX_TEXT_CHARS],
        nonce=msg.nonce,
        size=len(msg.payload),
    )
    payload = memoryview(msg.payload)
    n_chunks = max(1, -(-len(payload) // chunk_bytes))  # an empty payload is still one frame
    for seq in range(n_chunks):
        chunk = bytes(payload[seq * chunk_bytes : (seq + 1) * chunk_bytes])
        yield Frame(data=chunk, seq=seq, last=seq == n_chunks - 1, crc32=zlib.crc32(chunk),
                    **header)


def read_message(frames: Iterator[Frame], max_bytes: int = MAX_PAYLOAD_BYTES) -> Message | None:
    """Read the next whole message from a stream of Frames.

    Args:
        frames: The incoming stream; consumed up to and including the message's last chunk.
        max_bytes: Largest payload accepted; 0 admits only payload-free messages (HELLO).

    Returns:
        The message, or None when the stream ended cleanly between messages.

    Raises:
        FedskyError: A chunk is missing, repeated, out of order, of another message, corrupted
            (CRC-32) or truncated (total size), the payload is over `max_bytes`, the kind is
            unknown, or the stream stopped mid-message.
    """
    first = next(frames, None)
    if first is None:
        return None
    kind = _kind(first)
    chunks: list[bytes] = []
    size = 0
    frame = first
    while True:
        if frame.seq != len(chunks):
            problem = "duplicate" if frame.seq < len(chunks) else "missing chunks before"
            raise FedskyError(
                f"{kind.name} from {first.site!r}: {problem} chunk {frame.seq} "
                f"(expected chunk {len(chunks)})"
            )
        if (frame.kind, frame.round, frame.site, frame.nonce, frame.size) != (
            first.kind, first.round, first.site, first.nonce, first.size
        ):
            raise FedskyError(
                f"{kind.name} from {first.site!r}: chunk {frame.seq} belongs to another message"
            )
        if frame.data and kind not in _PAYLOAD_KINDS:
            raise FedskyError(f"{kind.name} from {first.site!r} carries data; it must not")
        if zlib.crc32(frame.data) != frame.crc32:
            raise FedskyError(f"{kind.name} from {first.site!r}: chunk {frame.seq} is corrupted "
                              "(CRC-32 mismatch)")
        size += len(frame.data)
        if first.size > max_bytes or size > max_bytes:
            raise FedskyError(
                f"{kind.name} from {first.site!r} is over the {max_bytes}-byte payload limit"
            )
        if size > first.size:
            raise FedskyError(f"{kind.name} from {first.site!r}: chunk {frame.seq} goes past "
                              f"the declared {first.size} bytes")
        chunks.append(frame.data)
        if frame.last:
            if size != first.size:
                raise FedskyError(f"{kind.name} from {first.site!r} is truncated: {size} of "
                                  f"{first.size} bytes")
            break
        if kind not in _PAYLOAD_KINDS:
            raise FedskyError(f"{kind.name} from {first.site!r} must be a single frame")
        frame = next(frames, None)
        if frame is None:
            raise FedskyError(f"stream ended in the middle of a {kind.name} from {first.site!r}")
    return Message(
        kind=kind,
        site=first.site,
        round_idx=first.round,
        token=first.token,
        payload=b"".join(chunks),
        message=first.message[:MAX_TEXT_CHARS],
        nonce=first.nonce,
    )


def messages(frames: Iterator[Frame], max_bytes: int = MAX_PAYLOAD_BYTES) -> Iterator[Message]:
    """All messages of a Frame stream, in order, until it ends (see `read_message`)."""
    while (msg := read_message(frames, max_bytes)) is not None:
        yield msg


def stream(outbox: queue.Queue[Message | None], chunk_bytes: int) -> Iterator[Frame]:
    """The outgoing side of a Join stream: frames of each queued message until a None.

    grpcio pulls from this generator on its own thread, so the sending side just puts whole
    messages in `outbox` and never blocks on the network.
    """
    while (msg := outbox.get()) is not None:
        yield from to_frames(msg, chunk_bytes)


def _kind(frame: Frame) -> Kind:
    try:
        return Kind(frame.kind)
    except ValueError:
        raise FedskyError(f"frame from {frame.site!r} has unknown kind {frame.kind}") from None
