"""Privacy at a site: record-level DP-SGD (Abadi et al. 2016) and the site's privacy ledger.

A record is one training sequence (`training.seq_len` tokens). Each step takes a Poisson sample
of the site's sequences, computes one gradient per sequence, clips each to `max_grad_norm`,
adds Gaussian noise to their sum and divides by the expected batch size before the optimizer
steps. Per-sequence gradients come from Opacus' `GradSampleModule`, which wraps the model for
the round and is removed after it: Opacus has per-sample rules for Linear, Embedding and
LayerNorm (LoRA adapters are Linear); transformers' Conv1D (GPT-2) and LlamaRMSNorm have none,
and for those Opacus computes them in its functorch mode (vmap over the layer).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedsky.config import JobConfig, PrivacyConfig, TrainingConfig
from fedsky.errors import FedskyError
from fedsky.privacy import (
    ACCOUNTANTS,
    Accountant,
    Mechanism,
    Params,
    clip_update,
    clipped_sum,
    epsilon,
    gaussian_noise,
    noise_generator,
    noise_update,
    plan_noise,
    poisson_sample,
)
from fedsky.training import LocalResult, make_optimizer, train_steps

log = logging.getLogger("fedsky.privacy")

INSECURE = ("privacy.secure_mode = false: DP noise and sampling come from a PRNG seeded by the "
            "job's seed, for a reproducible simulation. Anyone who knows the seed can remove the "
            "noise: the epsilon reported is NOT a guarantee. Never run real data like this.")
_SALT = 0xD9_5D  # keeps DP randomness apart from the other seeds of the same round


@dataclass(frozen=True)
class DpSgd:
    sample_rate: float  # q: each sequence joins a step's batch with this probability
    noise_multiplier: float  # z: noise std z * max_grad_norm on the sum of clipped gradients
    max_grad_norm: float  # C


def sequence_losses(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(b,) mean next-token loss of each sequence in `batch` (b, T)."""
    b, t = batch.shape
    # Explicit (b, T) position ids: transformers builds (1, T) ones, which Opacus would take for
    # one sample, summing the position embedding's gradient over the batch.
    positions = torch.arange(t, device=batch.device).expand(b, t)
    logits = model(input_ids=batch, position_ids=positions).logits[:, :-1]  # (b, T-1, vocab)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                reduction="none")
    return per_token.view(b, t - 1).mean(dim=1)


