"""The transport seam: one small Protocol, two implementations (in-process, gRPC)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A site's side of the conversation: given a task payload, return the reply payload (over gRPC
# any bytes-like reply is accepted too, such as an mmap of an update on disk).
SiteHandler = Callable[[bytes], bytes]
# Builds a site's handler once it has joined: (site name, setup payload) -> handler.
SiteFactory = Callable[[str, bytes], SiteHandler]


@dataclass(frozen=True)
class Reply:
    """What `poll` hands the async loop: one site's answer to the task it was `submit`ted."""

    site: str
    tag: int | None  # the task's tag, echoed; None when the site disconnected
    payload: bytes | None  # None: the site failed (see `reason`) or disconnected
    reason: str = ""


class PayloadSink(Protocol):
    """Takes a payload's bytes as they arrive, in order, instead of a reassembly buffer."""

    def write(self, offset: int, data: memoryview) -> None:
        """`data` is the payload's bytes [offset, offset + len(data)); raise FedskyError to
        refuse the message (the stream is then cut with that reason)."""
        ...

    def close(self) -> Any:
        """The last byte arrived; the return value becomes the message's result."""
        ...


class Transport(Protocol):
    """Coordinator-side view of the network. Payloads are opaque bytes (see `fedsky.wire`)."""

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        """Wait for the sites to join and hand each the `setup` payload; return who joined."""
        ...

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float,
        sink: Callable[[str], PayloadSink] | None = None,
    ) -> dict[str, Any]:
        """Send each site its task; return the replies that arrived within `deadline_s`.

        A site that misses the deadline, fails, or is disconnected is absent from the result.
        A reply that arrives after its round is over is discarded. With `sink`, each reply is
        handed to `sink(site)` as it arrives, and the result holds what the sink's `close`
        returned instead of the payload (streaming aggregation, `fedsky.streaming`).
        """
        ...

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        """Tell `site` that its reply for `round_idx` was refused, and why (validation)."""
        ...

    def submit(self, site: str, tag: int, task: bytes) -> bool:
        """Send one site a task and return at once (the async loop); False if it is gone.

        `tag` travels with the task and comes back with its reply (where `exchange` puts the
        round number)."""
        ...

    def poll(self, timeout_s: float) -> Reply | None:
        """The next reply, failure or disconnect of any site; None if none within `timeout_s`."""
        ...

    def close(self) -> None:
        """Tell every site the job is over and release resources."""
        ...
