"""CKKS throughput and size: fedsky's block-parallel path against a naive TenSEAL loop.

Both encrypt the same random updates shaped like the quickstart GPT-2's trainable tensors (one
update per site), the coordinator sums them without the key, a site decrypts the sum; repeats
alternate the two paths so that other load on the machine hits both alike.

  ours   `fedsky.he`: N=4096, one 60-bit data prime, symmetric encryption, the whole update cut
         into 2048-value blocks, blocks spread over `--workers` processes (0: one per core).
  naive  what a tutorial does: ts.context(CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60]),
         global_scale 2**40, one ts.ckks_vector per tensor from tensor.flatten().tolist(),
         serially, public-key encryption (TenSEAL's defaults).

Throughput is values per second (for the sum: the values of all sites' updates); bytes are the
serialized ciphertexts that would cross the wire, per value and against fp32. `--large N` adds a
random N-value update cut into 1M-value tensors (a slice of a ~100M-parameter model; the 100M
seconds it prints are extrapolated linearly from it). `design` holds the measurements behind the
choices in `fedsky.he` (threads vs TenSEAL's n_threads vs processes; symmetric vs public-key
encryption), each as wall-clock values/s and CPU microseconds per value summed over processes,
and how much of a second core was free during the run (`free_cores`: 2 = idle, 1 = none).
Prints JSON.

    python bench/he_throughput.py [--job examples/quickstart.toml] [--sites 3] [--repeats 3]
                                  [--workers 0] [--large 0]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import psutil
import tenseal as ts

from fedsky import he

Update = dict[str, np.ndarray]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """TenSEAL prints warnings on fd 1: send them to stderr, keep stdout for the JSON."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def model_updates(job: str, sites: int) -> list[Update]:
    # Imported here: spawned HE workers re-import this script, and need neither torch nor
    # transformers.
    import torch

    from fedsky.config import load_job
    from fedsky.model import build_model, trainable_state

    torch.set_num_threads(1)
    cfg, _ = load_job(job)
    model = build_model(cfg.model, cfg.tokenizer.vocab_size, cfg.seed)
    shapes = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    rng = np.random.default_rng(0)
    # Model-delta sized values: CKKS error is absolute, so small values are the hard case.
    return [{k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(sites)]


def large_updates(n: int, sites: int, tensor: int = 1 << 20) -> list[Update]:
    rng = np.random.default_rng(1)
    sizes = [min(tensor, n - i) for i in range(0, n, tensor)]
    return [{f"t{i}": rng.normal(0, 1e-3, s).astype(np.float32) for i, s in enumerate(sizes)}
            for _ in range(sites)]


# ---- the two paths: encrypt every site's update, sum, decrypt the sum ------------------------

def run_ours(ctx: he.CkksContext, coord: he.CkksContext, updates: list[Update]) -> dict:
    flats = [np.concatenate([u[k].reshape(-1) for k in sorted(u)]) for u in updates]
    n = flats[0].size
    t_enc, blocks = timed(lambda: [he.encrypt(ctx, f) for f in flats])
    t_sum, total = timed(lambda: he.sum_all(coord, blocks, length=n))
    t_dec, got = timed(lambda: he.decrypt(ctx, total, n))
    return _row(t_enc, t_sum, t_dec, n, blocks, got, np.sum(flats, axis=0, dtype=np.float64))


def naive_context() -> tuple[ts.Context, ts.Context]:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    return ctx, ts.context_from(ctx.serialize(save_secret_key=False))


def run_naive(ctx: ts.Context, public: ts.Context, updates: list[Update]) -> dict:
    names = sorted(updates[0])
    n = sum(updates[0][k].size for k in names)

    def encrypt() -> list[list[bytes]]:
        return [[ts.ckks_vector(ctx, u[k].flatten().tolist()).serialize() for k in names]
                for u in updates]

    def add(per_site: list[list[bytes]]) -> list[bytes]:
        out = []
        for i in range(len(names)):
            acc = ts.ckks_vector_from(public, per_site[0][i])
            for site in per_site[1:]:
                acc += ts.ckks_vector_from(public, site[i])
            out.append(acc.serialize())
        return out

    def decrypt(total: list[bytes]) -> np.ndarray:
        return np.concatenate([np.array(ts.ckks_vector_from(ctx, b).decrypt()) for b in total])

    t_enc, blocks = timed(encrypt)
    t_sum, total = timed(lambda: add(blocks))
    t_dec, got = timed(lambda: decrypt(total))
    want = np.sum([np.concatenate([u[k].reshape(-1) for k in names]) for u in updates],
                  axis=0, dtype=np.float64)
    return _row(t_enc, t_sum, t_dec, n, blocks, got, want)


def _row(t_enc: float, t_sum: float, t_dec: float, n: int, blocks: list[list[bytes]],
         got: np.ndarray, want: np.ndarray) -> dict:
    sites = len(blocks)
    up = sum(len(b) for b in blocks[0])
    return {"encrypt_values_per_s": sites * n / t_enc, "sum_values_per_s": sites * n / t_sum,
            "decrypt_values_per_s": n / t_dec, "bytes_per_value": up / n,
            "vs_fp32_bytes": up / (4 * n), "serialized_objects_per_site": len(blocks[0]),
            "rel_l2_error": float(np.linalg.norm(got - want) / np.linalg.norm(want))}


def compare(updates: list[Update], repeats: int, workers: int) -> dict:
    ctx = he.new_secret_context(he.CkksParams(workers=workers))
    coord = he.load_context(he.public_context_bytes(ctx), workers=workers)
    # Worker processes start once per process and key set; not part of a round's cost.
    t_start, _ = timed(lambda: run_ours(ctx, coord, _warm_updates(len(updates))))
    n_ctx, n_pub = naive_context()
    ours, naive = [], []
    for _ in range(repeats):
        ours.append(run_ours(ctx, coord, updates))
        naive.append(run_naive(n_ctx, n_pub, updates))
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
           for name, rows in (("ours", ours), ("naive", naive))}
    ratio = {k.replace("_values_per_s", ""): med["ours"][k] / med["naive"][k]
             for k in med["ours"] if k.endswith("_per_s")}
    ratio["bytes"] = med["ours"]["bytes_per_value"] / med["naive"]["bytes_per_value"]
    return {"values_per_site": sum(v.size for v in updates[0].values()),
            "tensors": len(updates[0]), "sites": len(updates), "repeats": repeats,
            "workers": he.resolve_workers(workers), "pool_start_s": t_start,
            "median": med, "ours_over_naive": ratio, "runs": {"ours": ours, "naive": naive}}


