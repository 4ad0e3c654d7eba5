"""Runs side by side: eval loss curves overlaid, and a markdown table of where each run ended.

Comparing strategies, codecs or privacy settings comes down to one question per axis: how
low did the loss get for the rounds, bytes, seconds or dollars spent? Each overlay answers one.
Runs without a field (no virtual clock, no cost, no bytes for a centralized run) are left out
of that plot only. `finals_table` is public because experiment READMEs reuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsky.metrics import human_bytes
from fedsky.report import LOSS, fmt, line_plot, png_bytes
from fedsky.rundir import Run, curves, epsilon_values, load_run


@dataclass
class Comparison:
    table: Path  # compare.md: the finals table and the plots
    plots: list[Path]
    notes: list[str]  # per run, what was missing or unreadable


def labels(runs: list[Run]) -> list[str]:
    """Each run's folder name; parent/name where two folders share a name."""
    names = [r.path.name for r in runs]
    return [f"{r.path.parent.name}/{r.path.name}" if names.count(r.path.name) > 1
            else r.path.name for r in runs]


def _codec_label(codec: dict[str, Any]) -> str:
    """`identity` (fp32 both ways), or each direction's stages: `up quantize+zstd, down fp32`."""
    up, down = ("+".join(st["name"] for st in codec.get(d) or []) for d in ("uplink", "downlink"))
    return f"up {up or 'fp32'}, down {down or 'fp32'}" if up or down else "identity"


def _setting(config: dict[str, Any] | None, section: str) -> str:
    value = (config or {}).get(section)
    if section == "codec" and isinstance(value, dict) and "uplink" in value:
        return _codec_label(value)
    if isinstance(value, dict):
        value = value.get("name", value.get("kind"))
    return str(value) if value is not None else "-"


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def finals_table(run_dirs: Sequence[Path | str]) -> str:
    """A markdown table: one row per run with its settings and where it ended.

    Values come from the round records, so a run that stopped early is shown as far as it got
    (its rounds column reads e.g. `2 of 5` and its mode is marked incomplete).
    """
    runs = [load_run(d) for d in run_dirs]

    def last(values: list[float] | None) -> float | None:
        return values[-1] if values else None

    def max_epsilon(run: Run) -> float | None:
        eps = [y[-1] for _, y in epsilon_values(run.records).values()]
        return max(eps) if eps else None

    # Columns for fields that later features add; shown when any run has them.
    optional = [("virtual time (s)", lambda run, c: last(c.virtual_s), "virtual_time_s"),
                ("cost (USD)", lambda run, c: last(c.cost_usd), "cost_usd"),
                ("max epsilon", lambda run, c: max_epsilon(run), "")]
    optional = [(h, get, key) for h, get, key in optional
                if any(get(r, curves(r.records)) is not None for r in runs)]
    headers = ["run", "mode", "strategy", "codec", "rounds", "eval loss", "perplexity",
               "accuracy", "bytes moved", "wall time (s)", *[h for h, _, _ in optional]]
    rows = []
    for label, run in zip(labels(runs), runs, strict=True):
        c, final = curves(run.records), (run.completed or [{}])[-1]
        mode = (run.summary or {}).get("mode", "unknown")
        if run.summary is None:
            mode += " (incomplete)"
        centralized = mode.startswith("centralized")
        planned = (run.config or {}).get("rounds")
        done = len(c.rounds)
        rows.append([
            label, mode, "-" if centralized else _setting(run.config, "strategy"),
            "-" if centralized else _setting(run.config, "codec"),
            f"{done} of {planned}" if planned and planned != done else str(done),
            fmt(final.get("eval_loss")), fmt(final.get("perplexity")),
            fmt(final.get("accuracy")), human_bytes(last(c.bytes) or 0), fmt(last(c.wall_s)),
            *[fmt(get(run, c), key) for _, get, key in optional]])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: Sequence[Path | str], out_dir: Path | str) -> Comparison:
    """Write overlay plots and `compare.md` (the finals table, then the plots) to `out_dir`."""
    runs = [load_run(d) for d in run_dirs]
    names = labels(runs)
    cs = [curves(r.records) for r in runs]
    plots = {
        "compare_loss_vs_round": line_plot(
            "Eval loss by round", "round", LOSS,
            [(n, c.rounds, c.eval_loss) for n, c in zip(names, cs, strict=True)]),
        "compare_loss_vs_bytes": line_plot(
            "Eval loss by bytes on the wire", "bytes sent up + down, cumulative (log scale)",
            LOSS, [(n, c.bytes, c.eval_loss) for n, c in zip(names, cs, strict=True)],
            bytes_x=True),
        "compare_loss_vs_time": line_plot(
            "Eval loss by wall-clock time", "wall-clock time since start, cumulative (s)", LOSS,
            [(n, c.wall_s, c.eval_loss) for n, c in zip(names, cs, strict=True)]),
        "compare_loss_vs_virtual_time": line_plot(
            "Eval loss by virtual time", "virtual (simulated) time since start (s)", LOSS,
            [(n, c.virtual_s, c.eval_loss) for n, c in zip(names, cs, strict=True)
             if c.virtual_s is not None]),
        "compare_loss_vs_cost": line_plot(
            "Eval loss by cost", "cost, cumulative (USD)", LOSS,
            [(n, c.cost_usd, c.eval_loss) for n, c in zip(names, cs, strict=True)
             if c.cost_usd is not None]),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in plots.items():
        if fig is not None:
            path = out / f"{stem}.png"
            path.write_bytes(png_bytes(fig))
            paths.append(path)
    notes = [f"{n}: {note}" for n, r in zip(names, runs, strict=True) for note in r.notes]
    text = ["# Run comparison", "", finals_table(run_dirs)]
    text += [f"- {note}" for note in notes] + ([""] if notes else [])
    text += [f"![{p.stem}]({p.name})" for p in paths]
    table = out / "compare.md"
    table.write_text("\n".join(text) + "\n")
    return Comparison(table, paths, notes)
