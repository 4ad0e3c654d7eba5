"""Privacy at the coordinator: client-level DP around a strategy, epsilon in the round records,
and the budget stop.

`PrivateStrategy` wraps any strategy (wrap, don't subclass). It keeps each site's latest
privacy report and, with `privacy.client`, clips and noises the updates (DP-FedAvg, McMahan et
al. 2018; the adaptive clip of Andrew et al. 2021) before the inner strategy combines them; its
state (the clip, the client-level ledger, the reports) is checkpointed with the inner one's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from fedsky.config import AdaptiveClipConfig, JobConfig, PrivacyConfig
from fedsky.dp_training import INSECURE
from fedsky.errors import FedskyError
from fedsky.privacy import (
    Mechanism,
    adapt_clip,
    adaptive_update_noise,
    clip_update,
    epsilon,
    epsilons,
    gaussian_noise,
    noise_generator,
    noise_update,
)
from fedsky.strategies import Params, SiteUpdate, Strategy

log = logging.getLogger("fedsky.privacy")


class PrivateStrategy:
    """A strategy with client-level DP (when configured) and the run's privacy bookkeeping.

    Central placement: each update is clipped to C and gets N(0, (z_u C)^2 / m) (m updates this
    round), so the plain sum the inner strategy takes carries N(0, (z_u C)^2) and a server
    optimizer steps on the noisy mean, as in DP-FedAdam. Distributed placement: the sites did
    both; fewer senders than expected leave less noise, and the ledger records what was left.
    """

    def __init__(self, inner: Strategy, job: JobConfig) -> None:
        assert job.privacy is not None
        self.inner = inner
        self.cfg: PrivacyConfig = job.privacy
        self.seed = job.seed
        self.senders = job.coordinator.sites_per_round or len(job.sites)  # expected per round
        self.sample_rate = client_sample_rate(job)
        client = self.cfg.client
        self.count_std = 0.0
        self.z_update = client.noise_multiplier if client is not None else 0.0
        if client is not None and isinstance(client.clip, AdaptiveClipConfig):
            self.count_std = client.clip.count_noise or self.senders / 20  # Andrew et al.
            self.z_update = adaptive_update_noise(client.noise_multiplier, self.count_std)

    def init_state(self, global_params: Params) -> dict[str, Any]:
        client = self.cfg.client
        clip = None if client is None else (
            client.clip.initial if isinstance(client.clip, AdaptiveClipConfig) else client.clip)
        return {"inner": self.inner.init_state(global_params), "reports": {}, "clip": clip,
                "events": []}

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        return self.inner.weights(updates, state["inner"])

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        reports = {**state["reports"], **{u.site: u.privacy for u in updates if u.privacy}}
        out = {**state, "reports": reports}
        client = self.cfg.client
        if client is not None and client.placement == "central":
            updates, out["clip"] = self._central(updates, state)
            z = client.noise_multiplier
        elif client is not None:
            z = client.noise_multiplier * math.sqrt(len(updates) / self.senders)
        new, out["inner"] = self.inner.aggregate(global_params, updates, state["inner"])
        if client is not None:
            out["clip_used"] = state["clip"]
            out["events"] = add_event(state["events"], self.sample_rate, z)
        return new, out

    def step(self, global_params: Params, mean: Params, state: dict[str, Any],
             updates: list[SiteUpdate] | None = None) -> tuple[Params, dict[str, Any]]:
        """Secure aggregation: the sites clipped and noised before masking (distributed
        placement; central is refused at load), so only the bookkeeping is left here."""
        updates = updates or []
        reports = {**state["reports"], **{u.site: u.privacy for u in updates if u.privacy}}
        out = {**state, "reports": reports}
        new, out["inner"] = self.inner.step(global_params, mean, state["inner"], updates)
        client = self.cfg.client
        if client is not None:
            z = client.noise_multiplier * math.sqrt(len(updates) / self.senders)
            out["clip_used"] = state["clip"]
            out["events"] = add_event(state["events"], self.sample_rate, z)
        return new, out

    def _central(self, updates: list[SiteUpdate],
                 state: dict[str, Any]) -> tuple[list[SiteUpdate], float]:
        clip, m = state["clip"], len(updates)
        noised_rounds = sum(count for _, _, count in state["events"])
        gen = noise_generator(self.cfg.secure_mode, self.seed * 1_000_003 + noised_rounds ^ 0xC1)
        clipped = [clip_update(u.delta, clip) for u in updates]
        std = self.z_update * clip / math.sqrt(m)
        noisy = [replace(u, delta=noise_update(c.update, std, gen))
                 for u, c in zip(updates, clipped, strict=True)]
        adaptive = self.cfg.client.clip if self.cfg.client is not None else None
        if isinstance(adaptive, AdaptiveClipConfig):
            unclipped = sum(c.norm <= clip for c in clipped)
            noisy_fraction = (unclipped + float(gaussian_noise((), self.count_std, gen))) / m
            clip = adapt_clip(clip, noisy_fraction, adaptive.quantile, adaptive.lr)
        return noisy, clip


def client_sample_rate(job: JobConfig) -> float:
    """The fraction of sites sampled per round, accounted as Poisson sampling (the coordinator
    samples a fixed number without replacement; the usual approximation)."""
    return (job.coordinator.sites_per_round or len(job.sites)) / len(job.sites)


def add_event(events: list[list[float]], q: float, z: float) -> list[list[float]]:
    """The client-level ledger plus one round: runs of equal (q, z) share a count."""
    if events and events[-1][0] == q and events[-1][1] == z:
        return [*events[:-1], [q, z, events[-1][2] + 1]]
    return [*events, [q, z, 1]]


def private_strategy(job: JobConfig, inner: Strategy) -> Strategy:
    """`inner` wrapped in `PrivateStrategy` when the job has [privacy]; refuses a client-level
    budget that not even one round fits."""
    priv = job.privacy
    if priv is None:
        return inner
    if not priv.secure_mode:
        log.warning(INSECURE)
    wrapped = PrivateStrategy(inner, job)
    client = priv.client
    if client is not None and priv.budget_epsilon is not None:
        one = epsilon([Mechanism(client_sample_rate(job), client.noise_multiplier, 1)],
                      client.delta, client.accountant)
        if one > priv.budget_epsilon:
            raise FedskyError(f"privacy.budget_epsilon {priv.budget_epsilon:g} is below the "
                              f"client-level epsilon of one round ({one:.3g}); raise "
                              "privacy.client.noise_multiplier or the budget")
    return wrapped


def account_round(job: JobConfig, rec: dict[str, Any], state: dict[str, Any]) -> str | None:
    """Put this round's epsilons in its record (`sites.<name>.epsilon[_rdp|_pld]` record-level,
    top-level `epsilon[_rdp|_pld]` client-level); return why the run must stop before the next
    round would exceed `privacy.budget_epsilon`, or None."""
    priv = job.privacy
    assert priv is not None
    reports = state["reports"]
    for site, info in rec["sites"].items():
        rep = reports.get(site) or {}
        if rep.get("epsilon"):
            info["epsilon"] = rep["epsilon"][rep["accountant"]]
            info.update({f"epsilon_{a}": v for a, v in rep["epsilon"].items()})
            info["noise_multiplier"] = rep["noise_multiplier"]
    client = priv.client
    if client is not None:
        spent = [Mechanism(*e) for e in state["events"]]
        eps = epsilons(spent, client.delta)
        rec["epsilon"] = eps[client.accountant]
        rec.update({f"epsilon_{a}": v for a, v in eps.items()})
        rec["client_clip"] = state["clip_used"]
    budget = priv.budget_epsilon
    if budget is None or rec["round"] + 1 >= job.rounds:
        return None
    over = {f"site {s}": r["epsilon_next"] for s, r in sorted(reports.items())
            if r.get("epsilon_next", 0) > budget}
    if client is not None:
        nxt = add_event(state["events"], client_sample_rate(job), client.noise_multiplier)
        nxt_eps = epsilon([Mechanism(*e) for e in nxt], client.delta, client.accountant)
        if nxt_eps > budget:
            over["client level"] = nxt_eps
    if not over:
        return None
    who = ", ".join(f"{k} ({v:.3g})" for k, v in over.items())
    reason = (f"privacy budget: round {rec['round'] + 2} would take {who} past "
              f"privacy.budget_epsilon {budget:g}; stopped after round {rec['round'] + 1} "
              "with its checkpoint written")
    rec["stopped"] = reason
    return reason


def read_report(report: Any, site: str) -> dict[str, Any] | None:
    """A site's privacy report from its reply header, checked at the boundary."""
    if report is None:
        return None
    numbers = (int, float)
    eps = report.get("epsilon", {}) if isinstance(report, dict) else None
    ok = (isinstance(eps, dict) and all(isinstance(v, numbers) for v in eps.values())
          and (not eps or (report.get("accountant") in eps
                           and isinstance(report.get("noise_multiplier"), numbers)))
          and isinstance(report.get("epsilon_next", 0.0), numbers))
    if not ok:
        raise FedskyError(f"reply from {site}: malformed privacy report {report!r}")
    return report
