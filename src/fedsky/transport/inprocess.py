"""In-process transport: sites are handlers called in this process, one after another.

Fast and deterministic (sites run in a fixed order), and it moves the very same serialized
payloads as gRPC, so simulation exercises the wire format. Given the sites' links, it emulates
them: each transfer waits latency + bytes / bandwidth, so wall time reflects the network.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedsky.accounting import Link, transfer_seconds
from fedsky.errors import FedskyError
from fedsky.transport.base import PayloadSink, Reply, SiteFactory, SiteHandler

_SINK_CHUNK_BYTES = 1 << 20  # a sink takes a reply in pieces of this size, as over gRPC

log = logging.getLogger("fedsky.transport")


class InProcessTransport:
    def __init__(self, factory: SiteFactory, links: Mapping[str, Link] | None = None) -> None:
        """`links`: emulate these sites' links (sleep per transfer); None: instant transfers."""
        self._factory = factory
        self._handlers: dict[str, SiteHandler] = {}
        self._links = dict(links or {})
        self._replies: deque[Reply] = deque()  # submitted tasks' replies, until polled

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        for site in sites:
            self._handlers[site] = self._factory(site, setup)
        return list(sites)

    def exchange(
        self, round_idx: int, tasks: Mapping[str, bytes], deadline_s: float,
        sink: Callable[[str], PayloadSink] | None = None,
    ) -> dict[str, Any]:
        """Runs each site to completion; a site slower than the deadline is dropped after it.
        With `sink`, each reply is fed to `sink(site)` in 1 MiB pieces (see GrpcTransport)."""
        replies: dict[str, Any] = {}
        for site, task in tasks.items():
            start = time.perf_counter()
            try:
                reply = self._run(site, task)
            except FedskyError as err:  # as over gRPC: the site is out of this exchange
                log.warning("round %d: site %s failed: %s", round_idx, site, err)
                continue
            elapsed = time.perf_counter() - start
            if elapsed > deadline_s:
                log.warning(
                    "round %d: site %s took %.1fs, past the %.1fs deadline; dropped",
                    round_idx, site, elapsed, deadline_s,
                )
                continue
            replies[site] = reply if sink is None else _feed(sink(site), reply)
        return replies

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        """The site runs in this process: the coordinator's log line is all there is to say."""

    def submit(self, site: str, tag: int, task: bytes) -> bool:
        """Runs the site on its task now; the reply waits for `poll`."""
        if site not in self._handlers:
            return False
        try:
            self._replies.append(Reply(site, tag, self._run(site, task)))
        except FedskyError as err:  # as over gRPC: an ERROR for this task
            self._replies.append(Reply(site, tag, None, str(err)))
        return True

    def poll(self, timeout_s: float) -> Reply | None:
        """Replies in the order their tasks were submitted (there is nothing to wait for)."""
        return self._replies.popleft() if self._replies else None

    def _run(self, site: str, task: bytes) -> bytes:
        """The site's handler on one task, with the link's delays when emulated."""
        link = self._links.get(site)
        if link is not None:
            time.sleep(transfer_seconds(len(task), link.down_mbps, link.latency_ms))
        reply = self._handlers[site](task)
        if link is not None:
            time.sleep(transfer_seconds(len(reply), link.up_mbps, link.latency_ms))
        return reply

    def close(self) -> None:
        self._handlers.clear()
        self._replies.clear()


def _feed(sink: PayloadSink, payload: bytes) -> Any:
    view = memoryview(payload)
    for start in range(0, len(payload), _SINK_CHUNK_BYTES):
        sink.write(start, view[start : start + _SINK_CHUNK_BYTES])
    return sink.close()
