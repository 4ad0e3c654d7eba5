"""The utility cost of record-level DP: final eval loss at epsilon 1, 4, 8 and infinity.

Runs the reference workload (examples/quickstart.toml: three clouds, GPT-2 2x128, WikiText-2)
once per epsilon with the same token budget: every arm has the same rounds, local steps and
Poisson batches of `training.batch_size` expected sequences. A finite epsilon adds DP-SGD at
every site (per-sequence clipping to norm 1; each site plans its noise multiplier for the
target at delta 1e-5 with the PLD accountant over all its steps); infinity trains without DP.
Noise is seeded (`secure_mode = false`) so that the table reproduces; its distribution is the
same as in secure mode. Prints JSON, then a markdown table.

    python bench/dp_utility.py [--rounds 10] [--eps 1 4 8 inf] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def arm_overrides(eps: float) -> list[str]:
    if math.isinf(eps):
        return []
    dp_sgd = f'target_epsilon={eps}, delta={DELTA}, max_grad_norm=1.0, accountant="pld"'
    return [f"privacy={{secure_mode=false, dp_sgd={{{dp_sgd}}}}}"]


def run_arm(job: str, eps: float, common: list[str], out: Path) -> dict:
    sets = [f'output_dir="{out}"', *common, *arm_overrides(eps)]
    cmd = [sys.executable, "-m", "fedsky", "run", job, "--no-report"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_arm(eps, out)


def read_arm(eps: float, out: Path) -> dict:
    """One arm's numbers from its output folder."""
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    by_site = summary.get("epsilon_by_site", {})
    return {
        "target_epsilon": eps if math.isfinite(eps) else "inf",
        "final_eval_loss": summary["final_eval_loss"],
        "final_perplexity": summary["final_perplexity"],
        "final_accuracy": summary["final_accuracy"],
        "rounds_completed": summary["rounds_completed"],
        # Poisson batches: equal in expectation across arms, not to the token
        "tokens_trained": sum(i["tokens"] for r in records for i in r["sites"].values()),
        "epsilon_pld": max((e["epsilon_pld"] for e in by_site.values()), default=None),
        "epsilon_rdp": max((e["epsilon_rdp"] for e in by_site.values()), default=None),
        "noise_multiplier": {s: i.get("noise_multiplier") for s, i in last["sites"].items()},
        "elapsed_s": summary["elapsed_s"],
        "output_dir": str(out),
    }


def table(arms: list[dict]) -> str:
    lines = [("| target epsilon | epsilon reached (PLD / RDP, worst site) | noise multiplier "
              "(per site) | tokens trained | final eval loss | perplexity | accuracy |"),
             "|---|---|---|---|---|---|---|"]
    for a in arms:
        if a["epsilon_pld"] is None:
            target, reached, z = "inf (no DP)", "-", "-"
        else:
            target = f"{a['target_epsilon']:g}"
            reached = f"{a['epsilon_pld']:.2f} / {a['epsilon_rdp']:.2f}"
            z = ", ".join(f"{v:.3f}" for v in a["noise_multiplier"].values())
        lines.append(f"| {target} | {reached} | {z} | {a['tokens_trained']:,} "
                     f"| {a['final_eval_loss']:.3f} "
                     f"| {a['final_perplexity']:.0f} | {a['final_accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default=str(REPO / "examples" / "quickstart.toml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 4.0, 8.0, math.inf])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    shared = REPO.parent / "shared" / "data"
    if "FEDSKY_DATA" not in os.environ and shared.is_dir():
        os.environ["FEDSKY_DATA"] = str(shared)
    root = Path(tempfile.mkdtemp(prefix="fedsky-dp-utility-"))
    # The same token budget in every arm: same rounds and steps, Poisson batches everywhere.
    common = [f"rounds={args.rounds}", 'training.sampling="poisson"', "training.threads=1",
              *args.overrides]
    arms = [run_arm(args.job, eps, common, root / f"eps-{eps:g}") for eps in args.eps]
    print(json.dumps({"bench": "dp_utility", "job": args.job, "delta": DELTA,
                      "overrides": common, "arms": arms}, indent=2))
    print()
    print(table(arms))


if __name__ == "__main__":
    main()
