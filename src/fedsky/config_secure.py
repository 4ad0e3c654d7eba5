"""The `[secure]` table: which tensors the coordinator may read, and how the others are hidden.

Every federated tensor takes one route: `plain` (the coordinator reads it), `mask` (pairwise-
masked secure aggregation: the coordinator learns only the sum) or `he` (CKKS encryption: the
coordinator adds ciphertexts it cannot read). The first matching rule wins, then the
`sensitive` route for the token-revealing tensors, then `default`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from fedsky.config_base import Strict

if TYPE_CHECKING:
    from fedsky.config import JobConfig

Route = Literal["plain", "mask", "he"]

# Tensors whose update reveals which tokens a site's text contains: the rows of the input
# embedding and of the LM head that a site touched are exactly its vocabulary. LoRA adapters
# are the whole update of a fine-tune, so they count as sensitive too.
SENSITIVE_PATTERN = r"(^|\.)(wte|embed_tokens|lm_head)\.|lora_"


class SecureRule(Strict):
    pattern: str  # a regular expression, searched in the parameter name
    route: Route

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return pattern


class HeConfig(Strict):
    """CKKS parameters (see docs/encryption.md for the security level and precision)."""

    poly_modulus_degree: Literal[4096, 8192, 16384] = 4096  # 2048 values per ciphertext
    workers: int | None = Field(None, gt=0)  # processes encrypting blocks; None: one per core


class SecureConfig(Strict):
    default: Route = "mask"
    sensitive: Route = "mask"
    rules: list[SecureRule] = Field(default_factory=list)
    # Fixed-point width of masked values: 32 keeps them exact to ~1e-9 of their range; 8 and
    # 16 are shared-scale quantization (stochastic rounding) that keeps the bytes small.
    bits: Literal[8, 16, 32] = 32
    # Shares needed to unmask: the sum survives up to n - threshold sites dropping after the
    # key exchange. None: a majority of the sites that exchanged keys (n // 2 + 1).
    threshold: int | None = Field(None, ge=2)
    he: HeConfig = HeConfig()

    @model_validator(mode="after")
    def _protects_something(self) -> SecureConfig:
        routes = {self.default, self.sensitive, *(r.route for r in self.rules)}
        if routes == {"plain"}:
            raise ValueError("every route is 'plain': the coordinator would read every update; "
                             "drop [secure] or route something through 'mask' or 'he'")
        return self


def check_secure(job: JobConfig) -> None:
    """Combinations that cannot work when the coordinator only ever sees a sum."""
    sec = job.secure
    assert sec is not None
    if job.strategy.name in ("median", "trimmed_mean"):
        raise ValueError(f"secure: strategy {job.strategy.name!r} sorts each site's values; "
                         "under secure aggregation the coordinator sees only their sum (use "
                         "fedavg, dynamic or fedopt)")
    for stage in job.codec.uplink:
        if stage.name in ("topk", "adaptive", "lowrank"):
            raise ValueError(f"secure: codec.uplink stage {stage.name!r} gives each site its "
                             "own support or basis, so masked or encrypted sums would not line "
                             "up; use randk (its support comes from a seed shared by all sites) "
                             "and/or secure.bits = 8 or 16 (shared-scale quantization)")
        if stage.name in ("cast", "quantize", "zstd"):
            raise ValueError(f"secure: codec.uplink stage {stage.name!r} does not apply: masked "
                             "values are uniformly random integers; use secure.bits (8, 16, 32) "
                             "for shared-scale quantization")
    client = job.privacy.client if job.privacy is not None else None
    if client is not None and client.placement == "central":
        raise ValueError("secure: privacy.client.placement = 'central' clips and noises each "
                         "site's update at the coordinator, which cannot read them; use "
                         "placement = 'distributed' (each site adds its share of the noise)")
    n = len(job.sites) if job.coordinator.sites_per_round is None else \
        job.coordinator.sites_per_round
    if sec.threshold is not None and sec.threshold > n:
        raise ValueError(f"secure.threshold ({sec.threshold}) exceeds the sites per round ({n})")
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 sites per round: the sum of one "
                         "site's update is that update")


def route_of(sec: SecureConfig, name: str) -> Route:
    """The route of one parameter: first matching rule, then sensitive, then default."""
    for rule in sec.rules:
        if re.search(rule.pattern, name):
            return rule.route
    if re.search(SENSITIVE_PATTERN, name):
        return sec.sensitive
    return sec.default
