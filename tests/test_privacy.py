"""Differential privacy: clipping, noise, accounting against published values and closed forms,
per-sample gradients against a naive oracle, client-level DP, the budget stop, the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from conftest import tiny_job
from fedsky.checkpoint import load_checkpoint
from fedsky.cli import app
from fedsky.config import (
    ClientDpConfig,
    JobConfig,
    FedAvgConfig,
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    load_job,
    parse_job,
)
from fedsky.dp_aggregation import PrivateStrategy, account_round, private_strategy
from fedsky.dp_training import DpSgd, SitePrivacy, dp_train_steps, sequence_losses
from fedsky.errors import FedskyError
from fedsky.metrics import read_metrics
from fedsky.model import build_model
from fedsky.privacy import (
    Mechanism,
    adapt_clip,
    clip_update,
    clipped_sum,
    epsilon,
    gaussian_noise,
    global_norm,
    noise_generator,
    plan_noise,
)
from fedsky.runner import run_federated
from fedsky.strategies import SiteUpdate, make_strategy

DELTA = 1e-5


# --- clipping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.5, 1.0, 3.0, 1e4])
def test_clip_bounds_the_norm_and_keeps_the_direction(scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        x = {"a": torch.randn(37, 5, generator=gen) * scale, "b": torch.randn(101, generator=gen)
             * scale * (trial % 3)}
        c = 0.7
        out = clip_update(x, c)
        assert global_norm(out.update.values()) <= c
        assert out.norm == pytest.approx(global_norm(x.values()))
        if out.norm <= c:  # inside the ball: untouched (the all-zero update included)
            assert all(torch.equal(out.update[k], x[k]) for k in x)
        else:
            ratio = out.update["a"].flatten() / x["a"].flatten()
            assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_clip_of_all_zero_update_is_zero() -> None:
    zero = {"w": torch.zeros(10, 3)}
    out = clip_update(zero, 1.0)
    assert out.norm == 0 and torch.equal(out.update["w"], zero["w"])
    summed = clipped_sum([torch.zeros(4, 10, 3)], 1.0)
    assert torch.equal(summed[0], torch.zeros(10, 3))


def test_per_sample_clipping_bounds_every_sample() -> None:
    gen = torch.Generator().manual_seed(2)
    per_sample = [torch.randn(8, 6, 4, generator=gen) * 5, torch.randn(8, 9, generator=gen)]
    per_sample[0][3] = 0  # one sample with all-zero gradient in one tensor
    per_sample[1][3] = 0
    c = 1.5
    for i in range(8):  # the sum over one sample is that sample, clipped
        one = clipped_sum([g[i : i + 1] for g in per_sample], c)
        assert global_norm(one) <= c
    total = clipped_sum(per_sample, c)
    assert global_norm(total) <= 8 * c


# --- noise -------------------------------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_matches_z_times_c(secure: bool) -> None:
    z, c, n = 1.3, 0.8, 400_000
    draws = gaussian_noise((n,), z * c, noise_generator(secure, seed=3)).double()
    # sd of the sample sd is sigma / sqrt(2n) = 0.11%: 1% is nine of those
    assert draws.std().item() == pytest.approx(z * c, rel=0.01)
    assert abs(draws.mean().item()) < 5 * z * c / math.sqrt(n)
    inside = (draws.abs() < z * c).double().mean().item()  # Gaussian: 68.27% within 1 sd
    assert inside == pytest.approx(0.6827, abs=0.005)


def test_secure_noise_is_fresh_and_seeded_noise_repeats() -> None:
    a = gaussian_noise((1000,), 1.0, noise_generator(False, 5))
    b = gaussian_noise((1000,), 1.0, noise_generator(False, 5))
    assert torch.equal(a, b)
    assert noise_generator(True, 5) is None
    assert not torch.equal(gaussian_noise((1000,), 1.0, None), gaussian_noise((1000,), 1.0, None))


def test_dp_sgd_noise_on_the_gradient_is_z_c_over_the_expected_batch() -> None:
    """An empty Poisson sample still steps: the gradient is pure noise of std z C / (q N)."""
    from opacus import GradSampleModule

    from fedsky.dp_training import private_gradients

    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, context=16), 400, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = DpSgd(sample_rate=0.1, noise_multiplier=2.0, max_grad_norm=0.5)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        private_gradients(gsm, params, torch.zeros(0, 16, dtype=torch.long), dp, 8.0,
                          noise_generator(False, 11))
    finally:
        gsm.cleanup()
    grads = torch.cat([p.grad.flatten() for p in params]).double()
    assert grads.numel() > 20_000
    assert grads.std().item() == pytest.approx(2.0 * 0.5 / 8.0, rel=0.02)


# --- accounting --------------------------------------------------------------------------------

def test_epsilon_matches_published_mnist_setting() -> None:
    """TF Privacy's compute_dp_sgd_privacy example: N = 60000, batch 256, z = 1.12, 60 epochs,
    delta 1e-5 is (2.92, 1e-5)-DP by RDP with the classic conversion (Mironov 2017). The
    libraries now convert better (Balle et al. 2020) and account tighter with PLD / PRV."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    q, z, steps = 256 / 60000, 1.12, math.ceil(60 * 60000 / 256)
    tf_orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=tf_orders)
    classic = min(r - math.log(DELTA) / (a - 1) for a, r in zip(tf_orders, rdp, strict=True))
    assert classic == pytest.approx(2.92, abs=0.005)  # the setting reproduces the published value

    mech = [Mechanism(q, z, steps)]
    ours_rdp = epsilon(mech, DELTA, "rdp")
    opacus = RDPAccountant()
    opacus.history = [(z, q, steps)]
    assert ours_rdp == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-4)  # two libraries agree
    assert ours_rdp == pytest.approx(2.5187, abs=1e-3) and ours_rdp < classic
    pld = epsilon(mech, DELTA, "pld")
    assert pld == pytest.approx(2.320, abs=0.015)  # Opacus' PRV accountant gives 2.3203
    assert pld < ours_rdp


