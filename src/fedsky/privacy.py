"""Differential privacy, the pure core: clipping, Gaussian noise, sampling, accounting, planning.

Functions of their arguments only (in secure mode, plus the operating system's CSPRNG). What
keeps state across rounds lives elsewhere: `dp_training.SitePrivacy` (a site's DP-SGD ledger)
and `dp_aggregation.ClientDP` (client-level DP around a strategy).

Accounting is Google's `dp-accounting`: RDP (Mironov 2017, converted to (eps, delta) as in
Balle et al. 2020) and PLD (privacy loss distributions; Koskela et al. 2020, Doroshenko et al.
2022), which is the tighter of the two at small sampling rates. Both count add-or-remove-one
neighbours.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedsky.errors import FedskyError

Params = dict[str, torch.Tensor]
Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[Accountant, ...] = ("rdp", "pld")
# PLD discretization of the privacy loss. Pessimistic rounding keeps epsilon an upper bound;
# a 10x finer grid moves it by < 0.01 at the settings fedsky runs and costs 5-10x the time.
PLD_GRID = 1e-3


@dataclass(frozen=True)
class Mechanism:
    """`count` runs of the Gaussian mechanism with noise multiplier `z` (noise std z * C for
    an L2 sensitivity C), each on a Poisson sample of rate `q` (1: on all records)."""

    q: float
    z: float
    count: int


# --- clipping ----------------------------------------------------------------------------------

def global_norm(tensors: Iterable[torch.Tensor]) -> float:
    """L2 norm over all tensors together, accumulated in fp64."""
    return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in tensors))


@dataclass
class Clipped:
    update: Params
    norm: float  # the L2 norm before clipping


def clip_update(update: Params, max_norm: float) -> Clipped:
    """Scale the whole update so that ||update||_2 <= max_norm (unchanged when already inside).

    The scale is shaved by 1e-6 so that fp32 rounding cannot push the result past max_norm.
    """
    norm = global_norm(update.values())
    if norm <= max_norm:
        return Clipped(dict(update), norm)
    scale = max_norm / norm * (1 - 1e-6)
    return Clipped({k: v * scale for k, v in update.items()}, norm)


def clipped_sum(per_sample: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """sum_i g_i * min(1, C / ||g_i||), the DP-SGD numerator (Abadi et al. 2016).

    `per_sample`: one tensor per parameter, each (B, *param.shape); ||g_i|| is sample i's norm
    over all parameters together. Returns one tensor per parameter, (*param.shape).
    """
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample]).norm(dim=0)  # (B,)
    # Shaved by 1e-5 so that the fp32 norm's rounding (relative error below 2e-6 even over
    # millions of values) cannot let a sample past max_norm; Opacus' C / (norm + 1e-6) can, by
    # a few parts in 1e9. An all-zero sample: inf, clamped to 1.
    factor = (max_norm * (1 - 1e-5) / norms.double()).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor.to(g.dtype), g) for g in per_sample]


# --- randomness --------------------------------------------------------------------------------

def noise_generator(secure: bool, seed: int) -> torch.Generator | None:
    """None in secure mode (draw from the OS CSPRNG); else a torch.Generator seeded from
    `seed`, so that a simulation is reproducible (and its noise removable by anyone who knows
    the seed: never for real data)."""
    return None if secure else torch.Generator().manual_seed(seed % (2**63))


def csprng_uniform(n: int) -> torch.Tensor:
    """(n,) fp64 uniforms in (0, 1] from os.urandom (getrandom(2): a CSPRNG), 53 bits each.

    torch.Generator is a Mersenne Twister, predictable from its outputs, so secure mode never
    uses it; torchcsprng, which Opacus' secure_mode needs, is not built for current torch.
    """
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy((raw.astype(np.float64) + 1.0) * 2.0**-53)


def gaussian_noise(shape: Sequence[int], std: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """N(0, std^2) in fp32: from `generator`, or from the CSPRNG (Box-Muller in fp64) when None."""
    shape = tuple(shape)
    if std == 0:
        return torch.zeros(shape)
    if generator is not None:
        return torch.randn(shape, generator=generator) * std
    n = math.prod(shape)
    half = (n + 1) // 2
    u = csprng_uniform(2 * half)
    radius = torch.sqrt(-2.0 * torch.log(u[:half]))
    angle = 2 * math.pi * u[half:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return (z * std).float().reshape(shape)


def poisson_sample(n: int, q: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of a Poisson sample of range(n): each index independently with probability q."""
    u = (torch.rand(n, generator=generator, dtype=torch.float64) if generator is not None
         else csprng_uniform(n))
    return (u < q).nonzero().flatten()


