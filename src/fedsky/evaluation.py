"""Held-out evaluation: loss, perplexity and next-token accuracy of the global model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedsky.data import IGNORE, Batch, inputs_and_labels


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float
    accuracy: float  # fraction of next tokens predicted exactly (argmax)
    tokens: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Batch, batch_size: int, device: torch.device
) -> EvalResult:
    """Token-weighted over every prediction in `data` (N, T): N * (T - 1) targets, or for
    instruction rows the response tokens only (their labels)."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for start in range(0, len(data), batch_size):
        ids, labels = inputs_and_labels(data[start : start + batch_size])  # (B, T) each
        targets = labels[:, 1:]  # (B, T-1)
        count += int((targets != IGNORE).sum())  # on the CPU: no device sync
        ids, targets = ids.to(device), targets.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, vocab)
        total_loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum",
            ignore_index=IGNORE,
        )
        correct += (logits.argmax(-1) == targets).sum()  # IGNORE never equals an argmax
    loss = float(total_loss) / count
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        accuracy=int(correct) / count,
        tokens=count,
    )