def test_epsilon_of_unsampled_gaussians_matches_the_closed_form() -> None:
    """8 silos, all in every round, z = 1, 100 rounds (the issue's example): 100 Gaussian
    mechanisms are one with z / 10, whose exact delta(eps) is Balle & Wang (2018), Thm. 8."""
    mu = math.sqrt(100) / 1.0

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = brentq(lambda e: delta_of(e) - DELTA, 1.0, 200.0)
    mech = [Mechanism(1.0, 1.0, 100)]
    assert epsilon(mech, DELTA, "pld") == pytest.approx(exact, rel=2e-3)
    assert epsilon(mech, DELTA, "rdp") == pytest.approx(96.1, abs=0.1)  # the "~96"
    assert epsilon(mech, DELTA, "rdp") > exact
    assert epsilon([Mechanism(0.5, 0.0, 1)], DELTA, "pld") == math.inf
    assert epsilon([Mechanism(0.5, 1.0, 0)], DELTA, "pld") == 0.0


def test_plan_noise_reaches_the_target() -> None:
    q, steps = 16 / 2000, 200
    z = plan_noise(4.0, DELTA, q, steps, "rdp")
    assert epsilon([Mechanism(q, z, steps)], DELTA, "rdp") <= 4.0
    assert epsilon([Mechanism(q, z * 0.98, steps)], DELTA, "rdp") > 4.0


def test_cli_privacy_plan_prints_a_multiplier_within_the_target() -> None:
    res = CliRunner().invoke(app, ["privacy", "plan", "--epsilon", "8", "--delta", "1e-5",
                                   "--data-size", "2000", "--batch", "16", "--steps", "200",
                                   "--accountant", "rdp"], standalone_mode=False)
    assert res.exit_code == 0, res.output
    z = float(res.output.split("=")[1].split("#")[0])
    assert epsilon([Mechanism(16 / 2000, z, 200)], DELTA, "rdp") <= 8.0
    assert epsilon([Mechanism(16 / 2000, z - 0.01, 200)], DELTA, "rdp") > 8.0


