"""The job: pack tokenized documents into fixed-length training rows.

Documents are concatenated with EOS between them and cut into non-overlapping rows, as GPT-2
and nanoGPT do: no padding, so every token in a row is trained on; the model learns from EOS
where one document ends and the next begins.
"""

from __future__ import annotations

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
