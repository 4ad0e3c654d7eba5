"""Communication against quality: fp32 per-step sync, fp32 FedAvg and compressed pipelines.

Runs the quickstart job (WikiText-2, 3 non-IID sites, in-process) once per arm, all arms with
the same token budget (rounds x local steps x sites x batch x sequence), and reads each run's
metrics: total bytes on the wire (up + down, exact payload sizes) until the eval loss first
reaches a fixed target, the final eval loss, the compression ratio and the egress-cost
estimate. Prints JSON, then a markdown table.

    python bench/compression.py [--rounds 30] [--local-steps 10] [--target LOSS]
                                [--arms fp32-h1,fp32,q2] [--set key=value ...]

Without `--target`, the target is the uncompressed FedAvg arm's final loss plus 1%: "bytes
until within 1% of uncompressed quality". An arm that never reaches it reports null; against
such a baseline, "x fewer bytes" is a lower bound (">"), computed from all the bytes it sent.
`--reuse --out DIR` re-reads finished arms instead of running them again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedsky.config import load_job
from fedsky.metrics import read_metrics
from fedsky.runner import run_federated

REPO = Path(__file__).resolve().parents[1]


def topk(density: float, bits: int) -> str:
    return (f'[{{name="topk", density={density}}}, {{name="quantize", bits={bits}}}, '
            '{name="zstd"}]')


def codec(uplink: str, downlink: str) -> list[str]:
    return [f"codec.uplink={uplink}", f"codec.downlink={downlink}"]


def quant(bits: int, chunk: int = 4096, stochastic: bool = True) -> str:
    rounding = str(stochastic).lower()
    return (f'[{{name="quantize", bits={bits}, chunk={chunk}, stochastic={rounding}}}, '
            '{name="zstd"}]')


LOWRANK = '[{name="lowrank", rank=%d}, {name="quantize", bits=8}, {name="zstd"}]'
# name -> (local steps: "1" per-step sync or "H", overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "fp32-h1": ("1", []),
    "fp32": ("H", []),
    "fp16": ("H", codec('[{name="cast"}]', '[{name="cast"}]')),
    "q8": ("H", codec(quant(8), quant(8))),
    "q4": ("H", codec(quant(4), quant(4))),
    "q2": ("H", codec(quant(2), quant(2))),
    # 2 bits rounded to nearest (error feedback on the uplink and the downlink's tracking of
    # what sites hold absorb the bias), with a scale per 256 values
    "q2n": ("H", codec(quant(2, 256, False), quant(2, 256, False))),
    "q2n-up-q4-down": ("H", codec(quant(2, 256, False), quant(4))),
    "topk1-q4": ("H", codec(topk(0.01, 4), topk(0.03, 8))),
    "topk3-q4": ("H", codec(topk(0.03, 4), topk(0.06, 8))),
    "lowrank4": ("H", codec(LOWRANK % 4, quant(4))),
}
DEFAULT_ARMS = "fp32,q4,q2n,q2n-up-q4-down,topk3-q4,fp32-h1"


def run_arm(name: str, rounds: int, local_steps: int, out: Path, extra: list[str],
            reuse: bool = False) -> list[dict[str, Any]]:
    """The arm's round records followed by its summary (read back with `reuse`)."""
    done = out / name / "summary.json"
    if reuse and done.is_file():
        return read_metrics(out / name) + [json.loads(done.read_text())]
    steps, overrides = ARMS[name]
    h = local_steps if steps == "H" else 1
    sets = [f"rounds={rounds * local_steps // h}", f"training.local_steps={h}",
            f'output_dir="{out / name}"', f'name="{name}"', *overrides, *extra]
    job, job_dir = load_job(REPO / "examples" / "quickstart.toml", sets)
    summary = run_federated(job, job_dir, "inprocess")
    return read_metrics(Path(summary["output_dir"])) + [summary]