def dp_train_steps(
    model: torch.nn.Module,
    data: torch.Tensor,
    cfg: TrainingConfig,
    dp: DpSgd,
    steps: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> LocalResult:
    """`steps` DP-SGD steps on `data` (N, T). `generator` drives sampling and noise (None: the
    CSPRNG). `cfg.grad_clip` is not applied: per-sequence clipping replaces it."""
    from opacus import GradSampleModule

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    expected_batch = dp.sample_rate * len(data)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.train()
    losses = torch.zeros((), device=device)
    sequences = 0
    start = time.perf_counter()
    try:
        for _ in range(steps):
            idx = poisson_sample(len(data), dp.sample_rate, generator)
            batch = data[idx].to(device, non_blocking=True)  # (b, T); b is random, maybe 0
            losses += private_gradients(gsm, params, batch, dp, expected_batch, generator)
            sequences += len(idx)
            if anchor is not None:  # FedProx: data-independent, so added after the noise
                for p, a in zip(params, anchor, strict=True):
                    p.grad += cfg.prox_mu * (p.detach() - a)
            opt.step()
    finally:
        gsm.cleanup()  # the model goes back to plain: no hooks, no grad_sample
    return LocalResult(steps=steps, sequences=sequences, tokens=sequences * data.shape[1],
                       mean_loss=float(losses) / max(1, sequences),
                       compute_s=time.perf_counter() - start)


def private_gradients(gsm: torch.nn.Module, params: list[torch.nn.Parameter],
                      batch: torch.Tensor, dp: DpSgd, expected_batch: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Set each p.grad to (sum of clipped per-sequence gradients + N(0, (z C)^2)) / expected
    batch; returns the batch's summed loss. `gsm` is the model wrapped by GradSampleModule."""
    gsm.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=batch.device)
    summed = [torch.zeros_like(p) for p in params]
    if len(batch):
        with warnings.catch_warnings():
            # Opacus hooks the embedding, whose input (token ids) needs no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            seq_losses = sequence_losses(gsm, batch)
            seq_losses.sum().backward()
        per_sample = [p.grad_sample if p.grad_sample is not None
                      else torch.zeros((len(batch), *p.shape), device=p.device)
                      for p in params]  # each (b, *p.shape)
        summed = clipped_sum(per_sample, dp.max_grad_norm)
        loss_sum = seq_losses.detach().sum()
    std = dp.noise_multiplier * dp.max_grad_norm
    for p, s in zip(params, summed, strict=True):
        p.grad = (s + gaussian_noise(p.shape, std, generator).to(p.device)) / expected_batch
    return loss_sum


@dataclass
class SitePrivacy:
    """What privacy costs this site and what it has spent (the ledger: rounds trained)."""

    cfg: PrivacyConfig
    local_steps: int
    senders: int  # sites expected per round: each adds 1/senders of the client noise variance
    dp_sgd: DpSgd | None
    rounds: int = 0
    _eps: dict[tuple[int, str], float] = field(default_factory=dict)

    @classmethod
    def open(cls, job: JobConfig, num_records: int, resumed_at: int = 0) -> SitePrivacy:
        priv = job.privacy
        assert priv is not None
        if not priv.secure_mode:
            log.warning(INSECURE)
        dp = None
        if priv.dp_sgd is not None:
            cfg = priv.dp_sgd
            q = min(1.0, job.training.batch_size / num_records)
            z = cfg.noise_multiplier
            if z is None:
                assert cfg.target_epsilon is not None
                z = plan_noise(cfg.target_epsilon, cfg.delta, q,
                               job.rounds * job.training.local_steps, cfg.accountant)
                log.info("DP-SGD: noise multiplier %.4f for epsilon %g at delta %g (%s, sample "
                         "rate %.4g, %d steps)", z, cfg.target_epsilon, cfg.delta,
                         cfg.accountant, q, job.rounds * job.training.local_steps)
            dp = DpSgd(q, z, cfg.max_grad_norm)
        # Resumed after round `resumed_at - 1`, a site cannot know which earlier rounds it
        # trained in; it counts all of them: an upper bound, exact when all sites train always.
        return cls(priv, job.training.local_steps,
                   job.coordinator.sites_per_round or len(job.sites), dp, rounds=resumed_at)

    def epsilon(self, rounds: int, accountant: Accountant) -> float:
        """Record-level epsilon after `rounds` rounds of local DP-SGD (cached)."""
        assert self.dp_sgd is not None and self.cfg.dp_sgd is not None
        key = (rounds, accountant)
        if key not in self._eps:
            mech = Mechanism(self.dp_sgd.sample_rate, self.dp_sgd.noise_multiplier,
                             rounds * self.local_steps)
            self._eps[key] = epsilon([mech], self.cfg.dp_sgd.delta, accountant)
        return self._eps[key]

    def check_budget(self) -> None:
        """Refuse a round that would take this site past the budget (the coordinator stops the
        run before that; this guards the first round and any coordinator that does not)."""
        budget, dp_cfg = self.cfg.budget_epsilon, self.cfg.dp_sgd
        if budget is None or dp_cfg is None:
            return
        eps = self.epsilon(self.rounds + 1, dp_cfg.accountant)
        if eps > budget:
            raise FedskyError(f"privacy budget: one more round would take this site to epsilon "
                              f"{eps:.3g} > privacy.budget_epsilon {budget:g} ({dp_cfg.accountant},"
                              f" delta {dp_cfg.delta:g}); raise the noise or the budget")

    def train(self, model: torch.nn.Module, data: torch.Tensor, cfg: TrainingConfig, seed: int,
              device: torch.device) -> LocalResult:
        """One round of local training, DP-SGD when configured; counts the round."""
        self.check_budget()
        if self.dp_sgd is None:
            return train_steps(model, data, cfg, cfg.local_steps,
                               torch.Generator().manual_seed(seed), device)
        gen = noise_generator(self.cfg.secure_mode, seed ^ _SALT)
        result = dp_train_steps(model, data, cfg, self.dp_sgd, cfg.local_steps, gen, device)
        self.rounds += 1
        return result

    def privatize_update(self, delta: Params, seed: int) -> Params:
        """Client-level DP placed at the sites: clip the update to C and add this site's share
        N(0, (z C)^2 / senders), so the sum over senders carries N(0, (z C)^2)."""
        client = self.cfg.client
        if client is None or client.placement != "distributed":
            return delta
        assert isinstance(client.clip, float)
        clipped = clip_update(delta, client.clip).update
        std = client.noise_multiplier * client.clip / math.sqrt(self.senders)
        return noise_update(clipped, std, noise_generator(self.cfg.secure_mode, seed ^ ~_SALT))

    def header(self) -> dict[str, Any]:
        """The reply's privacy report. Loss numbers measured on this site's data are withheld:
        epsilon does not cover them."""
        nan = float("nan")
        out: dict[str, Any] = {"train_loss": nan, "loss_before": nan, "loss_after": nan}
        report: dict[str, Any] = {}
        dp, dp_cfg = self.dp_sgd, self.cfg.dp_sgd
        if dp is not None and dp_cfg is not None:
            report = {
                "epsilon": {a: self.epsilon(self.rounds, a) for a in ACCOUNTANTS},
                "accountant": dp_cfg.accountant,
                "delta": dp_cfg.delta,
                "noise_multiplier": dp.noise_multiplier,
                "sample_rate": dp.sample_rate,
                "steps": self.rounds * self.local_steps,
            }
            if self.cfg.budget_epsilon is not None:
                report["epsilon_next"] = self.epsilon(self.rounds + 1, dp_cfg.accountant)
        out["privacy"] = report
        return out
