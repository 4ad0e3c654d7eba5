"""The job: pack tokenized documents into fixed-length training rows.

Documents are concatenated with EOS between them and cut into non-overlapping rows, as GPT-2
and nanoGPT do: no padding, so every token in a row is trained on; the model learns from EOS
where one document ends and the next begins. Instruction examples are packed whole instead
(`pack_examples`), with labels that leave their prompts out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def to_sequences(token_lists: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into rows of `seq_len` tokens.

    Args:
        token_lists: Token ids per document; empty documents are skipped.
        seq_len: Tokens per row.
        eos_id: The separator id.

    Returns:
        LongTensor of shape (N, seq_len); the ragged tail is dropped, so N may be 0 (the caller
        decides whether that is an error).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive; got {seq_len}")
    parts: list[np.ndarray] = []
    sep = np.array([eos_id], dtype=np.int64)
    for ids in token_lists:
        if len(ids) == 0:
            continue
        if parts:
            parts.append(sep)
        parts.append(np.asarray(ids, dtype=np.int64))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_rows = len(flat) // seq_len
    rows = flat[: n_rows * seq_len].reshape(n_rows, seq_len)  # (N, seq_len)
    return torch.from_numpy(rows.copy())


IGNORE = -100  # the label of a position that takes no loss (transformers' convention)


@dataclass(frozen=True)
class Rows:
    """Training rows that carry their own labels: instruction data, where the loss is taken on
    the responses only. Indexes, slices and moves like the (N, T) id tensor of plain text."""

    ids: torch.Tensor  # (N, T) token ids
    labels: torch.Tensor  # (N, T) the same ids, or IGNORE where no loss is taken

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: Any) -> Rows:
        return Rows(self.ids[idx], self.labels[idx])

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def numel(self) -> int:
        return self.ids.numel()

    def to(self, device: torch.device, non_blocking: bool = False) -> Rows:
        return Rows(self.ids.to(device, non_blocking=non_blocking),
                    self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Rows:
        return Rows(self.ids.pin_memory(), self.labels.pin_memory())


Batch = torch.Tensor | Rows  # plain text rows are their own labels


def inputs_and_labels(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (B, T); transformers shifts the labels by one inside the model."""
    return (batch.ids, batch.labels) if isinstance(batch, Rows) else (batch, batch)


def target_count(data: Batch, idx: torch.Tensor) -> int:
    """How many next-token predictions of the rows `data[idx]` take a loss."""
    if isinstance(data, Rows):
        return int((data.labels[idx, 1:] != IGNORE).sum())
    return len(idx) * (data.shape[1] - 1)


def concat(parts: list[Batch]) -> Batch:
    """Rows of several sites, pooled (the centralized ceiling)."""
    if all(isinstance(p, Rows) for p in parts):
        return Rows(torch.cat([p.ids for p in parts]), torch.cat([p.labels for p in parts]))
    return torch.cat(parts)  # type: ignore[arg-type]


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int,
                  pad_id: int) -> Rows:
    """Pack whole (ids, labels) examples into rows of `seq_len`, in order, as many as fit in a
    row; the rest of a row is padding (pad_id, no loss). An example longer than a row is cut
    to its first `seq_len` tokens; one left with no trained token is dropped.

    Right padding needs no attention mask: causal attention never looks ahead to the pads.
    """
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex_ids, ex_labels in examples:
        ex_ids, ex_labels = ex_ids[:seq_len], ex_labels[:seq_len]
        if all(label == IGNORE for label in ex_labels[1:]):
            continue
        if len(ids) + len(ex_ids) > seq_len:
            rows.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + ex_ids, labels + ex_labels
    if ids:
        rows.append((ids, labels))
    out_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    out_labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int64)
    for r, (i, lab) in enumerate(rows):
        out_ids[r, : len(i)] = torch.tensor(i)
        out_labels[r, : len(lab)] = torch.tensor(lab)
    return Rows(out_ids, out_labels)
