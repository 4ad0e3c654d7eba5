"""The `[audit]` table: record the coordinator's view of a run and plant canaries to find.

`audit = true` (or an `[audit]` table) makes the coordinator write every payload it receives
(and sends) into OUTPUT_DIR/audit/, as it saw it; `fedsky audit RUN_DIR` then plays the
honest-but-curious coordinator against that trace and the released model (fedsky.audit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from fedsky.config_base import Strict

if TYPE_CHECKING:
    from fedsky.config import JobConfig


class CanaryConfig(Strict):
    """Secret strings planted in one site's training data (Carlini et al. 2019, "The Secret
    Sharer"): one canary per entry of `repetitions`, inserted that many times."""

    site: str  # the site whose data holds them
    repetitions: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1,
                                   max_length=16)
    digits: int = Field(8, ge=2, le=16)  # random decimal digits in each secret
    # {name}: a surname of its own per canary (fedsky.canaries.NAMES), so that canaries do not
    # compete for one context; the attacker knows everything but the {secret}.
    template: str = "patient {name} MRN is {secret}"
    # Between the digits. " " makes each digit one token of a byte-level BPE, so the exposure
    # test ranks digit strings, not the tokenizer's merges of them.
    separator: str = " "
    seed: int | None = None  # None: drawn from the job seed (reproducible simulations)

    @field_validator("template")
    @classmethod
    def _has_secret(cls, template: str) -> str:
        if template.count("{secret}") != 1 or not template.endswith("{secret}"):
            raise ValueError("template must end with {secret} (the digits), e.g. "
                             "'patient {name} MRN is {secret}'")
        try:
            template.format(secret="0", name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template may use only {{name}} and {{secret}}: {err}") from None
        return template

    @field_validator("repetitions")
    @classmethod
    def _positive(cls, reps: list[int]) -> list[int]:
        if any(r < 1 for r in reps):
            raise ValueError("repetitions must be >= 1")
        return reps


class AuditConfig(Strict):
    # Also record the tasks the coordinator sends (the global model it holds), stored once
    # per distinct payload; false: only what it receives.
    downlink: bool = True
    # Fraction of every site's sequences withheld from training: the non-members of the
    # membership-inference test (0: that attack is skipped).
    holdout: float = Field(0.0, ge=0, le=0.5)
    canaries: CanaryConfig | None = None


def coerce_audit(value: Any) -> Any:
    """`audit = true` is `[audit]` with its defaults; `audit = false` is no audit."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


def check_audit(job: JobConfig) -> None:
    """Cross-field rules of [audit] (called from JobConfig._cross_field)."""
    audit = job.audit
    assert audit is not None
    canaries = audit.canaries
    if canaries is None:
        return
    names = [s.name for s in job.sites]
    if canaries.site not in names:
        raise ValueError(f"audit.canaries.site {canaries.site!r} is not a site of this job "
                         f"({', '.join(names)})")
    if job.data.format == "jsonl":
        raise ValueError("audit.canaries: instruction data (format = 'jsonl') is not "
                         "supported; canaries are planted in plain-text sequences")
