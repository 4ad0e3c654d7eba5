"""Aggregation strategies against closed forms on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedsky.config import DynamicConfig, FedAvgConfig, FedOptConfig, RobustConfig
from fedsky.strategies import SiteUpdate, make_strategy


def _update(site: str, delta: dict[str, torch.Tensor], n: int = 1, **kw: float) -> SiteUpdate:
    return SiteUpdate(site=site, delta=delta, num_samples=n, tokens=0, train_loss=0.0,
                      compute_s=0.0, **kw)


def _random_round(seed: int, sites: int = 3) -> tuple[dict, list[SiteUpdate]]:
    g = torch.Generator().manual_seed(seed)
    glob = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    updates = [_update(f"s{i}", {k: torch.randn(v.shape, generator=g) for k, v in glob.items()},
                       n=10 * (i + 1)) for i in range(sites)]
    return glob, updates


def test_fedavg_is_the_sample_weighted_mean() -> None:
    glob, updates = _random_round(0)
    for u, n in zip(updates, [10, 30, 60]):
        u.num_samples = n
    strategy = make_strategy(FedAvgConfig(weighting="sequences"))
    new, _ = strategy.aggregate(glob, updates, strategy.init_state(glob))
    for k in glob:
        expected = glob[k] + 0.1 * updates[0].delta[k] + 0.3 * updates[1].delta[k] \
            + 0.6 * updates[2].delta[k]
        torch.testing.assert_close(new[k], expected, rtol=0, atol=1e-6)
    assert strategy.weights(updates, {}) == pytest.approx({"s0": 0.1, "s1": 0.3, "s2": 0.6})


def test_fedavg_uniform_ignores_sample_counts() -> None:
    glob = {"w": torch.zeros(2)}
    updates = [_update("a", {"w": torch.tensor([1.0, 2.0])}, 1),
               _update("b", {"w": torch.tensor([3.0, 6.0])}, 99)]
    new, _ = make_strategy(FedAvgConfig(weighting="uniform")).aggregate(glob, updates, {})
    assert torch.equal(new["w"], torch.tensor([2.0, 4.0]))


def test_fedavg_does_not_depend_on_arrival_order() -> None:
    glob, updates = _random_round(1, sites=5)
    strategy = make_strategy(FedAvgConfig())
    a, _ = strategy.aggregate(glob, updates, {})
    b, _ = strategy.aggregate(glob, list(reversed(updates)), {})
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_equals_fedopt_sgd_with_lr_one_and_no_momentum() -> None:
    glob, updates = _random_round(2)
    fedavg = make_strategy(FedAvgConfig())
    fedopt = make_strategy(FedOptConfig(optimizer="sgd", lr=1.0))
    state_a, state_b = fedavg.init_state(glob), fedopt.init_state(glob)
    a, b = glob, glob
    for _ in range(3):  # several rounds: state carried through
        a, state_a = fedavg.aggregate(a, updates, state_a)
        b, state_b = fedopt.aggregate(b, updates, state_b)
    for k in glob:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_paper_b_weights_on_hand_computed_inputs() -> None:
    # w_k = L_k / (|D_k| * B_k^alpha), alpha = 0.5
    updates = [
        _update("aws", {"w": torch.tensor([1.0])}, n=100, loss_before=4.0, bandwidth_mbps=1000.0),
        _update("gcp", {"w": torch.tensor([2.0])}, n=50, loss_before=5.0, bandwidth_mbps=100.0),
        _update("az", {"w": torch.tensor([3.0])}, n=25, loss_before=6.0, bandwidth_mbps=25.0),
    ]
    raw = {"aws": 4.0 / (100 * 1000**0.5), "gcp": 5.0 / (50 * 10.0), "az": 6.0 / (25 * 5.0)}
    total = sum(raw.values())
    strategy = make_strategy(DynamicConfig(rule="paper_b", alpha=0.5))
    weights = strategy.weights(updates, {})
    assert weights == pytest.approx({k: v / total for k, v in raw.items()}, rel=1e-12)
    new, _ = strategy.aggregate({"w": torch.tensor([10.0])}, updates, {})
    expected = 10.0 + sum(raw[u.site] / total * u.delta["w"].item() for u in updates)
    assert new["w"].item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_ignores_bandwidth() -> None:
    updates = [_update("a", {"w": torch.zeros(1)}, n=10, loss_before=2.0, bandwidth_mbps=1.0),
               _update("b", {"w": torch.zeros(1)}, n=10, loss_before=2.0, bandwidth_mbps=1e4)]
    assert make_strategy(DynamicConfig(alpha=0.0)).weights(updates, {}) == \
        pytest.approx({"a": 0.5, "b": 0.5})


def test_loss_based_weights() -> None:
    updates = [_update("a", {"w": torch.zeros(1)}, loss_after=2.0),
               _update("b", {"w": torch.zeros(1)}, loss_after=4.0)]
    inv = make_strategy(DynamicConfig(rule="inverse_loss")).weights(updates, {})
    assert inv == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    soft = make_strategy(DynamicConfig(rule="softmax", temperature=0.5)).weights(updates, {})
    ea, eb = math.exp(-2.0 / 0.5), math.exp(-4.0 / 0.5)
    assert soft == pytest.approx({"a": ea / (ea + eb), "b": eb / (ea + eb)})


def test_fedopt_nesterov_momentum_two_rounds_closed_form() -> None:
    # torch SGD with nesterov: buf = m*buf + g ; step = g + m*buf ; x -= lr*step
    lr, m = 0.7, 0.9
    glob = {"w": torch.tensor([1.0, -1.0])}
    d1, d2 = torch.tensor([0.1, 0.2]), torch.tensor([-0.3, 0.05])
    strategy = make_strategy(FedOptConfig(optimizer="sgd", lr=lr, momentum=m, nesterov=True))
    x, state = strategy.aggregate(glob, [_update("a", {"w": d1})], {})
    x, state = strategy.aggregate(x, [_update("a", {"w": d2})], state)
    g1, g2 = -d1, -d2
    buf1 = g1
    x1 = glob["w"] - lr * (g1 + m * buf1)
    buf2 = m * buf1 + g2
    x2 = x1 - lr * (g2 + m * buf2)
    torch.testing.assert_close(x["w"], x2, rtol=0, atol=1e-6)


def test_fedopt_adam_first_step_closed_form() -> None:
    # Adam's first bias-corrected step is lr * g / (|g| + eps)
    lr, tau = 0.01, 1e-3
    glob = {"w": torch.tensor([0.5, 0.5])}
    delta = torch.tensor([0.2, -0.05])
    new, state = make_strategy(FedOptConfig(optimizer="adam", lr=lr, tau=tau)).aggregate(
        glob, [_update("a", {"w": delta})], {})
    g = -delta
    torch.testing.assert_close(new["w"], glob["w"] - lr * g / (g.abs() + tau), rtol=0, atol=1e-6)
    assert "optimizer" in state and state["optimizer"]["state"]


def test_fedopt_yogi_first_step_closed_form() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    glob = {"w": torch.tensor([0.0, 0.0])}
    delta = torch.tensor([0.2, -0.05])
    new, _ = make_strategy(FedOptConfig(optimizer="yogi", lr=lr, beta1=b1, beta2=b2,
                                        tau=tau)).aggregate(glob, [_update("a", {"w": delta})], {})
    g = -delta
    m = (1 - b1) * g
    v = tau**2 - (1 - b2) * g * g * torch.sign(tau**2 - g * g)
    torch.testing.assert_close(new["w"], -lr * m / (v.sqrt() + tau), rtol=0, atol=1e-6)


def test_median_and_trimmed_mean() -> None:
    glob = {"w": torch.zeros(3)}
    rows = [[1.0, 10.0, -1.0], [2.0, 20.0, -2.0], [3.0, 30.0, -3.0], [100.0, -50.0, 7.0],
            [4.0, 40.0, -4.0]]
    updates = [_update(f"s{i}", {"w": torch.tensor(r)}) for i, r in enumerate(rows)]
    med, _ = make_strategy(RobustConfig(name="median")).aggregate(glob, updates, {})
    assert torch.equal(med["w"], torch.tensor([3.0, 20.0, -2.0]))
    trim, _ = make_strategy(RobustConfig(name="trimmed_mean", trim_fraction=0.2)).aggregate(
        glob, updates, {})
    # drop 1 from each end per coordinate: (2,3,4), (10,20,30), (-3,-2,-1)
    torch.testing.assert_close(trim["w"], torch.tensor([3.0, 20.0, -2.0]))
    even, _ = make_strategy(RobustConfig(name="median")).aggregate(glob, updates[:4], {})
    assert torch.equal(even["w"], torch.tensor([2.5, 15.0, -1.5]))


def test_fedopt_adagrad_first_step_closed_form() -> None:
    # accumulator starts at tau^2; first step: lr * g / (sqrt(tau^2 + g^2) + tau)
    lr, tau = 0.1, 1e-3
    glob = {"w": torch.tensor([1.0, 2.0])}
    delta = torch.tensor([0.3, -0.1])
    new, _ = make_strategy(FedOptConfig(optimizer="adagrad", lr=lr, tau=tau)).aggregate(
        glob, [_update("a", {"w": delta})], {})
    g = -delta
    expected = glob["w"] - lr * g / ((tau**2 + g * g).sqrt() + tau)
    torch.testing.assert_close(new["w"], expected, rtol=0, atol=1e-6)
