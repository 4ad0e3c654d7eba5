"""Streaming aggregation of masked (secure) rounds."""

from __future__ import annotations

from fedsky.config import JobConfig
from fedsky.strategies import Params


def why_not_masked(job: JobConfig, global_params: Params) -> str | None:
    return "secure aggregation unmasks the sum of whole updates"
