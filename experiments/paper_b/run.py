"""Paper B's comparison on our hardware: data leakage, communication and computation of
Centralized, FL, HE-FL, DP-FL and fedsky's recommended configuration on clinical notes.

Splits MTSamples (../shared/data/mtsamples) across three hospital-clouds by specialty, runs
every arm (a job file each, all extending base.toml) with the audit trace on, attacks each run
with `fedsky.audit`, and writes `results.md` (the table) and three plots (`leakage.png`,
`communication.png`, `computation.png`) beside this file.

    python experiments/paper_b/run.py [--out runs/paper_b] [--set k=v ...] [--reuse]

Compute seconds: a site's are the wall time of its task handlers (training, encoding,
masking, encryption, DP accounting, serialization); `training` is the part its training loop reports;
the coordinator's are its round time (exchange, decode, add, unmask, aggregate; evaluation
excluded) minus the time spent inside the sites' handlers. The in-process transport runs the
sites one after another in this process, so the split is exact up to timer resolution.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# (label, job file, centralized?)
ARMS = [
    ("Centralized", "centralized.toml", True),
    ("FL (FedAvg, plaintext)", "fl.toml", False),
    ("HE-FL (CKKS, everything)", "he_fl.toml", False),
    ("DP-FL (DP-SGD, eps 8)", "dp_fl.toml", False),
    ("fedsky (embedding CKKS, rest masked 16-bit, DP-SGD eps 8)", "fedsky.toml", False),
    ("fedsky, all masked 16-bit, DP-SGD eps 8", "fedsky_masked.toml", False),
]
# Hospital -> the specialties (MTSamples column 2) whose notes it holds.
HOSPITALS = {
    "hospital-surgery": ("Surgery",),
    "hospital-urology": ("Urology",),
    "hospital-general": None,  # every other specialty
}
EVAL_FRACTION = 0.1


def split_notes(source: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """Per-hospital CSVs (by specialty), the pooled training CSV and a held-out eval CSV with
    EVAL_FRACTION of every hospital's notes (stratified, seeded)."""
    import numpy as np

    rows = [r for r in csv.reader(source.open(newline="")) if r]
    named = {s for spec in HOSPITALS.values() if spec for s in spec}
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: dict[str, Path] = {}
    train_all, eval_all = [], []
    for site, spec in HOSPITALS.items():
        mine = [r for r in rows if (r[2].strip() in spec if spec else r[2].strip() not in named)]
        order = rng.permutation(len(mine))
        held = max(1, round(EVAL_FRACTION * len(mine)))
        eval_all += [mine[i] for i in order[:held]]
        train = [mine[i] for i in sorted(order[held:])]
        train_all += train
        paths[site] = _write_csv(out / f"{site}.csv", train)
    paths["train"] = _write_csv(out / "train.csv", train_all)
    paths["eval"] = _write_csv(out / "eval.csv", eval_all)
    return paths


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def timed_factory(spent: dict[str, float]) -> Any:
    """The usual in-process sites, each task's wall time added to `spent[site]`."""
    from fedsky.site import site_factory

    inner = site_factory()

    def factory(name: str, setup: bytes) -> Any:
        handler = inner(name, setup)
        spent.setdefault(name, 0.0)

        def timed(task: bytes) -> bytes:
            t0 = time.perf_counter()
            try:
                return handler(task)
            finally:
                spent[name] += time.perf_counter() - t0

        return timed

    return factory