def noise_update(update: Params, std: float, generator: torch.Generator | None) -> Params:
    """update + N(0, std^2) on every value."""
    return {k: v + gaussian_noise(v.shape, std, generator).to(v.device, v.dtype)
            for k, v in update.items()}


# --- adaptive clipping (Andrew et al. 2021) ----------------------------------------------------

def adaptive_update_noise(z: float, count_std: float) -> float:
    """The update's noise multiplier when the clipped-count also gets noise of std `count_std`,
    so that the pair is as private as one Gaussian mechanism with multiplier z (Thm. 1):
    z_update = (z^-2 - (2 count_std)^-2)^(-1/2)."""
    if z == 0:
        return 0.0
    rest = z**-2 - (2 * count_std) ** -2
    if rest <= 0:
        raise FedskyError(f"adaptive clipping: noise_multiplier {z} leaves no budget for the "
                          f"update next to count noise {count_std}; it must be below "
                          f"{2 * count_std:g} (raise clip.count_noise or lower the multiplier)")
    return rest**-0.5


def adapt_clip(clip: float, unclipped_fraction: float, quantile: float, lr: float) -> float:
    """Geometric step towards the `quantile` of update norms: C exp(-lr (b - quantile)), b the
    (noised) fraction of updates that were not clipped."""
    return clip * math.exp(-lr * (unclipped_fraction - quantile))


# --- accounting --------------------------------------------------------------------------------

def _accountant(kind: Accountant) -> Any:
    # Imported here: the CLI and the config validate before any heavy import.
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    # RDP drops orders whose series does not converge (small z) and says so through absl for
    # every one; the epsilon stays valid (an upper bound over the orders kept).
    logging.getLogger("absl").setLevel(logging.ERROR)

    if kind == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_GRID)


def _events(mechanisms: Sequence[Mechanism]) -> list[Any]:
    from dp_accounting import dp_event

    sampled = [m for m in mechanisms if m.q < 1 and m.count > 0]
    events = [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(m.q, dp_event.GaussianDpEvent(m.z)), m.count)
        for m in sampled]
    # Unsampled Gaussians compose exactly into one with z = (sum count / z^2)^(-1/2) (Dong et
    # al. 2019, GDP); one event is much faster for the PLD than `count` of them.
    whole = [m for m in mechanisms if m.q >= 1 and m.count > 0]
    if whole:
        z = math.fsum(m.count / m.z**2 for m in whole) ** -0.5
        events.append(dp_event.GaussianDpEvent(z))
    return events


def epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: Accountant) -> float:
    """The epsilon at `delta` of running all `mechanisms` (composed) on the same records."""
    active = [m for m in mechanisms if m.count > 0]
    if not active:
        return 0.0
    if any(m.z == 0 for m in active):
        return math.inf
    acc = _accountant(accountant)
    for event in _events(active):
        acc.compose(event)
    return float(acc.get_epsilon(delta))


def epsilons(mechanisms: Sequence[Mechanism], delta: float) -> dict[str, float]:
    """{accountant: epsilon} for every accountant."""
    return {a: epsilon(mechanisms, delta, a) for a in ACCOUNTANTS}


def plan_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
               accountant: Accountant) -> float:
    """The smallest noise multiplier (to 1e-3) whose `steps` DP-SGD steps at `sample_rate` stay
    within (target_epsilon, delta)."""
    from dp_accounting import calibrate_dp_mechanism
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    if not (0 < sample_rate <= 1 and steps > 0):
        raise FedskyError(f"plan: need 0 < sample rate <= 1 and steps > 0, got {sample_rate} "
                          f"and {steps}")
    try:
        return float(calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda z: _events([Mechanism(sample_rate, z, steps)])[0],
            target_epsilon, delta, tol=1e-3))
    except NoBracketIntervalFoundError:
        raise FedskyError(f"no noise multiplier reaches epsilon {target_epsilon} at delta "
                          f"{delta} for {steps} steps at sample rate {sample_rate}") from None
