"""What hiding the updates from the coordinator costs: plaintext vs masking vs CKKS vs hybrid.

Part 1 (`workload`): the quickstart job (WikiText-2, 3 clouds, in-process), a few rounds per
arm, all with the same seed: median round time (exchange + aggregation, no evaluation), bytes
up per site per round, and the final eval loss, each against the plaintext arm of the same run.
Part 2 (`big`): one round's secure-aggregation arithmetic for a random update of `--big`
float32 values from 3 sites, no training: the sites' fixed-point encoding and masking, the
coordinator's sum and unmasking, against the plaintext sum of the same vectors; and bytes.

    python bench/secure.py [--rounds 3] [--arms plain,mask32,mask8,he,hybrid] [--big 100e6]
                           [--out DIR [--reuse]]

Prints JSON, then markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsky import secagg
from fedsky.config import load_job
from fedsky.metrics import read_metrics
from fedsky.runner import run_federated
from fedsky.secure_site import exponent

REPO = Path(__file__).resolve().parents[1]
ARMS: dict[str, list[str]] = {
    "plain": [],
    "mask32": ["secure={bits=32}"],
    "mask16": ["secure={bits=16}"],
    "mask8": ["secure={bits=8}"],
    "he": ['secure={default="he", sensitive="he"}'],
    "hybrid": ['secure={default="plain", sensitive="he"}'],  # paper B
    "hybrid-mask": ['secure={default="plain", sensitive="mask"}'],
}


def run_arm(name: str, rounds: int, out: Path, extra: list[str],
            reuse: bool = False) -> dict[str, Any]:
    overrides = [f"rounds={rounds}", f'output_dir="{out / name}"',
                 *ARMS[name], *extra]
    job, job_dir = load_job(REPO / "examples" / "quickstart.toml", overrides)
    started = time.perf_counter()
    done = (out / name / "metrics.jsonl").is_file() and len(read_metrics(out / name)) == rounds
    if not (reuse and done):
        run_federated(job, job_dir, "inprocess")
    wall = time.perf_counter() - started
    recs = [r for r in read_metrics(out / name) if "eval_loss" in r]
    up = [statistics.mean(r["bytes_up"].values()) for r in recs]
    return {
        "round_s_median": statistics.median(r["round_s"] for r in recs),
        "bytes_up_per_site": statistics.median(up),
        "bytes_down_per_site": statistics.median(statistics.mean(r["bytes_down"].values())
                                                 for r in recs),
        "final_eval_loss": recs[-1]["eval_loss"],
        "wall_s": wall,
    }


def big_round(n: int, sites: int = 3, bits: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Secure-aggregation arithmetic for `sites` random updates of n fp32 values."""
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1e-3, n).astype(np.float32) for _ in range(sites)]
    names = [chr(ord("a") + i) for i in range(sites)]
    keys = {s: secagg.KeyPair.new() for s in names}
    pubs = {s: k.public for s, k in keys.items()}
    seeds = {s: bytes([i]) * 32 for i, s in enumerate(names)}
    levels = secagg.levels_for(bits, sites)
    clip = 2.0 ** exponent(max(float(np.abs(u).max()) for u in updates))  # the shared range

    def plain() -> np.ndarray:
        total = np.zeros(n, dtype=np.float64)
        for u in updates:
            total += u
        return total

    def masked() -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        vectors = {s: secagg.mask(secagg.encode_fixed(u, clip, levels, bits, rng), s, keys[s],
                                  pubs, seeds[s], bits, "bench")
                   for s, u in zip(names, updates, strict=True)}
        site_s = (time.perf_counter() - t0) / sites  # each site masks its own, in parallel
        total = np.zeros(n, dtype=secagg.DTYPES[bits])
        for v in vectors.values():
            total += v
        out = secagg.unmask(total, list(seeds.values()), {}, pubs, bits, "bench")
        return secagg.decode_fixed(out, clip, levels, bits), site_s

    plain_s, mask_s, site_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reference = plain()
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result, per_site = masked()
        mask_s.append(time.perf_counter() - t0)
        site_s.append(per_site)
    err = float(np.abs(result - reference).max())
    return {
        "values": n, "sites": sites, "bits": bits,
        "plain_sum_s_median": statistics.median(plain_s),
        "masked_total_s_median": statistics.median(mask_s),
        "masked_site_s_median": statistics.median(site_s),
        "masked_coordinator_s_median": statistics.median(m - s * sites for m, s in
                                                         zip(mask_s, site_s, strict=True)),
        "bytes_ratio_vs_fp32": bits / 32,
        "max_abs_error": err,
        "error_bound": sites * clip / levels,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="plain,mask32,mask16,mask8,he,hybrid,hybrid-mask")
    ap.add_argument("--big", type=float, default=100e6, help="values in part 2 (0: skip)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="re-read arms already run in --out")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsky-secure-"))
    result: dict[str, Any] = {"rounds": args.rounds, "workload": {}}
    for arm in args.arms.split(","):
        if arm:
            result["workload"][arm] = run_arm(arm, args.rounds, out, args.overrides,
                                              args.reuse)
    base = result["workload"].get("plain")
    if base:
        for r in result["workload"].values():
            r["round_time_vs_plain"] = r["round_s_median"] / base["round_s_median"]
            r["bytes_up_vs_plain"] = r["bytes_up_per_site"] / base["bytes_up_per_site"]
    if args.big:
        result["big"] = [big_round(int(args.big), bits=b) for b in (32, 8)]
        for r in result["big"]:
            r["time_vs_plain_sum"] = r["masked_total_s_median"] / r["plain_sum_s_median"]
    print(json.dumps(result, indent=2))
    print("\n| arm | round s (median) | x plain | bytes up / site / round | x plain "
          "| final eval loss |")
    print("|---|---|---|---|---|---|")
    for arm, r in result["workload"].items():
        print(f"| {arm} | {r['round_s_median']:.2f} | {r.get('round_time_vs_plain', 1):.2f} | "
              f"{r['bytes_up_per_site'] / 1e6:.2f} MB | {r.get('bytes_up_vs_plain', 1):.2f} | "
              f"{r['final_eval_loss']:.4f} |")
    for r in result.get("big", []):
        print(f"\n{r['values'] / 1e6:.0f}M values, {r['sites']} sites, {r['bits']}-bit: masked "
              f"round {r['masked_total_s_median']:.2f} s ({r['masked_site_s_median']:.2f} s per "
              f"site) vs plaintext sum {r['plain_sum_s_median']:.2f} s; bytes "
              f"{r['bytes_ratio_vs_fp32']:.2f}x fp32; max error {r['max_abs_error']:.2e} "
              f"(bound {r['error_bound']:.2e})")


if __name__ == "__main__":
    main()
