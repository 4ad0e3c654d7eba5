"""Aggregation strategies: pure math over tensors, with explicit, checkpointable state.

`aggregate(global, updates, state) -> (global, state)`; no I/O, no hidden state. The
coordinator asks `weights()` separately so the weights used each round reach the metrics.
Every strategy moves the global model by a combination of the sites' deltas (new - old).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsky.config import (
    DynamicConfig,
    FedAvgConfig,
    FedOptConfig,
    RobustConfig,
    StrategyConfig,
)
from fedsky.errors import FedskyError
from fedsky.server_optim import make_server_optimizer

Params = dict[str, torch.Tensor]


@dataclass
class SiteUpdate:
    """A decoded update from one site for one round."""

    site: str
    delta: Params  # new - old, for every federated tensor (fp32)
    num_samples: int  # |D_k|: training sequences the site holds
    tokens: int  # tokens processed this round
    train_loss: float  # mean training loss over this round's local steps
    compute_s: float
    loss_before: float = math.nan  # global model's loss on the site's probe sequences
    loss_after: float = math.nan  # local model's loss on the same sequences, after training
    bandwidth_mbps: float = math.nan  # the site's link (declared, or measured by the transport)
    privacy: dict[str, Any] | None = None  # a private site's report: epsilon spent, its noise


class Strategy(Protocol):
    def init_state(self, global_params: Params) -> dict[str, Any]: ...

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        """Normalised aggregation weight per site (they sum to 1)."""
        ...

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]: ...

    def step(self, global_params: Params, mean: Params, state: dict[str, Any],
             updates: list[SiteUpdate] | None = None) -> tuple[Params, dict[str, Any]]:
        """Move the model by a mean delta the strategy did not compute (secure aggregation:
        `updates` carry the contributors' counters, not their deltas). Not every strategy
        can (a median needs every delta)."""
        ...


def normalise(sites: list[str], raw: list[float]) -> dict[str, float]:
    total = math.fsum(raw)
    if not math.isfinite(total) or total <= 0 or any(w < 0 for w in raw):
        raise FedskyError(f"aggregation weights {dict(zip(sites, raw))} cannot be normalised")
    return {s: w / total for s, w in zip(sites, raw, strict=True)}


def weighted_mean(deltas: list[Params], weights: list[float]) -> Params:
    """sum_k w_k * delta_k / sum_k w_k, tensor by tensor, accumulated in fp64 then cast back.

    fp64 accumulation makes the result independent of the order sites arrived in.
    """
    total = math.fsum(weights)
    out: Params = {}
    for name, ref in deltas[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for delta, w in zip(deltas, weights, strict=True):
            acc.add_(delta[name].to(torch.float64), alpha=w / total)
        out[name] = acc.to(ref.dtype)
    return out


def sample_weights(updates: list[SiteUpdate], weighting: str) -> dict[str, float]:
    raw = [float(u.num_samples) if weighting == "sequences" else 1.0 for u in updates]
    return normalise([u.site for u in updates], raw)


def apply_mean(global_params: Params, updates: list[SiteUpdate],
               weights: dict[str, float]) -> Params:
    """w_t = sum_k w_k * w_k(t) / sum_k w_k, written as global + the weighted mean delta."""
    mean = weighted_mean([u.delta for u in updates], [weights[u.site] for u in updates])
    return {k: v + mean[k] for k, v in global_params.items()}


def log_weight(cfg: StrategyConfig, num_samples: int, loss_before: float, loss_after: float,
               bandwidth_mbps: float) -> float:
    """The natural log of one site's unnormalised weight (logs: softmax weights underflow).

    Under secure aggregation the site computes it itself and pre-scales its update, so the
    coordinator never sees it; in the clear the coordinator computes it from the reports.
    """
    if cfg.name in ("fedavg", "fedopt"):
        return math.log(num_samples) if cfg.weighting == "sequences" else 0.0
    if cfg.name != "dynamic":
        return 0.0
    if cfg.rule == "paper_b":  # w_k = L_k / (|D_k| * B_k^alpha)
        if not (loss_before > 0 and bandwidth_mbps > 0):
            raise FedskyError(f"paper_b weighting needs a positive loss and bandwidth, got "
                              f"{loss_before} and {bandwidth_mbps}")
        return math.log(loss_before) - math.log(num_samples) - cfg.alpha * math.log(
            bandwidth_mbps)
    if not (math.isfinite(loss_after) and loss_after > 0):
        raise FedskyError(f"loss-based weighting needs a positive finite loss, got {loss_after}")
    if cfg.rule == "inverse_loss":
        return -math.log(loss_after)
    return -loss_after / cfg.temperature  # softmax(-loss / temperature)


def dynamic_weights(updates: list[SiteUpdate], cfg: DynamicConfig) -> dict[str, float]:
    """The dynamic rules as closed forms over the sites' reported numbers."""
    sites = [u.site for u in updates]
    try:
        logs = [log_weight(cfg, u.num_samples, u.loss_before, u.loss_after, u.bandwidth_mbps)
                for u in updates]
    except FedskyError as err:
        raise FedskyError(f"sites {sites}: {err}") from None
    top = max(logs)
    return normalise(sites, [math.exp(x - top) for x in logs])


class WeightedMean:
    """FedAvg and the dynamic rules: global + the weighted mean delta; they differ only in how
    the weights are computed from the sites' reports."""

    def __init__(self, weigh: Callable[[list[SiteUpdate]], dict[str, float]]) -> None:
        self.weigh = weigh

    def init_state(self, global_params: Params) -> dict[str, Any]:
        return {}

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        return self.weigh(updates)

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        return apply_mean(global_params, updates, self.weigh(updates)), state

    def step(self, global_params: Params, mean: Params, state: dict[str, Any],
             updates: list[SiteUpdate] | None = None) -> tuple[Params, dict[str, Any]]:
        """Apply an already weighted mean delta (what secure aggregation yields)."""
        return {k: v + mean[k] for k, v in global_params.items()}, state


class FedOpt:
    """The averaged pseudo-gradient (old - new) into `.grad`, then a torch optimizer step.

    The optimizer is rebuilt every round from `state["optimizer"]` (its state_dict), so the
    state is explicit and survives a checkpoint; nothing is kept on the object.
    """

    def __init__(self, cfg: FedOptConfig) -> None:
        self.cfg = cfg

    def init_state(self, global_params: Params) -> dict[str, Any]:
        return {}

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        return sample_weights(updates, self.cfg.weighting)

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        w = self.weights(updates, state)
        mean = weighted_mean([u.delta for u in updates], [w[u.site] for u in updates])
        return self.step(global_params, mean, state)

    def step(self, global_params: Params, mean: Params, state: dict[str, Any],
             updates: list[SiteUpdate] | None = None) -> tuple[Params, dict[str, Any]]:
        """One server-optimizer step on an already weighted mean delta."""
        params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in global_params.items()}
        opt = make_server_optimizer(list(params.values()), self.cfg)
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        for name, p in params.items():
            p.grad = -mean[name]  # pseudo-gradient: old - new
        opt.step()
        new = {k: p.detach() for k, p in params.items()}
        return new, {"optimizer": opt.state_dict()}


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; with an even count, the mean of the two middle values."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Mean over dim 0 after dropping floor(trim_fraction * n) values from each end."""
    n = stacked.shape[0]
    k = int(math.floor(trim_fraction * n))
    return stacked.sort(dim=0).values[k : n - k].mean(dim=0)


