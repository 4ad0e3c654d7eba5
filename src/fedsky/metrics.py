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

    def __init__(self, out_dir: Path, total_rounds: int, title: str, resume: bool = False) -> None:
        self.out_dir = out_dir
        self.total_rounds = total_rounds
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(out_dir / "metrics.jsonl", "a" if resume else "w")  # noqa: SIM115
        self._console = Console(stderr=True)
        self._progress: Progress | None = None
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("rounds"), TimeElapsedColumn(), console=self._console,
            )
            self._task = self._progress.add_task(title, total=total_rounds)
            self._progress.start()

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

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._file.close()


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
