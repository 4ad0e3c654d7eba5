"""What moving updates costs: bytes against fp32, transfer time on a link, egress dollars,
and how long a site's task takes on the virtual clock.

Pure functions over byte counts and a price table; the coordinator adds their results to each
round's record and `fedsky.metrics.summarize` totals them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedsky.config import JobConfig, SiteProfile
from fedsky.profiles import REFERENCE_TOKENS_PER_S

GB = 1 << 30  # clouds bill egress per GB of 2^30 bytes

# List prices, USD per GB, first pricing tier (2024-25), for traffic leaving a cloud:
# (to the internet or another cloud, to another region of the same cloud). Override per site
# with `profile.egress_usd_per_gb` (and the coordinator's with `coordinator.egress_usd_per_gb`).
EGRESS_USD_PER_GB: dict[str, tuple[float, float]] = {
    "aws": (0.09, 0.02),  # EC2 data transfer out to internet; inter-region
    "gcp": (0.12, 0.02),  # premium tier internet egress; inter-region within a continent
    "azure": (0.087, 0.02),  # internet egress, zone 1; inter-region
    "onprem": (0.0, 0.0),  # a data centre or hospital line paid as a flat rate
}
DEFAULT_USD_PER_GB = 0.09  # no cloud declared: priced as internet egress


def egress_price(cloud: str | None, peer: str | None, override: float | None) -> float:
    """USD per GB for traffic leaving `cloud` towards `peer` (the other end of the link)."""
    if override is not None:
        return override
    if cloud is None:
        return DEFAULT_USD_PER_GB
    internet, same_cloud = EGRESS_USD_PER_GB[cloud]
    return same_cloud if cloud == peer else internet


def cost_usd(n_bytes: int, usd_per_gb: float) -> float:
    return n_bytes / GB * usd_per_gb


def transfer_seconds(n_bytes: int, mbps: float, latency_ms: float) -> float:
    """One message on a link: one-way latency plus serialization at the link's rate."""
    return latency_ms / 1000 + n_bytes * 8 / (mbps * 1e6)


def compression_ratio(fp32_bytes: int, sent: int) -> float:
    """How many times fewer bytes than the dense fp32 update (raw tensor bytes, no framing)."""
    return fp32_bytes / sent if sent else float("inf")


@dataclass(frozen=True)
class Link:
    """A site's link as declared in its profile: Mbit/s each way and one-way latency."""

    up_mbps: float
    down_mbps: float
    latency_ms: float

    @classmethod
    def of(cls, profile: SiteProfile) -> Link:
        return cls(profile.up, profile.down, profile.latency_ms)


def links(job: JobConfig) -> dict[str, Link]:
    return {s.name: Link.of(s.profile) for s in job.sites}


def tokens_per_second(profile: SiteProfile) -> float:
    """The site's training speed: declared, or relative to `REFERENCE_TOKENS_PER_S`."""
    return profile.tokens_per_s or profile.compute * REFERENCE_TOKENS_PER_S


def site_local_steps(job: JobConfig, index: int) -> int:
    """Optimizer steps per task of site `index`: `local_steps`, or with
    `training.local_steps_by_speed` in proportion to its speed (the fastest site runs
    `local_steps`; DyLU, Liu et al. 2024, "Asynchronous Local-SGD Training for Language
    Modeling"), at least 1."""
    steps = job.training.local_steps
    if not job.training.local_steps_by_speed:
        return steps
    speeds = [tokens_per_second(s.profile) for s in job.sites]
    return max(1, math.floor(steps * speeds[index] / max(speeds) + 0.5))  # halves round up


def task_seconds(profile: SiteProfile, tokens: int, down_bytes: int, up_bytes: int) -> float:
    """Virtual time of one task at a site: receive the model, train `tokens`, send the update.

    Only the profile and the exact payload sizes enter, never a measured time, so the virtual
    clock gives the same answer on any host under any load."""
    link = Link.of(profile)
    return (transfer_seconds(down_bytes, link.down_mbps, link.latency_ms)
            + tokens / tokens_per_second(profile)
            + transfer_seconds(up_bytes, link.up_mbps, link.latency_ms))


def round_accounting(job: JobConfig, bytes_up: dict[str, int], bytes_down: dict[str, int],
                     fp32_bytes: int, messages_up: dict[str, int] | None = None,
                     messages_down: dict[str, int] | None = None) -> dict[str, Any]:
    """The round record's accounting fields, per site.

    Uploads are billed at the site's egress price, downloads at the coordinator's; each side's
    price depends on whether the other end is in the same cloud. `messages_*`: how many
    payloads each site's bytes are (an async record's; default one).
    """
    coord = job.coordinator
    profiles = {s.name: s.profile for s in job.sites}
    up_n, down_n = messages_up or {}, messages_down or {}
    rec: dict[str, Any] = {
        "fp32_bytes": fp32_bytes,  # one dense fp32 update: what the ratios compare against
        "compression_ratio": {s: compression_ratio(fp32_bytes * up_n.get(s, 1), n)
                              for s, n in bytes_up.items()},
        "compression_ratio_down": {s: compression_ratio(fp32_bytes * down_n.get(s, 1), n)
                                   for s, n in bytes_down.items()},
        "cost_usd": {},
    }
    sites = list(dict.fromkeys([*bytes_down, *bytes_up]))  # an async site may only upload
    for site in sites:
        p = profiles[site]
        up_price = egress_price(p.cloud, coord.cloud, p.egress_usd_per_gb)
        down_price = egress_price(coord.cloud, p.cloud, coord.egress_usd_per_gb)
        rec["cost_usd"][site] = (cost_usd(bytes_up.get(site, 0), up_price)
                                 + cost_usd(bytes_down.get(site, 0), down_price))
    if job.transport.emulate_links:
        rec["transfer_s"] = {}
        for site in sites:
            link = Link.of(profiles[site])
            down = (transfer_seconds(bytes_down[site], link.down_mbps, link.latency_ms)
                    if site in bytes_down else 0.0)
            up = (transfer_seconds(bytes_up[site], link.up_mbps, link.latency_ms)
                  if site in bytes_up else 0.0)
            rec["transfer_s"][site] = {"down": down, "up": up}
    return rec