def run_arm(job_file: str, out: Path, centralized: bool, overrides: list[str],
            reuse: bool) -> dict[str, Any]:
    """Run one arm and audit it; returns what the table needs (also saved as arm.json)."""
    if reuse and (out / "arm.json").is_file():
        return json.loads((out / "arm.json").read_text())
    from fedsky.audit import audit_run
    from fedsky.config import load_job
    from fedsky.runner import run_centralized, run_federated

    job, job_dir = load_job(HERE / job_file, [*overrides, f'output_dir="{out}"'])
    spent: dict[str, float] = {}
    started = time.perf_counter()
    if centralized:
        summary = run_centralized(job, job_dir)
    else:
        summary = run_federated(job, job_dir, "inprocess", factory=timed_factory(spent))
    wall = time.perf_counter() - started
    t_audit = time.perf_counter()
    audit = audit_run(out)
    audit_s = time.perf_counter() - t_audit
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if not r.get("skipped")]
    training = {}
    for r in done:
        for site, s in r.get("sites", {}).items():
            training[site] = training.get(site, 0.0) + float(s["compute_s"])
    rounds_s = sum(float(r["round_s"]) for r in done)
    sites_s = sum(spent.values())
    arm = {
        "job": job_file, "wall_s": wall, "audit_s": audit_s,
        "rounds": len(done), "eval_loss": summary["final_eval_loss"],
        "perplexity": summary["final_perplexity"], "accuracy": summary["final_accuracy"],
        "bytes_up": sum(sum(r["bytes_up"].values()) for r in done),
        "bytes_down": sum(sum(r["bytes_down"].values()) for r in done),
        "site_training_s": training,
        "site_total_s": spent if not centralized else training,
        "coordinator_s": max(0.0, rounds_s - sites_s) if not centralized else 0.0,
        "epsilon": _epsilon(done),
        "audit": audit,
    }
    (out / "arm.json").write_text(json.dumps(arm, indent=2))
    return arm


def _epsilon(records: list[dict[str, Any]]) -> float | None:
    """The largest epsilon a site reports spent by the end (None without DP)."""
    sites = records[-1].get("sites", {}) if records else {}
    spent = [s["epsilon"] for s in sites.values() if "epsilon" in s]
    return max(spent) if spent else None


def leakage(arm: dict[str, Any]) -> dict[str, Any]:
    """The arm's leakage over all hospitals, its parts, and the model attacks' numbers."""
    sites = arm["audit"]["sites"]
    items = sum(s["leakage"]["items"] for s in sites.values())
    excess = sum(s["leakage"]["excess"] for s in sites.values())
    tok = [sum(s["leakage"]["unique_tokens"][i] for s in sites.values()) for i in (0, 1)]
    dig = [sum(s["leakage"]["canary_digits"][i] for s in sites.values()) for i in (0, 1)]
    tok_chance = sum(s["leakage"]["unique_chance"] for s in sites.values())
    canaries = next((s["canaries"] for s in sites.values() if s.get("canaries")), [])
    mia = [s["membership"]["auc"] for s in sites.values() if s.get("membership")]
    recall = [s["token_set"]["recall"] for s in sites.values() if s.get("token_set")]
    token_auc = [s["token_set"]["auc"] for s in sites.values() if s.get("token_set")]
    return {"rate": excess / items if items else math.nan, "tokens": tok, "digits": dig,
            "token_chance": tok_chance,
            "token_part": max(0.0, tok[0] - tok_chance) / tok[1] if tok[1] else math.nan,
            "digit_part": max(0.0, dig[0] - dig[1] / 10) / dig[1] if dig[1] else math.nan,
            "exposure": {c["repetitions"]: c["exposure_bits"] for c in canaries},
            "mia_auc": sum(mia) / len(mia) if mia else math.nan,
            "token_recall": sum(recall) / len(recall) if recall else math.nan,
            "token_auc": sum(token_auc) / len(token_auc) if token_auc else math.nan}


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ("| arm | leakage rate | unique tokens found (chance) | canary digits | exposure bits "
            "(1 / 4 / 16 reps) | token recall / AUC | MIA AUC | epsilon | bytes moved | site s: "
            "training + crypto/wire (slowest site) | coordinator s | eval ppl | next-token acc |")
    lines = [head, "|---" * 13 + "|"]
    for label, arm in rows:
        lk = leakage(arm)
        exp = " / ".join(f"{lk['exposure'].get(r, math.nan):.1f}" for r in (1, 4, 16))
        total = arm["site_total_s"]
        slowest = max(total, key=total.get)
        train = arm["site_training_s"].get(slowest, 0.0)
        eps = "-" if arm["epsilon"] is None else f"{arm['epsilon']:.2f}"
        lines.append(
            f"| {label} | {lk['rate']:.3f} | {lk['tokens'][0]}/{lk['tokens'][1]} "
            f"({lk['token_chance']:.0f}) | "
            f"{lk['digits'][0]}/{lk['digits'][1]} | {exp} | {lk['token_recall']:.2f} / "
            f"{lk['token_auc']:.2f} | "
            f"{lk['mia_auc']:.3f} | {eps} | {_mb(arm['bytes_up'] + arm['bytes_down'])} | "
            f"{train:.0f} + {total[slowest] - train:.0f} | {arm['coordinator_s']:.0f} | "
            f"{arm['perplexity']:.1f} | {arm['accuracy']:.3f} |")
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB" if n else "0"


