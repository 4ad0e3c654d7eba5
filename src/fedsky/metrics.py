"""Run outputs: one JSON line per round, a final summary, and what a person sees meanwhile.

On a terminal the rounds show as a rich progress bar with a line per round; elsewhere (CI,
logs, pipes) as plain lines.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


# One console for progress and log lines, so log lines print above the live progress bar.
CONSOLE = Console(stderr=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def messages(rec: dict[str, Any], direction: str) -> int:
    """How many payloads a record's bytes that way are: one per site in a synchronous round;
    an async record counts them (`messages_up`, `messages_down`)."""
    counted = rec.get(f"messages_{direction}")
    return sum(counted.values()) if counted else len(rec.get(f"bytes_{direction}") or {})


def _ratio(rec: dict[str, Any], direction: str) -> str:
    """` (123x)`: this round's fp32 bytes over the bytes sent that way, when recorded."""
    sent = rec.get(f"bytes_{direction}") or {}
    if "fp32_bytes" not in rec or not sum(sent.values()):
        return ""
    ratio = rec["fp32_bytes"] * messages(rec, direction) / sum(sent.values())
    # below 1: the payload is larger than fp32 (ciphertexts); say by how much
    return f" ({ratio:.0f}x)" if ratio >= 0.95 else f" ({1 / ratio:.1f}x fp32)"


def _async_part(rec: dict[str, Any]) -> str:
    """`  v12  2 stale  vt 31.4s`: an async record's model version, drops and virtual clock."""
    if "version" not in rec:
        return ""
    stale = f"  {rec['stale_dropped']} stale" if rec.get("stale_dropped") else ""
    clock = f"  vt {rec['virtual_clock_s']:.1f}s" if "virtual_clock_s" in rec else ""
    return f"  v{rec['version']}{stale}{clock}"


def round_line(rec: dict[str, Any], total_rounds: int) -> str:
    if rec.get("skipped"):
        return f"round {rec['round'] + 1}/{total_rounds}: skipped ({rec['skipped']})"
    up = sum(rec["bytes_up"].values())
    down = sum(rec["bytes_down"].values())
    dropped = f"  dropped {','.join(rec['dropped'])}" if rec["dropped"] else ""
    cost = f"  ${sum(rec['cost_usd'].values()):.2g}" if rec.get("cost_usd") else ""
    return (
        f"round {rec['round'] + 1}/{total_rounds}: eval loss {rec['eval_loss']:.4f}  "
        f"ppl {rec['perplexity']:.1f}  acc {rec['accuracy']:.3f}  "
        f"up {human_bytes(up)}{_ratio(rec, 'up')}  down {human_bytes(down)}{_ratio(rec, 'down')}"
        f"{cost}{_epsilon(rec)}{_async_part(rec)}  {rec['wall_s']:.1f}s{dropped}"
    )


def _epsilon(rec: dict[str, Any]) -> str:
    """`  eps 2.31`: the largest epsilon spent so far (by a site, or client-level), if any."""
    spent = [i["epsilon"] for i in (rec.get("sites") or {}).values() if "epsilon" in i]
    spent += [rec["epsilon"]] if "epsilon" in rec else []
    return f"  eps {max(spent):.3g}" if spent else ""


class RunLog:
    """Appends round records to `metrics.jsonl` and shows progress."""

    def __init__(self, out_dir: Path, total_rounds: int, title: str,
                 keep_through: int | None = None) -> None:
        """`keep_through`: resuming after that round; earlier records stay, later ones go."""
        self.out_dir = out_dir
        self.total_rounds = total_rounds
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(out_dir)
                if keep_through is not None and r["round"] <= keep_through]
        self._file = open(out_dir / "metrics.jsonl", "w")  # noqa: SIM115
        for rec in kept:
            self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._console = CONSOLE
        self._progress: Progress | None = None
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("rounds"), TimeElapsedColumn(), console=self._console,
            )
            self._task = self._progress.add_task(title, total=total_rounds)
            self._progress.start()
        self._trackers = open_trackers(out_dir, title)

    def info(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def round(self, rec: dict[str, Any]) -> None:
        self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._file.flush()
        self.info(round_line(rec, self.total_rounds))
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["round"] + 1)
        for tracker in list(self._trackers):
            try:
                tracker.log(scalars(rec), rec["round"])
            except Exception as err:  # noqa: BLE001 - a tracker outage must not stop training
                self.info(f"warning: {type(tracker).__name__} logging failed and is off: {err}")
                self._trackers.remove(tracker)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


