"""CKKS parameter candidates for additions only: security, speed, size and precision.

For each candidate (ring degree N, modulus chain, scale) this measures, on one core, what an
encrypted sum costs and how exact it is at the design point of `fedsky.he`: the sum of 1000
site updates with values |x| <= 10. Precision is reported both for values spread over that
range and for small values (|x| <= 1e-3, the size of a typical model delta), because CKKS
error is absolute (noise / scale): small values need a large scale, a large scale needs a
large prime. Insecure candidates are shown with the error `CkksParams` raises. Prints JSON.

    python bench/he_params.py [--sites 1000] [--values 2048]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedsky import he
from fedsky.errors import FedskyError

CANDIDATES = [  # (N, chain, scale bits)
    (2048, (34, 20), 18),
    (4096, (40, 20), 24),
    (4096, (50, 20), 32),
    (4096, (60, 20), 40),  # the default
    (8192, (60, 20), 40),
    (8192, (60, 40, 40, 60), 40),  # the tutorial's chain (made for multiplications)
    (4096, (60, 60), 40),  # insecure: 120 > 109 bits
    (2048, (40, 20), 20),  # insecure: 60 > 54 bits
]


def _errors(ctx: he.CkksContext, public: he.CkksContext, sites: int, n: int,
            bound: float, seed: int) -> dict:
    xs = np.random.default_rng(seed).uniform(-bound, bound, (sites, n))
    total = he.sum_all(public, [he.encrypt(ctx, x) for x in xs])
    got, want = he.decrypt(ctx, total, n), xs.sum(axis=0)
    return {"rel_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            "max_abs_err": float(np.abs(got - want).max()),
            "rel_max": float(np.abs(got - want).max() / np.abs(want).max())}


def measure(n_ring: int, chain: tuple[int, ...], scale: int, sites: int, values: int) -> dict:
    row: dict = {"poly_modulus_degree": n_ring, "coeff_mod_bit_sizes": list(chain),
                 "scale_bits": scale, "total_bits": sum(chain),
                 "max_bits_128": he.MAX_BITS_128[n_ring]}
    try:
        params = he.CkksParams(n_ring, chain, scale, workers=1)
    except FedskyError as e:
        return {**row, "rejected": str(e)}
    ctx = he.new_secret_context(params)
    public = he.load_context(he.public_context_bytes(ctx), workers=1)
    n = min(values, params.slots)
    x = np.random.default_rng(0).uniform(-10, 10, 32 * params.slots)
    t = time.perf_counter()
    blocks = he.encrypt(ctx, x)
    enc = time.perf_counter() - t
    t = time.perf_counter()
    he.decrypt(ctx, blocks, x.size)
    dec = time.perf_counter() - t
    return {**row, "slots": params.slots, "capacity": params.capacity,
            "holds_sites_x_10": params.capacity >= sites * 10,
            "encrypt_us_per_value": enc / x.size * 1e6,
            "decrypt_us_per_value": dec / x.size * 1e6,
            "bytes_per_value": sum(map(len, blocks)) / x.size,
            "vs_fp32": sum(map(len, blocks)) / x.size / 4,
            "public_context_bytes": len(he.public_context_bytes(ctx)),
            "secret_context_bytes": len(he.secret_context_bytes(ctx)),
            f"sum_of_{sites}_abs_le_10": _errors(ctx, public, sites, n, 10.0, 1),
            f"sum_of_{sites}_abs_le_1e-3": _errors(ctx, public, sites, n, 1e-3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--values", type=int, default=2048, help="values per site in the sum")
    args = ap.parse_args()
    rows = [measure(*c, args.sites, args.values) for c in CANDIDATES]
    print(json.dumps({"bench": "he_params", "sites": args.sites, "values": args.values,
                      "candidates": rows}, indent=2))


if __name__ == "__main__":
    main()
