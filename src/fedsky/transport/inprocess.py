"""In-process transport: sites are handlers called in this process, one after another.

Fast and deterministic (sites run in a fixed order), and it moves the very same serialized
payloads as gRPC, so simulation exercises the wire format. Given the sites' links, it emulates
them: each transfer waits latency + bytes / bandwidth, so wall time reflects the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from fedsky.accounting import Link, transfer_seconds
from fedsky.errors import FedskyError
from fedsky.transport.base import SiteFactory, SiteHandler

log = logging.getLogger("fedsky.transport")


class InProcessTransport:
    def __init__(self, factory: SiteFactory, links: Mapping[str, Link] | None = None) -> None:
        """`links`: emulate these sites' links (sleep per transfer); None: instant transfers."""
        self._factory = factory
        self._handlers: dict[str, SiteHandler] = {}
        self._links = dict(links or {})

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        for site in sites:
            self._handlers[site] = self._factory(site, setup)
        return list(sites)

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, bytes]:
        """Runs each site to completion; a site slower than the deadline is dropped after it."""
        replies: dict[str, bytes] = {}
        for site, task in tasks.items():
            start = time.perf_counter()
            link = self._links.get(site)
            if link is not None:
                time.sleep(transfer_seconds(len(task), link.down_mbps, link.latency_ms))
            try:
                reply = self._handlers[site](task)
            except FedskyError as err:  # as over gRPC: the site is out of this exchange
                log.warning("round %d: site %s failed: %s", round_idx, site, err)
                continue
            if link is not None:
                time.sleep(transfer_seconds(len(reply), link.up_mbps, link.latency_ms))
            elapsed = time.perf_counter() - start
            if elapsed > deadline_s:
                log.warning(
                    "round %d: site %s took %.1fs, past the %.1fs deadline; dropped",
                    round_idx, site, elapsed, deadline_s,
                )
                continue
            replies[site] = reply
        return replies

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        """The site runs in this process: the coordinator's log line is all there is to say."""

    def close(self) -> None:
        self._handlers.clear()
