"""The transport seam: one small Protocol, two implementations (in-process, gRPC)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

# A site's side of the conversation: given a task payload, return the reply payload.
SiteHandler = Callable[[bytes], bytes]
# Builds a site's handler once it has joined: (site name, setup payload) -> handler.
SiteFactory = Callable[[str, bytes], SiteHandler]


class Transport(Protocol):
    """Coordinator-side view of the network. Payloads are opaque bytes (see `fedsky.wire`)."""

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        """Wait for the sites to join and hand each the `setup` payload; return who joined."""
        ...

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, bytes]:
        """Send each site its task; return the replies that arrived within `deadline_s`.

        A site that misses the deadline, fails, or is disconnected is absent from the result.
        A reply that arrives after its round is over is discarded.
        """
        ...

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        """Tell `site` that its reply for `round_idx` was refused, and why (validation)."""
        ...

    def close(self) -> None:
        """Tell every site the job is over and release resources."""
        ...
