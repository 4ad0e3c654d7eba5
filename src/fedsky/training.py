"""Local training on a site: a plain PyTorch loop over the site's own sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedsky.config import TrainingConfig
from fedsky.privacy import poisson_sample


@dataclass
class LocalResult:
    """What one round of local training produced (the update is computed by the caller)."""

    steps: int
    sequences: int  # sequences processed (steps * batch)
    tokens: int  # tokens processed
    mean_loss: float
    compute_s: float  # wall seconds spent in the training loop


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_steps(
    model: torch.nn.Module,
    data: torch.Tensor,
    cfg: TrainingConfig,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    opt: torch.optim.Optimizer | None = None,
) -> LocalResult:
    """Run `steps` optimizer steps on batches sampled from `data` (N, T): with replacement, or
    by Poisson sampling (`cfg.sampling`; a step whose sample is empty changes nothing).

    Sites pass no optimizer and get a fresh one each round: they keep no state between
    rounds, so a site that restarts loses nothing. Centralized training passes its own.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt if opt is not None else make_optimizer(params, cfg)
    # FedProx anchor: the weights this round started from (the global model at a site).
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    model.train()
    losses = torch.zeros((), device=device)
    tokens = taken = 0
    start = time.perf_counter()
    for _ in range(steps):
        idx = sample_batch(len(data), cfg, generator)
        if len(idx) == 0:
            continue
        batch = data[idx].to(device, non_blocking=True)  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        objective = loss
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            objective = loss + cfg.prox_mu / 2 * prox
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses += loss.detach()
        tokens += batch.numel()
        taken += 1
    mean_loss = float(losses) / max(1, taken)  # one device sync, after the loop
    return LocalResult(
        steps=steps,
        sequences=tokens // data.shape[1],
        tokens=tokens,
        mean_loss=mean_loss,
        compute_s=time.perf_counter() - start,
    )


def sample_batch(n: int, cfg: TrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """Indices of one step's batch: batch_size draws with replacement, or a Poisson sample with
    rate batch_size / n (the batch size is then the expected one)."""
    if cfg.sampling == "poisson":
        return poisson_sample(n, min(1.0, cfg.batch_size / n), generator)
    return torch.randint(n, (cfg.batch_size,), generator=generator)