# --- DP-SGD against a naive per-example oracle -------------------------------------------------

MODELS = {
    "gpt2": ModelConfig(n_layer=1, n_embd=32, n_head=2, context=16),
    "llama": ModelConfig(arch="llama", n_layer=1, n_embd=32, n_head=2, context=16),
    "gpt2-lora": ModelConfig(n_layer=1, n_embd=32, n_head=2, context=16,
                             lora=LoraConfig(r=4, target_modules=["c_attn", "c_fc"])),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dp_sgd_step_applies_per_sample_clipped_gradients(arch: str) -> None:
    """One DP-SGD step with q = 1 and no noise, plain SGD at lr 1: the weights move by minus
    the mean of the per-sequence gradients, each clipped on its own (Opacus' per-sample
    gradients, Conv1D and RMSNorm in its functorch mode), as a loop over single sequences says."""
    model = build_model(MODELS[arch], 300, 0)
    if arch == "gpt2-lora":  # B starts at zero, which would hide A's gradients
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    data = torch.randint(300, (5, 16), generator=torch.Generator().manual_seed(3))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = []
    for i in range(len(data)):  # the oracle: one sequence at a time through the plain model
        model.zero_grad(set_to_none=True)
        sequence_losses(model, data[i : i + 1]).sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    norms = sorted(global_norm(g.values()) for g in grads)
    c = (norms[1] + norms[2]) / 2  # two sequences pass unclipped, three are clipped
    oracle = {n: sum(clip_update(g, c).update[n] for g in grads) / len(data) for n in params}

    cfg = TrainingConfig(optimizer="sgd", lr=1.0, sampling="poisson", batch_size=len(data))
    dp_train_steps(model, data, cfg, DpSgd(1.0, 0.0, c), 1, noise_generator(False, 0),
                   torch.device("cpu"))
    for n, p in params.items():
        moved = before[n] - p.detach()
        assert torch.allclose(moved, oracle[n], rtol=1e-3, atol=1e-4 * oracle[n].abs().max()), n
    assert not any(hasattr(p, "grad_sample") for p in params.values()), "hooks left behind"


# --- client-level DP ---------------------------------------------------------------------------

def _job(**privacy) -> JobConfig:
    return parse_job({"sites": [{"name": s} for s in "abcd"],
                      "strategy": {"name": "fedavg", "weighting": "uniform"},
                      "privacy": {"secure_mode": False, **privacy}})


def _updates(values: list[float], n: int = 50_000) -> list[SiteUpdate]:
    return [SiteUpdate(site=s, delta={"w": torch.full((n,), v)}, num_samples=1, tokens=1,
                       train_loss=0.0, compute_s=0.0) for s, v in zip("abcd", values, strict=True)]


def test_central_client_noise_on_the_mean_is_z_c_over_m() -> None:
    job = _job(client={"clip": 0.01, "noise_multiplier": 2.0})
    strategy = PrivateStrategy(make_strategy(FedAvgConfig(weighting="uniform")), job)
    glob = {"w": torch.zeros(50_000)}
    state = strategy.init_state(glob)
    new, state = strategy.aggregate(glob, _updates([1.0, -1.0, 1.0, -1.0]), state)
    # clipped updates cancel (+-C/sqrt(n) each); what is left is noise of std z C / m
    assert new["w"].double().std().item() == pytest.approx(2.0 * 0.01 / 4, rel=0.02)
    assert state["events"] == [[1.0, 2.0, 1]]


def test_distributed_shares_sum_to_the_same_noise() -> None:
    job = _job(client={"clip": 0.01, "noise_multiplier": 2.0, "placement": "distributed"})
    sites = [SitePrivacy.open(job, 100) for _ in range(4)]
    zero = {"w": torch.zeros(50_000)}
    shares = [s.privatize_update(zero, seed=i) for i, s in enumerate(sites)]
    mean = sum(sh["w"] for sh in shares) / 4
    assert mean.double().std().item() == pytest.approx(2.0 * 0.01 / 4, rel=0.02)
    big = sites[0].privatize_update({"w": torch.full((50_000,), 1.0)}, seed=9)
    # clipped to C, plus noise of std z C / 2 per value: the norm is near sqrt(C^2 + n s^2)
    assert global_norm(big.values()) == pytest.approx(
        math.sqrt(0.01**2 + 50_000 * (0.01 * 2.0 / 2) ** 2), rel=0.02)


def test_adaptive_clip_follows_the_quantile() -> None:
    assert adapt_clip(0.1, 0.0, 0.5, 0.2) == pytest.approx(0.1 * math.exp(0.1))
    assert adapt_clip(0.1, 1.0, 0.5, 0.2) == pytest.approx(0.1 * math.exp(-0.1))
    job = _job(client={"clip": {"quantile": 0.5, "initial": 0.1, "lr": 0.2, "count_noise": 1e-9},
                       "noise_multiplier": 0.0})
    strategy = PrivateStrategy(make_strategy(FedAvgConfig(weighting="uniform")), job)
    state = strategy.init_state({"w": torch.zeros(1)})
    for _ in range(30):  # every norm is 1: the clip grows towards it
        _, state = strategy.aggregate({"w": torch.zeros(1)}, _updates([1.0] * 4, 1), state)
    assert state["clip"] > 0.8


def test_client_budget_stops_at_the_right_round() -> None:
    """q = 1, z = 1: after r rounds epsilon is that of one Gaussian with z / sqrt(r)."""
    eps = [epsilon([Mechanism(1.0, 1.0, r)], DELTA, "rdp") for r in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2
    job = _job(client={"clip": 1.0, "noise_multiplier": 1.0, "accountant": "rdp"},
               budget_epsilon=budget)
    job = job.model_copy(update={"rounds": 10})
    strategy = private_strategy(job, make_strategy(FedAvgConfig(weighting="uniform")))
    state = strategy.init_state({"w": torch.zeros(3)})
    stops = []
    for r in range(3):
        _, state = strategy.aggregate({"w": torch.zeros(3)}, _updates([0.1] * 4, 3), state)
        rec = {"round": r, "sites": {}}
        stops.append(account_round(job, rec, state))
        assert rec["epsilon"] == pytest.approx(eps[r])
    assert stops[0] is None and stops[1] is not None  # round 3 would pass the budget
    tight = _job(client={"clip": 1.0, "noise_multiplier": 1.0}, budget_epsilon=eps[0] / 2)
    with pytest.raises(FedskyError, match="below the client-level epsilon of one round"):
        private_strategy(tight, make_strategy(FedAvgConfig(weighting="uniform")))


# --- end to end --------------------------------------------------------------------------------

DP_SGD = """sampling = "poisson"
threads = 1

[privacy]
secure_mode = false
{budget}
[privacy.dp_sgd]
noise_multiplier = 1.0
max_grad_norm = 1.0
"""


def _dp_run(tmp_path: Path, corpus: Path, budget: str = "") -> tuple[dict, list[dict]]:
    path = tiny_job(tmp_path, corpus, DP_SGD.format(budget=budget), rounds=3, sites=("a", "b"))
    job, job_dir = load_job(path)
    summary = run_federated(job, job_dir, "inprocess")
    return summary, read_metrics(tmp_path / "out")


def test_dp_sgd_run_reports_epsilon_and_the_budget_stops_before_exceeding(
    tmp_path: Path, corpus_file: Path
) -> None:
    summary, recs = _dp_run(tmp_path / "free", corpus_file)
    assert [r["round"] for r in recs] == [0, 1, 2]
    for site in ("a", "b"):
        eps = [r["sites"][site]["epsilon"] for r in recs]
        assert eps == sorted(eps) and eps[0] > 0
        last = recs[-1]["sites"][site]
        assert last["epsilon"] == last["epsilon_pld"] < last["epsilon_rdp"]
        assert "train_loss" not in last, "losses on site data are outside epsilon"
        # the site's own numbers agree with the accountant: q = B / N, 3 rounds of 2 steps
        q = 4 / last["num_samples"]
        assert last["epsilon"] == pytest.approx(epsilon([Mechanism(q, 1.0, 6)], DELTA, "pld"))
    assert set(summary["epsilon_by_site"]) == {"a", "b"} and "stopped" not in summary

    worst = [max(r["sites"][s]["epsilon"] for s in ("a", "b")) for r in recs]
    budget = (worst[1] + worst[2]) / 2  # two rounds fit, the third does not
    summary, recs = _dp_run(tmp_path / "budget", corpus_file, f"budget_epsilon = {budget}")
    assert [r["round"] for r in recs] == [0, 1]
    assert summary["rounds_completed"] == 2 and "privacy budget" in summary["stopped"]
    assert (tmp_path / "budget" / "out" / "summary.json").is_file()
    assert load_checkpoint(tmp_path / "budget" / "out" / "checkpoint.safetensors")[0] == 1
    assert max(summary["epsilon_by_site"][s]["epsilon"] for s in ("a", "b")) <= budget


def test_client_level_central_run_records_epsilon(tmp_path: Path, corpus_file: Path) -> None:
    extra = """threads = 1
[strategy]
name = "fedavg"
weighting = "uniform"
[privacy]
secure_mode = true
[privacy.client]
clip = 0.5
noise_multiplier = 1.0
"""
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file, extra, rounds=2, sites=("a", "b")))
    summary = run_federated(job, job_dir, "inprocess")
    recs = read_metrics(tmp_path / "out")
    assert recs[1]["epsilon"] > recs[0]["epsilon"] > 0 and recs[1]["client_clip"] == 0.5
    assert summary["epsilon_client"]["epsilon"] == recs[1]["epsilon"]


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("privacy, extra, message", [
    ({"dp_sgd": {"noise_multiplier": 1.0}}, {}, "training.sampling = 'poisson'"),
    ({"dp_sgd": {"noise_multiplier": 1.0, "target_epsilon": 8}}, {}, "exactly one"),
    ({"dp_sgd": {}}, {}, "exactly one"),
    ({"budget_epsilon": 8}, {}, "needs a dp_sgd or a client"),
    ({"client": {"clip": 1.0, "noise_multiplier": 1.0}}, {"strategy": {"name": "median"}},
     "fedavg or fedopt"),
    ({"client": {"clip": 1.0, "noise_multiplier": 1.0}}, {}, "weighting = 'uniform'"),
    ({"client": {"clip": {"quantile": 0.5}, "noise_multiplier": 1.0,
                 "placement": "distributed"}},
     {"strategy": {"name": "fedavg", "weighting": "uniform"}}, "placement = 'central'"),
    ({"client": {"clip": 0, "noise_multiplier": 1.0}}, {}, "clip must be > 0"),
    ({"dp_sgd": {"noise_multiplier": 1.0}},
     {"training": {"sampling": "poisson"}, "strategy": {"name": "dynamic"}}, "dynamic"),
])
def test_privacy_config_rules(privacy: dict, extra: dict, message: str) -> None:
    with pytest.raises(FedskyError, match=message.replace("(", r"\(")):
        parse_job({"sites": [{"name": "a"}], "privacy": privacy, **extra})


def test_privacy_config_accepts_both_levels() -> None:
    job = parse_job({"sites": [{"name": "a"}], "training": {"sampling": "poisson"},
                     "strategy": {"name": "fedopt", "optimizer": "adam", "weighting": "uniform"},
                     "privacy": {"dp_sgd": {"target_epsilon": 8},
                                 "client": {"clip": {"quantile": 0.7}, "noise_multiplier": 0.5},
                                 "budget_epsilon": 10}})
    assert job.privacy is not None and job.privacy.secure_mode
    assert isinstance(job.privacy.client, ClientDpConfig)
    assert job.privacy.client.clip.quantile == 0.7  # type: ignore[union-attr]
