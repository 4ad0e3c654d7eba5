"""The attacks of the leakage audit, as pure functions over tensors and scores.

`fedsky.audit` reads a run and feeds them; here is only the math:

- token-set inference: which vocabulary rows a site's update moved (Melis et al. 2019 read
  the embedding gradient's non-zero rows; with tied input/output embeddings and Adam every
  row moves, but the rows of absent tokens all move alike, so the attacker scores each row
  by its distance from the median row and splits the scores in two, Otsu 1979);
- canary exposure (Carlini et al. 2019, "The Secret Sharer"): the rank of the planted secret
  among random candidates under the released model, in bits;
- greedy extraction: the secret's digits, one at a time, by the model's own preference;
- membership inference by loss threshold (Yeom et al. 2018), as an AUC, also calibrated by
  the loss under the initial model (a reference model every party can build from the seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

Scorer = Callable[[list[str]], np.ndarray]  # texts -> log-likelihood of each (nats)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    if len(positive) == 0 or len(negative) == 0:
        return math.nan
    ranks = rankdata(np.concatenate([positive, negative]))
    n1 = len(positive)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * len(negative)))


def row_scores(rows: torch.Tensor) -> torch.Tensor:
    """(V, d) update rows -> (V,) distance of each row from the coordinate-wise median row.

    Rows of tokens a site never fed in get only the softmax's pull, nearly the same for all of
    them (and nothing at all with an untied input embedding): they sit at the median."""
    rows = rows.double()
    return (rows - rows.median(dim=0).values).norm(dim=1)


def otsu_split(scores: np.ndarray) -> float:
    """The threshold that best separates `scores` into two groups (between-class variance),
    searched over the sorted values; on log scale, the usual shape of these scores."""
    x = np.sort(np.log(np.maximum(scores, 1e-30)))
    n = len(x)
    if n < 2 or x[0] == x[-1]:
        return float(np.exp(x[-1])) if n else 0.0
    csum = np.cumsum(x)
    k = np.arange(1, n)  # the first k values form the low group
    mean_lo = csum[:-1] / k
    mean_hi = (csum[-1] - csum[:-1]) / (n - k)
    between = k * (n - k) * (mean_lo - mean_hi) ** 2
    best = int(np.argmax(between))
    return float(np.exp((x[best] + x[best + 1]) / 2))


def combine_rounds(per_round: Sequence[torch.Tensor]) -> np.ndarray:
    """A site's scores over rounds -> one score per token: each round's scores over that
    round's median (rounds differ in scale), then the maximum (a token used in any round)."""
    normed = [s / max(float(s.median()), 1e-30) for s in per_round]
    return torch.stack(normed).max(dim=0).values.numpy()


def token_set_metrics(scores: dict[str, np.ndarray], truth: dict[str, set[int]],
                      permutations: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per site: the guessed set (Otsu split of its scores) against the tokens its data holds;
    `chance_recall` is the recall of a random guess of the same size. Site-unique tokens are
    attributed to the site that scores them highest; `unique_chance` is how many of them the
    same guesses recover when each site's scores are shuffled over the vocabulary (mean of
    `permutations` shuffles): what an attacker who learnt nothing would get."""
    sites = list(scores)
    vocab = len(next(iter(scores.values())))
    stacked = np.stack([scores[s] / otsu_split(scores[s]) for s in sites])  # (K, V)
    uniques = [truth[s] - set().union(*(truth[o] for o in sites if o != s)) for s in sites]
    found = _recovered(stacked, uniques)
    rng = np.random.default_rng(seed)
    chance = np.mean([_recovered(np.stack([rng.permutation(row) for row in stacked]), uniques)
                      for _ in range(permutations)], axis=0)
    owner = stacked.argmax(axis=0)
    out: dict[str, dict[str, float]] = {}
    for k, site in enumerate(sites):
        guess = set(np.nonzero(stacked[k] > 1.0)[0].tolist())
        true, unique = truth[site], uniques[k]
        hits = len(guess & true)
        labels = np.zeros(vocab, dtype=bool)
        labels[list(true)] = True
        out[site] = {
            "tokens": len(true),
            "guessed": len(guess),
            "recall": hits / max(1, len(true)),
            "precision": hits / max(1, len(guess)),
            "chance_recall": len(guess) / vocab,
            "base_rate": len(true) / vocab,
            "auc": auc(stacked[k][labels], stacked[k][~labels]),
            "unique_tokens": len(unique),
            "unique_recovered": int(found[k]),
            "unique_chance": float(chance[k]),
            "attribution": (sum(owner[v] == k for v in unique) / len(unique)) if unique
            else math.nan,
        }
    return out


def _recovered(stacked: np.ndarray, uniques: list[set[int]]) -> np.ndarray:
    """Per site k: its unique tokens that are in its guess (score > 1) and score highest at k."""
    owner = stacked.argmax(axis=0)
    return np.array([sum(stacked[k, v] > 1.0 and owner[v] == k for v in u)
                     for k, u in enumerate(uniques)])


def exposure(canary_ll: float, candidate_ll: np.ndarray) -> tuple[int, float]:
    """Rank of the canary among candidates (1 = most likely) and its exposure in bits,
    log2(N + 1) - log2(rank): the sampling estimate of log2|R| - log2 rank (Carlini et al.)."""
    rank = 1 + int((candidate_ll > canary_ll).sum())
    return rank, math.log2(len(candidate_ll) + 1) - math.log2(rank)


def random_secrets(n: int, digits: int, rng: np.random.Generator,
                   exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = "".join(str(d) for d in rng.integers(0, 10, digits))
        if s not in exclude:
            out.append(s)
    return out


def extract_digits(score: Scorer, render: Callable[[str], str], digits: int) -> str:
    """Greedy extraction: each next digit is the one whose text (the template up to it) the
    model finds most likely. The attacker knows the template, not the digits."""
    found = ""
    for _ in range(digits):
        options = [found + str(d) for d in range(10)]
        found = options[int(np.argmax(score([render(o) for o in options])))]
    return found


def sequence_log_likelihood(model: torch.nn.Module, ids: list[list[int]],
                            batch: int = 64) -> np.ndarray:
    """Sum of log p(token | earlier tokens) over each id list (the first token is given)."""
    out = np.zeros(len(ids))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            width = max(len(x) for x in part)
            x = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.bool)
            for i, seq in enumerate(part):
                x[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = True
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)
            got = logp.gather(-1, x[:, 1:, None])[..., 0] * mask[:, 1:]
            out[start:start + len(part)] = got.sum(dim=1).numpy()
    return out


def sequence_losses(model: torch.nn.Module, rows: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Mean next-token loss of each (T,) row of `rows` (N, T)."""
    lls = sequence_log_likelihood(model, rows.tolist(), batch)
    return -lls / (rows.shape[1] - 1)
