"""Paper A's comparison on our hardware: FedAvg vs dynamic weighting vs gradient aggregation.

Runs every arm (a job file each, all extending base.toml) plus centralized training on the
pooled data with the same optimizer steps, then writes `results.md` (a markdown table) and
`results.png` (eval loss against rounds and against bytes) beside this file.

    python experiments/paper_a/run.py [--out runs/paper_a] [--target-ppl 300] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# (label, job file, centralized?)
ARMS = [
    ("fedavg", "fedavg.toml", False),
    ("dynamic (paper-B rule)", "dynamic_paper_b.toml", False),
    ("dynamic (loss-based)", "dynamic_loss.toml", False),
    ("fedopt-sgd-nesterov (DiLoCo: lr 0.7, momentum 0.9)", "diloco.toml", False),
    ("fedopt-sgd-nesterov (lr 1.0, momentum 0.5)", "diloco_short.toml", False),
    ("fedopt-adam", "fedadam.toml", False),
    ("fedavg, sites keep their optimizer", "fedavg_keep.toml", False),
    ("fedopt-sgd lr 1.3, sites keep their optimizer", "fedopt_keep.toml", False),
    ("centralized (ceiling)", "base.toml", True),
]


def run_arm(job: str, out: Path, centralized: bool, overrides: list[str], reuse: bool) -> float:
    """Run one arm; returns its wall seconds. With `reuse`, a finished arm is not run again."""
    if reuse and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())["elapsed_s"]
    cmd = [sys.executable, "-m", "fedsky", "run", str(HERE / job),
           "--set", f'output_dir="{out}"', *sum((["--set", s] for s in overrides), [])]
    if centralized:
        cmd.append("--centralized")
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def arm_row(label: str, out: Path, wall_s: float, target_ppl: float) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if not r.get("skipped")]
    hit = next((r["round"] + 1 for r in done if r["perplexity"] <= target_ppl), None)
    final = done[-1]
    return {
        "arm": label,
        "eval_loss": final["eval_loss"],
        "perplexity": final["perplexity"],
        "accuracy": final["accuracy"],
        "rounds_to_target": hit,
        "bytes": sum(sum(r["bytes_up"].values()) + sum(r["bytes_down"].values()) for r in done),
        "wall_s": wall_s,
        "curve": [(r["round"] + 1, r["eval_loss"],
                   sum(sum(q["bytes_up"].values()) + sum(q["bytes_down"].values())
                       for q in done if q["round"] <= r["round"])) for r in done],
    }


def table(rows: list[dict], target_ppl: float) -> str:
    ceiling = next(r["eval_loss"] for r in rows if r["arm"].startswith("centralized"))
    lines = [
        f"| arm | final eval loss | vs centralized | perplexity | next-token acc | "
        f"rounds to ppl {target_ppl:g} | bytes moved | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = (r["eval_loss"] - ceiling) / ceiling
        lines.append(
            f"| {r['arm']} | {r['eval_loss']:.4f} | {gap:+.1%} | {r['perplexity']:.1f} | "
            f"{r['accuracy']:.3f} | {r['rounds_to_target'] or 'not reached'} | "
            f"{r['bytes'] / 1e6:.0f} MB | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        rounds, losses, sent = zip(*r["curve"], strict=True)
        by_round.plot(rounds, losses, marker=".", label=r["arm"])
        if not r["arm"].startswith("centralized"):
            by_bytes.plot([b / 1e6 for b in sent], losses, marker=".", label=r["arm"])
    by_round.set(title="Eval loss by round", xlabel="round", ylabel="eval loss (nats/token)")
    by_bytes.set(title="Eval loss by bytes moved", xlabel="bytes moved, up + down (MB, log)",
                 ylabel="eval loss (nats/token)", xscale="log")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Paper A on WikiText-2: 3 non-IID clouds, equal optimizer steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "paper_a"))
    ap.add_argument("--target-ppl", type=float, default=300.0)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--results", default=str(HERE), help="where results.md/png go")
    ap.add_argument("--reuse", action="store_true",
                    help="keep arms that already finished in --out (resume an interrupted run)")
    args = ap.parse_args()
    shared = REPO.parent / "shared" / "data"
    if "FEDSKY_DATA" not in os.environ and shared.is_dir():
        os.environ["FEDSKY_DATA"] = str(shared)
    rows = []
    for i, (label, job, centralized) in enumerate(ARMS, 1):
        out = Path(args.out) / Path(job).stem / ("centralized" if centralized else "")
        print(f"[{i}/{len(ARMS)}] {label} ...", file=sys.stderr, flush=True)
        wall = run_arm(job, out, centralized, args.overrides, args.reuse)
        rows.append(arm_row(label, out, wall, args.target_ppl))
        print(f"      eval loss {rows[-1]['eval_loss']:.4f} in {wall:.0f} s",
              file=sys.stderr, flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = table(rows, args.target_ppl)
    (results / "results.md").write_text(text + "\n")
    plot(rows, results / "results.png")
    print(text)
    print(f"\nwrote {results / 'results.md'} and {results / 'results.png'}")


if __name__ == "__main__":
    main()
