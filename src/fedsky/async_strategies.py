"""Asynchronous aggregation: each site update is applied as it arrives, weighted by staleness.

Pure math, like `fedsky.strategies`: `receive(global, arrival, state) -> (global, state,
stepped)`, with the state explicit and checkpointable (FedBuff's buffer and its server
optimizer's moments live in it). Staleness is counted in model versions: how many times the
global model stepped between the version a site started from and its update's arrival.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsky.config import FedAsyncConfig, FedBuffConfig, StalenessConfig
from fedsky.errors import FedskyError
from fedsky.strategies import FedOpt, Params, SiteUpdate, weighted_mean


def staleness_weight(cfg: StalenessConfig, staleness: int) -> float:
    """s(t) of FedAsync (Xie et al. 2019, section 5.2): how much a `t`-versions-old update counts."""
    if staleness < 0:
        raise ValueError(f"staleness is a count of versions, got {staleness}")
    if cfg.fn == "constant":
        return 1.0
    if cfg.fn == "polynomial":
        return (staleness + 1) ** -cfg.a
    return 1.0 if staleness <= cfg.b else 1.0 / (cfg.a * (staleness - cfg.b) + 1)


def mix(global_params: Params, site_params: Params, a: float) -> Params:
    """(1 - a) x + a x_site, tensor by tensor (FedAsync's update)."""
    return {k: (1 - a) * v + a * site_params[k] for k, v in global_params.items()}


@dataclass
class Arrival:
    """A decoded site update and what it was computed from."""

    update: SiteUpdate  # delta = the site's model - `base`
    base: Params  # the global model the site was sent
    staleness: int  # versions the global model moved on since `base`
    task_s: float = 1.0  # clock seconds from the task's sending to this arrival


class AsyncStrategy(Protocol):
    def init_state(self, global_params: Params) -> dict[str, Any]: ...

    def weight(self, staleness: int) -> float:
        """The factor an update of this staleness gets (a_t for FedAsync, s(t) for FedBuff)."""
        ...

    def receive(self, global_params: Params, arrival: Arrival, state: dict[str, Any]
                ) -> tuple[Params, dict[str, Any], bool]:
        """Take one update; returns the global model, the state and whether the model stepped
        (a new version)."""
        ...


class FedAsync:
    """x <- (1 - a_t) x + a_t x_site, a_t = alpha * s(staleness); every arrival is a version."""

    def __init__(self, cfg: FedAsyncConfig) -> None:
        self.cfg = cfg

    def init_state(self, global_params: Params) -> dict[str, Any]:
        return {}

    def weight(self, staleness: int) -> float:
        return self.cfg.alpha * staleness_weight(self.cfg.staleness, staleness)

    def receive(self, global_params: Params, arrival: Arrival, state: dict[str, Any]
                ) -> tuple[Params, dict[str, Any], bool]:
        delta = arrival.update.delta
        site_model = {k: v + delta[k] for k, v in arrival.base.items()}
        return mix(global_params, site_model, self.weight(arrival.staleness)), state, True


class FedBuff:
    """s(staleness) * delta into a buffer; at K updates, the server optimizer (`FedOpt`) steps
    on their weighted mean (weights from `server.weighting`, not renormalised by s, so stale
    updates move the model less) and the buffer empties (Nguyen et al. 2022, Algorithm 1).
    With `delayed_nesterov`, see `delayed_nesterov`."""

    def __init__(self, cfg: FedBuffConfig, n_sites: int) -> None:
        self.cfg = cfg
        self.size = cfg.buffer_size or n_sites  # K
        self.server = FedOpt(cfg.server)

    def init_state(self, global_params: Params) -> dict[str, Any]:
        if self.cfg.delayed_nesterov:
            zeros = {k: torch.zeros_like(v) for k, v in global_params.items()}
            return {"count": 0, "sum": zeros, "momentum": dict(zeros)}
        return {"buffer": [], "server": {}}

    def weight(self, staleness: int) -> float:
        return staleness_weight(self.cfg.staleness, staleness)

    def receive(self, global_params: Params, arrival: Arrival, state: dict[str, Any]
                ) -> tuple[Params, dict[str, Any], bool]:
        u, s = arrival.update, self.weight(arrival.staleness)
        if self.cfg.delayed_nesterov:
            srv = self.cfg.server
            new, state = delayed_nesterov(global_params, u.delta, s, state, self.size, srv.lr,
                                          srv.momentum)
            return new, state, True
        # Plain dicts and tensors, so that a checkpoint can hold the buffer.
        entry = {"site": u.site, "num_samples": u.num_samples, "task_s": arrival.task_s,
                 "delta": {k: s * v for k, v in u.delta.items()}}
        buffer = [*state["buffer"], entry]
        if len(buffer) < self.size:
            return global_params, {**state, "buffer": buffer}, False
        if self.cfg.time_weighted:
            by = self.cfg.server.weighting
            w = [(e["num_samples"] if by == "sequences" else 1.0) * e["task_s"] for e in buffer]
            mean = weighted_mean([e["delta"] for e in buffer], w)
            new, server = self.server.step(global_params, mean, state["server"])
            return new, {"buffer": [], "server": server}, True
        updates = [SiteUpdate(site=e["site"], delta=e["delta"], num_samples=e["num_samples"],
                              tokens=0, train_loss=math.nan, compute_s=0.0) for e in buffer]
        new, server = self.server.aggregate(global_params, updates, state["server"])
        return new, {"buffer": [], "server": server}, True


def delayed_nesterov(global_params: Params, delta: Params, s: float, state: dict[str, Any],
                     k: int, lr: float, beta: float) -> tuple[Params, dict[str, Any]]:
    """Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
    Modeling", Algorithm 3 with c = 0), in delta units (delta = -pseudo-gradient): every
    arrival x += lr * s * delta / K at once; every K-th also m <- beta m + (sum of the K
    scaled deltas) / K and x += lr * beta * m. Over K arrivals from one model this is torch's
    SGD(nesterov) step on their mean, so sites get fresher models without momentum taking a
    step per stale update."""
    new = {n: v + (lr * s / k) * delta[n] for n, v in global_params.items()}
    total = {n: v + s * delta[n] for n, v in state["sum"].items()}
    count = state["count"] + 1
    if count < k:
        return new, {**state, "count": count, "sum": total}
    m = {n: beta * v + total[n] / k for n, v in state["momentum"].items()}
    new = {n: v + (lr * beta) * m[n] for n, v in new.items()}
    return new, {"count": 0, "sum": {n: torch.zeros_like(v) for n, v in total.items()},
                 "momentum": m}


ASYNC_STRATEGIES: dict[str, Callable[[Any, int], AsyncStrategy]] = {
    "fedasync": lambda cfg, n_sites: FedAsync(cfg),
    "fedbuff": FedBuff,
}


def make_async_strategy(cfg: Any, n_sites: int) -> AsyncStrategy:
    try:
        return ASYNC_STRATEGIES[cfg.name](cfg, n_sites)
    except KeyError:
        raise FedskyError(f"strategy {cfg.name!r} is not asynchronous; asynchronous: "
                          f"{sorted(ASYNC_STRATEGIES)}") from None
