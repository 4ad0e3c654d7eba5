"""The job: split a corpus's documents across sites, the way real silos would hold them.

Pure functions over document sizes and labels, seeded explicitly, so a simulation's split is
reproducible and testable. Documents are never cut: a site owns whole articles or records,
which is what a real institution holds.

Schemes:
    iid: shuffled, then cut so each site's characters approximate its share.
    contiguous: the same cut in corpus order, so each site holds a run of neighbouring
        articles (topic skew without labels).
    dirichlet: label skew; each label's documents are spread with Dirichlet proportions
        (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
        Federated Visual Classification"); small alpha gives each site few labels.
    capacity: like iid, with shares set by the caller to each site's declared compute.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from fedsky.data.corpus import Document
from fedsky.errors import FedskyError

SCHEMES = ("iid", "contiguous", "dirichlet", "capacity")

# Dirichlet draws are repeated (with the same generator, so still deterministic) until every
# site gets a document, as in NIID-Bench (Li et al. 2022); after this many tries it is an error.
_DIRICHLET_TRIES = 100


def partition(
    docs: list[Document], shares: list[float], scheme: str, *, seed: int, alpha: float = 0.5
) -> list[list[int]]:
    """Assign every document to exactly one site.

    Args:
        docs: The training pool.
        shares: One positive weight per site; only ratios matter. They set each site's
            fraction of the characters (iid, contiguous, capacity) or the expected fraction of
            each label (dirichlet).
        scheme: One of `SCHEMES`.
        seed: Seeds `numpy.random.default_rng`; same seed, same split.
        alpha: Dirichlet concentration (dirichlet only); small is skewed, large is near iid.

    Returns:
        Per site, its sorted document indices; disjoint, and together all of `range(len(docs))`.

    Raises:
        FedskyError: A site would get no document, there are more sites than documents, or
            dirichlet is asked for without labels.
    """
    _check(docs, shares, scheme, alpha)
    rng = np.random.default_rng(seed)
    weights = np.asarray(shares, dtype=np.float64) / math.fsum(shares)
    if scheme == "dirichlet":
        sites = _dirichlet(docs, weights, alpha, rng)
    else:
        order = np.arange(len(docs)) if scheme == "contiguous" else rng.permutation(len(docs))
        sites = _split_by_chars(order, np.array([len(docs[i].text) for i in order]), weights)
    for k, site in enumerate(sites):
        if not site:
            raise _empty_site_error(k, len(docs), scheme)
    return [sorted(int(i) for i in site) for site in sites]


def _check(docs: list[Document], shares: list[float], scheme: str, alpha: float) -> None:
    if scheme not in SCHEMES:
        raise FedskyError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if not shares:
        raise FedskyError("partition needs at least one site")
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise FedskyError(f"site shares must be positive numbers; got {shares}")
    if len(shares) > len(docs):
        raise FedskyError(
            f"{len(shares)} sites but only {len(docs)} documents: every site needs at least one; "
            "use fewer sites or more data"
        )
    if scheme == "dirichlet":
        if alpha <= 0:
            raise FedskyError(f"dirichlet alpha must be positive; got {alpha}")
        if any(d.label is None for d in docs):
            raise FedskyError(
                "partition = 'dirichlet' needs a label on every document: set data.label_column "
                "(csv) or use another scheme"
            )


def _empty_site_error(site: int, n_docs: int, scheme: str) -> FedskyError:
    return FedskyError(
        f"site {site} gets no documents ({n_docs} documents, partition = {scheme!r}); "
        "use fewer sites, more data, or larger shares for the small sites"
    )


def _split_by_chars(order: np.ndarray, sizes: np.ndarray, weights: np.ndarray) -> list[list[int]]:
    """Cut `order` into consecutive runs whose character totals best match `weights`.

    Each cut k is put at the document boundary nearest to the target cumulative size
    sum(weights[:k]) * total, so every site is within half a document of its share at each end.
    """
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.float64)])  # chars before doc b
    targets = np.cumsum(weights)[:-1] * cum[-1]
    cuts = [0]
    for target in targets:
        right = int(np.searchsorted(cum, target, side="left"))  # first b with cum[b] >= target
        left = max(right - 1, 0)
        right = min(right, len(order))
        best = left if target - cum[left] <= cum[right] - target else right
        cuts.append(max(best, cuts[-1]))  # never move back: runs stay disjoint
    cuts.append(len(order))
    return [order[a:b].tolist() for a, b in pairwise(cuts)]


def _dirichlet(
    docs: list[Document], weights: np.ndarray, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Spread each label's documents across sites with proportions ~ Dirichlet.

    The concentration is alpha * n_sites * weights: with equal shares that is Dirichlet(alpha *
    ones), and unequal shares set each site's expected fraction of every label.
    """
    labels = sorted({d.label for d in docs if d.label is not None})
    by_label = [np.array([i for i, d in enumerate(docs) if d.label == lab]) for lab in labels]
    concentration = alpha * len(weights) * weights
    sites: list[list[int]] = []
    for _ in range(_DIRICHLET_TRIES):
        sites = [[] for _ in weights]
        for idx in by_label:
            idx = rng.permutation(idx)
            p = rng.dirichlet(concentration)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                sites[k].extend(part.tolist())
        if all(sites):
            break
    return sites
