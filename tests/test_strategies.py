"""Aggregation against closed forms on small tensors."""

from __future__ import annotations

import torch

from fedsky.config import StrategyConfig
from fedsky.strategies import SiteUpdate, make_strategy


def _update(site: str, delta: dict[str, torch.Tensor], n: int) -> SiteUpdate:
    return SiteUpdate(site=site, delta=delta, num_samples=n, tokens=0, train_loss=0.0,
                      compute_s=0.0)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    g = torch.Generator().manual_seed(0)
    glob = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(3)]
    counts = [10, 30, 60]
    updates = [_update(f"s{i}", d, n) for i, (d, n) in enumerate(zip(deltas, counts))]
    strategy = make_strategy(StrategyConfig(name="fedavg", weighting="sequences"))
    new, _ = strategy.aggregate(glob, updates, strategy.init_state(glob))
    for k in glob:
        expected = glob[k] + (0.1 * deltas[0][k] + 0.3 * deltas[1][k] + 0.6 * deltas[2][k])
        torch.testing.assert_close(new[k], expected, rtol=0, atol=1e-6)
    assert strategy.weights(updates, {}) == {"s0": 0.1, "s1": 0.3, "s2": 0.6}


def test_fedavg_uniform_ignores_sample_counts() -> None:
    glob = {"w": torch.zeros(2)}
    updates = [_update("a", {"w": torch.tensor([1.0, 2.0])}, 1),
               _update("b", {"w": torch.tensor([3.0, 6.0])}, 99)]
    strategy = make_strategy(StrategyConfig(name="fedavg", weighting="uniform"))
    new, _ = strategy.aggregate(glob, updates, {})
    assert torch.equal(new["w"], torch.tensor([2.0, 4.0]))


def test_fedavg_does_not_depend_on_arrival_order() -> None:
    g = torch.Generator().manual_seed(1)
    glob = {"w": torch.randn(1000, generator=g)}
    updates = [_update(f"s{i}", {"w": torch.randn(1000, generator=g) * 1e-3}, 7 + i)
               for i in range(5)]
    strategy = make_strategy(StrategyConfig())
    a, _ = strategy.aggregate(glob, updates, {})
    b, _ = strategy.aggregate(glob, list(reversed(updates)), {})
    assert torch.equal(a["w"], b["w"])