def scalars(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a round record, nested keys joined by '/': `sites/aws/train_loss`."""
    out: dict[str, float] = {}
    for key, value in rec.items():
        if key == "round" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
    return out


class TensorBoard:
    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

        self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MLflow:
    def __init__(self, experiment: str | None, run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        if experiment:
            mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=run_name)

    def log(self, values: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def open_trackers(out_dir: Path, run_name: str) -> list[TensorBoard | MLflow]:
    """The trackers the job's `tracking` table enables, imported only then.

    Read from the `config.json` that the runner writes to `out_dir` before opening the log,
    so that every way of running a job gets them without passing the job down.
    """
    try:
        tracking = json.loads((out_dir / "config.json").read_text()).get("tracking") or {}
    except (OSError, ValueError, AttributeError):
        return []
    trackers: list[TensorBoard | MLflow] = []
    if tracking.get("tensorboard"):
        trackers.append(TensorBoard(out_dir))
    if tracking.get("mlflow"):
        trackers.append(MLflow(tracking.get("mlflow_experiment"), run_name))
    return trackers


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def traffic(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per site and direction, fp32-equivalent ratios and egress cost, over all rounds
    (a skipped round's bytes were sent too)."""
    by_site: dict[str, dict[str, float]] = {}
    fp32 = {"up": 0, "down": 0}
    for rec in records:
        for direction in ("up", "down"):
            sent = rec.get(f"bytes_{direction}") or {}
            fp32[direction] += rec.get("fp32_bytes", 0) * messages(rec, direction)
            for site, n in sent.items():
                row = by_site.setdefault(site, {"up": 0, "down": 0, "cost_usd": 0.0})
                row[direction] += n
        for site, usd in (rec.get("cost_usd") or {}).items():
            by_site[site]["cost_usd"] += usd
        for site, t in (rec.get("transfer_s") or {}).items():
            by_site[site]["transfer_s"] = by_site[site].get("transfer_s", 0.0) + sum(t.values())
    out: dict[str, Any] = {"bytes_by_site": by_site}
    if any("fp32_bytes" in r for r in records):
        for direction, key in (("up", "compression_ratio"), ("down", "compression_ratio_down")):
            sent = sum(row[direction] for row in by_site.values())
            out[key] = fp32[direction] / sent if sent else None
    if any("cost_usd" in r for r in records):
        out["cost_usd"] = sum(row["cost_usd"] for row in by_site.values())
    return out


def summarize(records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Totals over the run and the final model's quality."""
    done = [r for r in records if not r.get("skipped")]
    final = done[-1] if done else {}
    bytes_up = sum(sum(r["bytes_up"].values()) for r in records)
    bytes_down = sum(sum(r["bytes_down"].values()) for r in records)
    return {
        **extra,
        **traffic(records),
        "rounds_completed": len(done),
        "rounds_skipped": len(records) - len(done),
        "final_eval_loss": final.get("eval_loss"),
        "final_perplexity": final.get("perplexity"),
        "final_accuracy": final.get("accuracy"),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_total": bytes_up + bytes_down,
        "wall_s": sum(r["wall_s"] for r in records),
        **clock_totals(records),
        **privacy_spent(records),
    }


def clock_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Virtual time over the run, and (async runs) the model versions and stale drops."""
    out: dict[str, Any] = {}
    if any("virtual_time_s" in r for r in records):
        out["virtual_time_s"] = math.fsum(r.get("virtual_time_s", 0.0) for r in records)
    if any("version" in r for r in records):
        out["versions"] = max(r["version"] for r in records if "version" in r)
        out["stale_dropped"] = sum(r.get("stale_dropped", 0) for r in records)
    return out


def privacy_spent(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each site's epsilon as of its last report, the client-level epsilon, and why the run
    stopped early (when the budget stopped it); nothing for a run without [privacy]."""
    out: dict[str, Any] = {}
    by_site: dict[str, dict[str, float]] = {}
    for rec in records:
        for site, info in (rec.get("sites") or {}).items():
            if "epsilon" in info:
                by_site[site] = {k: v for k, v in info.items() if k.startswith("epsilon")}
        if "epsilon" in rec:
            out["epsilon_client"] = {k: v for k, v in rec.items() if k.startswith("epsilon")}
        if rec.get("stopped"):
            out["stopped"] = rec["stopped"]
    if by_site:
        out["epsilon_by_site"] = by_site
    return out


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path
