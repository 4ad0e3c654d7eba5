"""Aggregation strategies: pure math over tensors, with explicit, checkpointable state.

`aggregate(global, updates, state) -> (global, state)`; no I/O, no hidden state. The
coordinator asks `weights()` separately so the weights used each round reach the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsky.config import StrategyConfig
from fedsky.errors import FedskyError

Params = dict[str, torch.Tensor]


@dataclass
class SiteUpdate:
    """A decoded update from one site for one round."""

    site: str
    delta: Params  # new - old, for every federated tensor (fp32)
    num_samples: int  # |D_k|: training sequences the site holds
    tokens: int  # tokens processed this round
    train_loss: float  # mean training loss this round
    compute_s: float


class Strategy(Protocol):
    def init_state(self, global_params: Params) -> dict[str, Any]: ...

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        """Normalised aggregation weight per site (they sum to 1)."""
        ...

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]: ...


def weighted_mean(deltas: list[Params], weights: list[float]) -> Params:
    """sum_k w_k * delta_k / sum_k w_k, tensor by tensor, accumulated in fp64 then cast back.

    fp64 accumulation makes the result independent of the order sites arrived in.
    """
    total = float(sum(weights))
    if total <= 0:
        raise FedskyError(f"aggregation weights sum to {total}; nothing to aggregate")
    out: Params = {}
    for name, ref in deltas[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for delta, w in zip(deltas, weights, strict=True):
            acc.add_(delta[name].to(torch.float64), alpha=w / total)
        out[name] = acc.to(ref.dtype)
    return out


class FedAvg:
    """McMahan et al. 2017: the global model moves by the (sample-)weighted mean update."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.weighting = cfg.weighting

    def init_state(self, global_params: Params) -> dict[str, Any]:
        return {}

    def weights(self, updates: list[SiteUpdate], state: dict[str, Any]) -> dict[str, float]:
        raw = [u.num_samples if self.weighting == "sequences" else 1.0 for u in updates]
        total = float(sum(raw))
        return {u.site: w / total for u, w in zip(updates, raw, strict=True)}

    def aggregate(
        self, global_params: Params, updates: list[SiteUpdate], state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any]]:
        w = self.weights(updates, state)
        mean = weighted_mean([u.delta for u in updates], [w[u.site] for u in updates])
        return {k: v + mean[k] for k, v in global_params.items()}, state


STRATEGIES: dict[str, Callable[[StrategyConfig], Strategy]] = {"fedavg": FedAvg}


def make_strategy(cfg: StrategyConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.name](cfg)
    except KeyError:
        raise FedskyError(f"unknown strategy {cfg.name!r}; known: {sorted(STRATEGIES)}") from None