def _warm_updates(sites: int) -> list[Update]:
    return [{"w": np.ones(4 * 2048 * 4, np.float32)} for _ in range(sites)]


# ---- design checks: what runs in parallel, symmetric vs public-key ---------------------------

def _burn(n: int) -> float:
    t, x = time.perf_counter(), b"x"
    for _ in range(n):
        x = hashlib.sha256(x).digest()
    return time.perf_counter() - t


def free_cores() -> float:
    """Speed-up of two processes over one on a pure CPU task now: ~2 when a second core is free."""
    n = 200_000
    serial, _ = timed(lambda: (_burn(n), _burn(n)))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(abs, [1, 2]))
        both, _ = timed(lambda: list(pool.map(_burn, [n, n])))
    return serial / both


def cpu_seconds() -> float:
    """CPU time of this process and of the HE worker processes it started."""
    pids = [os.getpid()] + [pid for _, pool in he._POOLS.values() for pid in pool._processes]
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def design_checks(blocks: int = 256) -> dict:
    """Encryption speed of each way to use two cores; wall time depends on what else runs on
    the machine, CPU time (all processes) does not: with a free core, wall = CPU / 2."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, blocks * 2048)
    rows = [x[i:i + 2048] for i in range(0, x.size, 2048)]
    out: dict[str, float] = {"free_cores_before": free_cores()}

    def ctx_of(kind: ts.ENCRYPTION_TYPE, threads: int) -> ts.Context:
        c = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 20],
                       encryption_type=kind, n_threads=threads)
        c.global_scale = 2**40
        return c

    sym = ctx_of(ts.ENCRYPTION_TYPE.SYMMETRIC, 1)
    pk = ctx_of(ts.ENCRYPTION_TYPE.ASYMMETRIC, 1)

    def vectors(c: ts.Context) -> list[bytes]:
        return [ts.ckks_vector(c, r).serialize() for r in rows]

    def threads() -> list[bytes]:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda r: ts.ckks_vector(sym, r).serialize(), rows))

    two = ctx_of(ts.ENCRYPTION_TYPE.SYMMETRIC, 2)
    columns = ts.plain_tensor(np.stack(rows, axis=1))

    def tenseal_threads() -> bytes:  # TenSEAL's own pool: a batched CKKSTensor, one column/block
        return ts.ckks_tensor(two, columns, batch=True).serialize()

    ours = he.new_secret_context(he.CkksParams(workers=2))
    he.encrypt(ours, x[:8 * 2048])  # start the pool
    cases = {"serial_symmetric": lambda: vectors(sym), "serial_public_key": lambda: vectors(pk),
             "threads_2": threads, "tenseal_n_threads_2": tenseal_threads,
             "ours_processes_2": lambda: he.encrypt(ours, x)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):
        for k, fn in cases.items():
            c = cpu_seconds()
            times[k].append(timed(fn)[0])
            cpu[k].append(cpu_seconds() - c)
    for k in cases:
        out[f"encrypt_{k}_values_per_s"] = x.size / statistics.median(times[k])
        out[f"encrypt_{k}_cpu_us_per_value"] = statistics.median(cpu[k]) / x.size * 1e6
    out["free_cores_after"] = free_cores()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="examples/quickstart.toml")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="0: one process per core")
    ap.add_argument("--large", type=int, default=0, help="also a random update of N values")
    ap.add_argument("--no-design", action="store_true", help="skip the design checks")
    ap.add_argument("--design-only", action="store_true", help="only the design checks")
    args = ap.parse_args()
    with stdout_to_stderr():
        result: dict[str, Any] = {"bench": "he_throughput", "job": args.job,
                                  "cores": he.resolve_workers(0)}
        if not args.no_design:
            result["design"] = design_checks()
        if not args.design_only:
            result["model"] = compare(model_updates(args.job, args.sites), args.repeats,
                                      args.workers)
        if args.large and not args.design_only:
            big = compare(large_updates(args.large, args.sites), max(1, args.repeats // 2),
                          args.workers)
            med = big["median"]
            # Seconds for a 100M-value update: one site encrypts, the coordinator sums all
            # sites, one site decrypts.
            big["extrapolated_100M_s"] = {
                path: {"encrypt_one_site": 1e8 / med[path]["encrypt_values_per_s"],
                       f"sum_{args.sites}_sites": args.sites * 1e8 / med[path]["sum_values_per_s"],
                       "decrypt": 1e8 / med[path]["decrypt_values_per_s"]}
                for path in med}
            result["large"] = big
        he.shutdown_pools()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
