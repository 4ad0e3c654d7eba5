"""Update compression as pure functions over flat fp32 tensors.

Each function maps tensors (and plain numbers) to tensors; the state some schemes need
between rounds (error-feedback residuals, PowerSGD's warm-started factors) lives on the codec
objects in `fedsky.codecs`, which call these. Updates are handled as one flat vector (the
trainable tensors concatenated in sorted-name order) so that a payload carries a handful of
tensors rather than a few per parameter: at 100x compression, per-tensor framing would cost
more than the values.

Schemes and their papers:
  - stochastic quantization with per-chunk scales: QSGD (Alistarh et al. 2017), uniform grid;
  - top-k per chunk with error feedback: Stich et al. 2018, Karimireddy et al. 2019 (EF-SGD);
  - rand-k with a shared seed: Stich et al. 2018; Konecny et al. 2016 (random masks);
  - low rank: PowerSGD (Vogels et al. 2019), one power-iteration step with a warm start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]

# Top-k offsets within a chunk travel as int16, so a chunk holds at most this many values.
MAX_TOPK_CHUNK = 1 << 15


def flatten(params: Params, names: list[str]) -> torch.Tensor:
    """The named tensors as one (n,) fp32 CPU vector, in the order of `names`."""
    if not names:
        return torch.zeros(0)
    return torch.cat([params[k].detach().to("cpu", torch.float32).reshape(-1) for k in names])


def unflatten(flat: torch.Tensor, like: Params, names: list[str]) -> Params:
    """Inverse of `flatten`: views into `flat` with the shapes of `like` (no copies)."""
    sizes = [like[k].numel() for k in names]
    return {k: part.view(like[k].shape)
            for k, part in zip(names, flat.split(sizes), strict=True)}


# ---- quantization -------------------------------------------------------------------------

def levels(bits: int) -> int:
    """Intervals of the b-bit grid: 2^b codes spread evenly over [-s, s]."""
    return (1 << bits) - 1


def stochastic_round(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """floor(t) + Bernoulli(t - floor(t)): E[result] = t exactly (unbiased)."""
    low = torch.floor(t)
    return low + (torch.rand(t.shape, generator=gen) < (t - low)).to(t.dtype)


def chunk_absmax(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(ceil(n / chunk),) max |x| of each chunk: the per-chunk scales."""
    pad = (-x.numel()) % chunk
    return torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, chunk).amax(dim=1)


def quantize(x: torch.Tensor, bits: int, scales: torch.Tensor, chunk: int,
             gen: torch.Generator | None) -> torch.Tensor:
    """(n,) uint8 codes of `x` on the grid -s + j * 2s / (2^b - 1), j = 0 .. 2^b - 1.

    `scales` holds one s per chunk of `chunk` values (a single shared s: pass a 1-element
    tensor and chunk >= n). Values beyond [-s, s] are clipped (only possible with a shared
    scale). With `gen`, stochastic rounding: unbiased, |x - x_hat| <= 2s / (2^b - 1); without,
    round to nearest: biased, error <= s / (2^b - 1).
    """
    s = scales.repeat_interleave(chunk)[: x.numel()]
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero chunk encodes as anything
    t = (x.clamp(-s, s) / safe + 1) * (levels(bits) / 2)  # in [0, 2^b - 1]
    codes = stochastic_round(t, gen) if gen is not None else torch.round(t)
    return codes.clamp_(0, levels(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, bits: int, scales: torch.Tensor, chunk: int) -> torch.Tensor:
    """Inverse of `quantize`: (n,) fp32 grid values."""
    s = scales.repeat_interleave(chunk)[: codes.numel()]
    return (codes.to(torch.float32) * (2 / levels(bits)) - 1) * s


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes (b in 2, 4, 8), 8/b to a byte, first code in the low bits."""
    per = 8 // bits
    pad = (-codes.numel()) % per
    c = torch.nn.functional.pad(codes, (0, pad)).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n codes."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


def packed_len(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


# ---- sparsification -------------------------------------------------------------------------

def chunk_count(n: int, chunk: int) -> int:
    return max(1, math.ceil(n / chunk))


def per_chunk_k(density: float, chunk: int) -> int:
    """Values kept in each chunk by top-k: floor(density * chunk), at least 1."""
    return min(chunk, max(1, int(density * chunk)))


@dataclass
class Sparse:
    """Top-k per chunk: offsets (int16) within each chunk and the values there, row-major."""

    offsets: torch.Tensor  # (chunks, k) int16, sorted within a row
    values: torch.Tensor  # (chunks * k,) fp32


def topk_chunks(x: torch.Tensor, k: int, chunk: int) -> Sparse:
    """The k largest |x| of every chunk (the last chunk zero-padded).

    Per chunk rather than global: offsets fit in 16 bits, the work splits evenly, and every
    region of the model keeps some of its update each round.
    """
    pad = (-x.numel()) % chunk
    rows = torch.nn.functional.pad(x, (0, pad)).view(-1, chunk)  # (chunks, chunk)
    idx = rows.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return Sparse(idx.to(torch.int16), rows.gather(1, idx).reshape(-1))


def scatter_chunks(offsets: torch.Tensor, values: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """Inverse of `topk_chunks`: the dense (n,) vector, zero where nothing was sent."""
    rows = torch.zeros(offsets.shape[0], chunk)
    rows.scatter_(1, offsets.long(), values.view(offsets.shape))
    return rows.view(-1)[:n]


def randk_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct sorted positions of n, a function of `seed` only: every site that uses the
    round's shared seed picks the same support, so the coordinator sums aligned values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


# ---- low rank (PowerSGD) ---------------------------------------------------------------------

def lowrank_pays(shape: torch.Size, rank: int) -> bool:
    """Whether rank-r factors (a + b) * r are fewer numbers than the a x b matrix."""
    return len(shape) == 2 and rank * (shape[0] + shape[1]) < shape[0] * shape[1]


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p (a, r), via reduced QR."""
    return torch.linalg.qr(p, mode="reduced").Q


def powersgd(m: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration step (Vogels et al. 2019, Alg. 1): P = orth(M Q), Q' = M^T P.

    m: (a, b), q: (b, r) warm start. M is approximated by P Q'^T, the best rank-r
    approximation in the span of P; reusing Q' as next round's warm start makes repeated
    steps converge to the top singular subspace.
    """
    p = orthonormalize(m @ q)  # (a, r)
    return p, m.T @ p  # (a, r), (b, r)


# ---- adaptive choice -------------------------------------------------------------------------

def budget_bytes(budget_s: float, up_mbps: float, latency_ms: float, overhead: int) -> float:
    """Payload bytes that fit a transfer-time budget on a link, less fixed framing overhead."""
    return max(0.0, (budget_s - latency_ms / 1000) * up_mbps * 1e6 / 8 - overhead)


def fit_density(n: int, budget: float, bytes_per_kept: float) -> float:
    """The largest density whose kept values (each `bytes_per_kept` on the wire) fit `budget`."""
    return budget / (n * bytes_per_kept) if n else 1.0
