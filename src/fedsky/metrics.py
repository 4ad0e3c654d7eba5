"""Run outputs: one JSON line per round, a final summary, and what a person sees meanwhile.

On a terminal the rounds show as a rich progress bar with a line per round; elsewhere (CI,
logs, pipes) as plain lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def round_line(rec: dict[str, Any], total_rounds: int) -> str:
    if rec.get("skipped"):
        return f"round {rec['round'] + 1}/{total_rounds}: skipped ({rec['skipped']})"
    up = sum(rec["bytes_up"].values())
    down = sum(rec["bytes_down"].values())
    dropped = f"  dropped {','.join(rec['dropped'])}" if rec["dropped"] else ""
    return (
        f"round {rec['round'] + 1}/{total_rounds}: eval loss {rec['eval_loss']:.4f}  "
        f"ppl {rec['perplexity']:.1f}  acc {rec['accuracy']:.3f}  "
        f"up {human_bytes(up)}  down {human_bytes(down)}  {rec['wall_s']:.1f}s{dropped}"
    )


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
        self._console = Console(stderr=True)
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


def summarize(records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Totals over the run and the final model's quality."""
    done = [r for r in records if not r.get("skipped")]
    final = done[-1] if done else {}
    bytes_up = sum(sum(r["bytes_up"].values()) for r in done)
    bytes_down = sum(sum(r["bytes_down"].values()) for r in done)
    return {
        **extra,
        "rounds_completed": len(done),
        "rounds_skipped": len(records) - len(done),
        "final_eval_loss": final.get("eval_loss"),
        "final_perplexity": final.get("perplexity"),
        "final_accuracy": final.get("accuracy"),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_total": bytes_up + bytes_down,
        "wall_s": sum(r["wall_s"] for r in records),
    }


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path
