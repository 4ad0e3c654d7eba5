"""Framework overhead of a federated round over gRPC, with every site its own process.

Runs the quickstart job with `--transport grpc` on loopback and reads its metrics: per round,
`round_s` (send the global tensors, sites train, gather, decode, aggregate; evaluation is
excluded) against the slowest site's compute seconds in that round, measured in the same run.
The difference is what fedsky adds: serialization, transport, model loading at the sites,
aggregation. Prints JSON.

    python bench/overhead.py [--job examples/quickstart.toml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="examples/quickstart.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedsky-overhead-"))
    # One thread per site process: three sites share this machine's cores.
    sets = [f'output_dir="{out}"', "training.threads=1", *args.overrides]
    cmd = [sys.executable, "-m", "fedsky", "run", args.job, "--transport", "grpc"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rounds = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("skipped"):
            continue
        slowest = max(s["compute_s"] for s in rec["sites"].values())
        rounds.append({
            "round": rec["round"],
            "round_s": rec["round_s"],
            "slowest_site_compute_s": slowest,
            "overhead_s": rec["round_s"] - slowest,
            "overhead_fraction": (rec["round_s"] - slowest) / rec["round_s"],
            "bytes": sum(rec["bytes_up"].values()) + sum(rec["bytes_down"].values()),
        })
    print(json.dumps({
        "bench": "overhead",
        "job": args.job,
        "overrides": sets[1:],
        "rounds": rounds,
        "median_round_s": statistics.median(r["round_s"] for r in rounds),
        "median_slowest_site_compute_s": statistics.median(
            r["slowest_site_compute_s"] for r in rounds),
        "median_overhead_s": statistics.median(r["overhead_s"] for r in rounds),
        "median_overhead_fraction": statistics.median(r["overhead_fraction"] for r in rounds),
        "target_overhead_fraction": 0.10,
        "output_dir": str(out),
    }, indent=2))


if __name__ == "__main__":
    main()