def plots(rows: list[tuple[str, dict[str, Any]]], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label.split(" (")[0] if not label.startswith("fedsky,") else "fedsky, masked"
              for label, _ in rows]
    x = np.arange(len(rows))
    out = []

    fig, ax = plt.subplots(figsize=(10, 4.5))
    parts = [("leakage rate", "rate"), ("site-unique tokens (beyond chance)", "token_part"),
             ("canary digits (beyond chance)", "digit_part"), ("MIA AUC - 0.5", "mia_auc")]
    for i, (name, key) in enumerate(parts):
        vals = [leakage(a)[key] - (0.5 if key == "mia_auc" else 0.0) for _, a in rows]
        ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xticks=x, ylabel="fraction recovered beyond chance",
           title="Data leakage by arm (fedsky audit)")
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    out.append(_save(fig, results / "leakage.png"))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    up = np.array([a["bytes_up"] / 1e6 for _, a in rows])
    down = np.array([a["bytes_down"] / 1e6 for _, a in rows])
    ax.bar(x, up, 0.6, label="up (sites -> coordinator)")
    ax.bar(x, down, 0.6, bottom=up, label="down")
    ax.set(xticks=x, ylabel="MB moved in the run", title="Communication by arm")
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    out.append(_save(fig, results / "communication.png"))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    train = np.array([sum(a["site_training_s"].values()) for _, a in rows])
    crypto = np.array([sum(a["site_total_s"].values()) for _, a in rows]) - train
    coord = np.array([a["coordinator_s"] for _, a in rows])
    ax.bar(x, train, 0.6, label="sites: training")
    ax.bar(x, crypto, 0.6, bottom=train,
           label="sites: encode, mask, encrypt, DP accounting, serialize")
    ax.bar(x, coord, 0.6, bottom=train + crypto, label="coordinator")
    ax.set(xticks=x, ylabel="wall seconds, summed over sites",
           title="Computation by arm (training: 1 thread; CKKS: 2 worker processes)")
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    out.append(_save(fig, results / "computation.png"))
    return out


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "paper_b"))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--results", default=str(HERE), help="where results.md and the plots go")
    ap.add_argument("--arms", default=None, help="comma-separated job files to run (default all)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep arms that already finished in --out (resume an interrupted run)")
    args = ap.parse_args()
    shared = REPO.parent / "shared" / "data"
    if "FEDSKY_DATA" not in os.environ and shared.is_dir():
        os.environ["FEDSKY_DATA"] = str(shared)
    source = Path(os.environ.get("FEDSKY_DATA", shared)) / "mtsamples" / "mtsamples.csv"
    out = Path(args.out).resolve()
    data = split_notes(source, out / "data")
    paths = [f'data.train="{data["train"]}"', f'data.eval="{data["eval"]}"',
             *(f'sites.{i}.path="{data[s]}"' for i, s in enumerate(HOSPITALS))]
    wanted = set(args.arms.split(",")) if args.arms else None
    rows = []
    started = time.perf_counter()
    for i, (label, job, centralized) in enumerate(ARMS, 1):
        if wanted is not None and job not in wanted:
            continue
        print(f"[{i}/{len(ARMS)}] {label} ...", file=sys.stderr, flush=True)
        arm = run_arm(job, out / Path(job).stem, centralized, [*paths, *args.overrides],
                      args.reuse)
        rows.append((label, arm))
        print(f"      ppl {arm['perplexity']:.1f}, leakage {leakage(arm)['rate']:.3f}, "
              f"{arm['wall_s']:.0f} s + audit {arm['audit_s']:.0f} s", file=sys.stderr,
              flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (results / "results.md").write_text(text + "\n")
    made = plots(rows, results)
    print(text)
    print(f"\n{time.perf_counter() - started:.0f} s; wrote {results / 'results.md'} and "
          f"{', '.join(p.name for p in made)}")


if __name__ == "__main__":
    main()