def bytes_to_target(records: list[dict[str, Any]], target: float) -> int | None:
    moved = 0
    for rec in records:
        moved += sum(rec["bytes_up"].values()) + sum(rec["bytes_down"].values())
        if not rec.get("skipped") and rec["eval_loss"] <= target:
            return moved
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="rounds of the H-step arms")
    ap.add_argument("--local-steps", type=int, default=10, help="H")
    ap.add_argument("--target", type=float, help="eval loss; default: fp32 arm's final + 1%%")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated of {list(ARMS)}")
    ap.add_argument("--out", help="run folders go here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="read arms that already finished in --out instead of running them")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    os.environ.setdefault("FEDSKY_DATA", str(REPO.parent / "shared" / "data"))
    out = Path(args.out or tempfile.mkdtemp(prefix="fedsky-compression-"))
    names = args.arms.split(",")
    runs = {n: run_arm(n, args.rounds, args.local_steps, out, args.overrides, args.reuse)
            for n in names}
    summaries = {n: recs.pop() for n, recs in runs.items()}
    target = args.target
    if target is None:
        target = 1.01 * summaries["fp32"]["final_eval_loss"]
    results = []
    for n in names:
        s, recs = summaries[n], runs[n]
        results.append({
            "arm": n,
            "local_steps": args.local_steps if ARMS[n][0] == "H" else 1,
            "rounds": s["rounds_completed"],
            "bytes_to_target": bytes_to_target(recs, target),
            "bytes_total": s["bytes_total"],
            "bytes_up": s["bytes_up"],
            "bytes_down": s["bytes_down"],
            "compression_ratio_up": s.get("compression_ratio"),
            "compression_ratio_down": s.get("compression_ratio_down"),
            "final_eval_loss": s["final_eval_loss"],
            "cost_usd": s.get("cost_usd"),
            "wall_s": s["wall_s"],
        })
    ref = {r["arm"]: r for r in results}
    for r in results:
        for base in ("fp32-h1", "fp32"):
            b = ref.get(base)
            if b and r["bytes_to_target"]:
                # A baseline that never reached the target needed more than all it sent.
                fewer = (b["bytes_to_target"] or b["bytes_total"]) / r["bytes_to_target"]
                r[f"fewer_bytes_to_target_than_{base}"] = fewer
                r[f"fewer_is_lower_bound_{base}"] = b["bytes_to_target"] is None
        if "fp32" in ref:
            r["loss_vs_fp32"] = r["final_eval_loss"] / ref["fp32"]["final_eval_loss"] - 1
    print(json.dumps({"bench": "compression", "target_eval_loss": target, "out": str(out),
                      "overrides": args.overrides, "results": results}, indent=2))
    print(table(results, target))


def table(results: list[dict[str, Any]], target: float) -> str:
    def mb(n: int | None) -> str:
        return "not reached" if n is None else f"{n / 1e6:,.2f} MB"

    def x(r: dict[str, Any], base: str) -> str:
        v = r.get(f"fewer_bytes_to_target_than_{base}")
        if v is None or r["arm"] == base:
            return "-"
        return (">" if r[f"fewer_is_lower_bound_{base}"] else "") + f"{v:,.0f}x"

    lines = [f"bytes to target = up + down until eval loss <= {target:.4f}", "",
             ("| arm | H | rounds | bytes to target | vs per-step fp32 | vs fp32 FedAvg | "
              "total bytes | ratio up / down | final eval loss | vs fp32 | egress cost |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratios = (f"{r['compression_ratio_up']:.0f}x / {r['compression_ratio_down']:.0f}x"
                  if r["compression_ratio_up"] else "-")
        lines.append(
            f"| {r['arm']} | {r['local_steps']} | {r['rounds']} | {mb(r['bytes_to_target'])} | "
            f"{x(r, 'fp32-h1')} | {x(r, 'fp32')} | {mb(r['bytes_total'])} | {ratios} | "
            f"{r['final_eval_loss']:.4f} | {100 * r.get('loss_vs_fp32', 0):+.2f}% | "
            f"${r['cost_usd']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
