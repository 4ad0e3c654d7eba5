"""Local training on a site: a plain PyTorch loop over the site's own sequences.

The same loop runs in one process or on every rank of a multi-process site (torchrun), where
the model is wrapped in DistributedDataParallel: each step's batch is drawn identically on all
ranks and split into micro-batches, `grad_accum` per rank, and every micro-batch's loss is
weighted by its share of the batch's loss-bearing tokens, so the step equals one single-process
step on the whole batch (up to float summation order).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from fedsky.config import TrainingConfig
from fedsky.data import Batch, inputs_and_labels, target_count
from fedsky.errors import FedskyError
from fedsky.privacy import poisson_sample


@dataclass
class LocalResult:
    """What one round of local training produced (the update is computed by the caller)."""

    steps: int
    sequences: int  # sequences processed (steps * batch)
    tokens: int  # tokens processed
    mean_loss: float
    compute_s: float  # wall seconds spent in the training loop


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process site (torch.distributed); (0, 1) when alone."""

    rank: int = 0
    world: int = 1


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a CUDA device (precision auto or bf16); None: plain fp32."""
    if cfg.precision == "fp32":
        return None
    on_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not on_gpu:
        raise FedskyError("training.precision = 'bf16' needs a CUDA device with bf16 support; "
                          "use 'auto' (bf16 on such GPUs, fp32 elsewhere) or 'fp32'")
    return torch.bfloat16 if on_gpu else None


def check_ranks(cfg: TrainingConfig, ranks: Ranks) -> None:
    """Every rank must get equal, non-empty micro-batches, or DDP's all-reduce would stall."""
    if ranks.world == 1:
        return
    if cfg.sampling == "poisson":
        raise FedskyError("training.sampling = 'poisson' draws batches of random size, which "
                          "cannot be split evenly over a multi-process site; use 'uniform'")
    if cfg.batch_size % (cfg.grad_accum * ranks.world):
        raise FedskyError(f"training.batch_size ({cfg.batch_size}) must be a multiple of "
                          f"grad_accum x processes ({cfg.grad_accum} x {ranks.world})")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Host to device; through pinned memory on CUDA, so the copy overlaps compute."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def train_steps(
    model: torch.nn.Module,
    data: Batch,
    cfg: TrainingConfig,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    opt: torch.optim.Optimizer | None = None,
    ranks: Ranks = Ranks(),
) -> LocalResult:
    """Run `steps` optimizer steps on batches sampled from `data` (N, T): with replacement, or
    by Poisson sampling (`cfg.sampling`; a step whose sample is empty changes nothing).

    Sites pass no optimizer and get a fresh one each round: they keep no state between
    rounds, so a site that restarts loses nothing. Centralized training passes its own.
    On a multi-process site `model` is the DistributedDataParallel wrapper and `ranks` says
    which share of each batch is this process's; every rank passes the same `generator` state.
    """
    check_ranks(cfg, ranks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt if opt is not None else make_optimizer(params, cfg)
    # FedProx anchor: the weights this round started from (the global model at a site).
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    amp = autocast_dtype(cfg, device)
    model.train()
    losses = torch.zeros((), device=device)
    tokens = taken = 0
    start = time.perf_counter()
    for _ in range(steps):
        idx = sample_batch(len(data), cfg, generator)
        if len(idx) == 0:
            continue
        total = target_count(data, idx)  # loss-bearing tokens in the whole batch, all ranks
        # This rank's micro-batches: every world-th of grad_accum x world equal slices.
        mine = idx.tensor_split(cfg.grad_accum * ranks.world)[ranks.rank :: ranks.world]
        opt.zero_grad(set_to_none=True)
        for j, part in enumerate(mine):
            share = target_count(data, part) * ranks.world / total
            if share == 0 and ranks.world == 1:
                continue  # nothing to learn from (a Poisson draw's empty slice)
            last = j == len(mine) - 1
            # DDP all-reduces gradients on the last micro-batch's backward only.
            sync = contextlib.nullcontext() if last or ranks.world == 1 else model.no_sync()
            with sync:
                ids, labels = inputs_and_labels(to_device(data[part], device))  # (b, T) each
                with torch.autocast(device.type, amp or torch.bfloat16, enabled=amp is not None):
                    out = model(input_ids=ids, labels=labels)
                # transformers' loss is the mean over the micro-batch's targets; weighting it
                # by the micro-batch's share gives the whole batch's mean when summed.
                loss = out.loss if share else out.logits.sum() * 0.0
                objective = loss * share
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    objective = objective + cfg.prox_mu / 2 * prox / len(mine)
                objective.backward()
            losses += loss.detach() * (share / ranks.world)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tokens += len(idx) * data.shape[1]
        taken += 1
    if ranks.world > 1:  # every rank saw its share; the reported loss is the batch's
        torch.distributed.all_reduce(losses)
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
