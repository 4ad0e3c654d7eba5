"""Site profile presets for typical cloud regions, and the speed `compute = 1` stands for.

A preset fills in a site's link, cloud and price; any key the job also gives overrides it:
`profile = { preset = "azure-eastasia", compute = 0.25 }`. The numbers are rough and meant as
a starting point, not a measurement: links and one-way latencies are typical internet paths
to a coordinator in US East; `usd_per_hour` is an on-demand list price (2024) of one
A100-class GPU in that region (AWS: p4d.24xlarge / 8; the others are their nearest A100
offers). Measure your own links and set them.
"""

from __future__ import annotations

from typing import Any

_TABLE = [  # name, cloud, Mbit/s (both ways), one-way latency (ms), USD per GPU-hour
    ("aws-us-east-1", "aws", 1000.0, 5.0, 4.10),
    ("aws-eu-west-1", "aws", 500.0, 40.0, 4.50),
    ("gcp-us-central1", "gcp", 1000.0, 15.0, 3.67),
    ("gcp-europe-west4", "gcp", 500.0, 45.0, 4.04),
    ("azure-eastus", "azure", 1000.0, 5.0, 3.67),
    ("azure-eastasia", "azure", 200.0, 110.0, 4.40),
    ("onprem-hospital", "onprem", 50.0, 20.0, 0.0),
]
PRESETS: dict[str, dict[str, Any]] = {
    name: {"cloud": cloud, "bandwidth_mbps": mbps, "latency_ms": ms, "usd_per_hour": usd}
    for name, cloud, mbps, ms, usd in _TABLE
}

# Training tokens per second of a site that declares `compute = 1` and no `tokens_per_s`
# (the virtual clock's unit of compute; a site with compute = 4 trains 4x as fast).
REFERENCE_TOKENS_PER_S = 10_000.0


def with_preset(profile: dict[str, Any]) -> dict[str, Any]:
    """The preset's keys under the ones the profile gives; unknown presets are an error."""
    name = profile.get("preset")
    if name is None:
        return profile
    if name not in PRESETS:
        raise ValueError(f"unknown profile preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **profile}