class Robust:
    """Coordinate-wise median / trimmed mean of the deltas (Yin et al. 2018); unweighted."""

    def __init__(self, cfg: RobustConfig) -> None:
        self.cfg = cfg

    def init_state(self, global_params: Params) -> dict[str, Any]:
        return {}

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        return normalise([u.site for u in updates], [1.0] * len(updates))

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        out = {}
        for name, value in global_params.items():
            stacked = torch.stack([u.delta[name] for u in updates])  # (sites, *shape)
            if self.cfg.name == "median":
                out[name] = value + coordinate_median(stacked)
            else:
                out[name] = value + trimmed_mean(stacked, self.cfg.trim_fraction)
        return out, state


def _fedavg(cfg: FedAvgConfig) -> Strategy:
    return WeightedMean(lambda updates: sample_weights(updates, cfg.weighting))


def _dynamic(cfg: DynamicConfig) -> Strategy:
    return WeightedMean(lambda updates: dynamic_weights(updates, cfg))


STRATEGIES: dict[str, Callable[[Any], Strategy]] = {
    "fedavg": _fedavg,
    "dynamic": _dynamic,
    "fedopt": FedOpt,
    "median": Robust,
    "trimmed_mean": Robust,
}


def make_strategy(cfg: StrategyConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.name](cfg)
    except KeyError:
        raise FedskyError(f"unknown strategy {cfg.name!r}; known: {sorted(STRATEGIES)}") from None
