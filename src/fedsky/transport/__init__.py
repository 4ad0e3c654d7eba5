"""Transports move opaque payloads between the coordinator and its sites.

The coordinator never depends on how: the same round loop runs over the in-process transport
(simulation, tests) and over gRPC (processes, hosts, clouds).
"""

from fedsky.transport.base import SiteHandler, SiteFactory, Transport

__all__ = ["SiteHandler", "SiteFactory", "Transport"]
