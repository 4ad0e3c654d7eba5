"""Run reports: the curves a federated run is judged on, as PNGs and one self-contained page.

A run directory holds `metrics.jsonl` (one record per round, see `coordinator.run_rounds`),
`summary.json` (written when the run finishes) and `config.json` (the validated job). The report
renders whatever is there: a crashed run has no summary and may end in a half-written line, and
it is often the very run someone needs to look at, so what is missing becomes a visible note, not
an error. Fields that later features add to round records are plotted when present and skipped
when absent: `virtual_time_s` and `cost_usd` (per round, summed into a cumulative axis; a dict
of per-site values is summed), `epsilon` (a number, or {site: epsilon}, or `sites.X.epsilon`) and
`compression_ratio` (a number, or {site: ratio}, averaged).

The page embeds its plots as data URIs and has no external CSS, JS or fonts, so it opens offline
and travels as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator

from fedsky.metrics import human_bytes
from fedsky.rundir import (
    Record,
    Run,
    compression_values,
    curves,
    epsilon_values,
    load_run,
    number,
    total_of,
    site_values,
)

Series = tuple[str, list[float], list[float]]  # legend label, x, y

LOSS = "eval loss (nats/token)"


class _BytesLogFormatter(LogFormatterSciNotation):
    """Matplotlib's choice of which log ticks to label, written as KB/MB/GB."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return human_bytes(x) if super().__call__(x, pos) else ""


def _log_bytes_axis(ax: Any, which: str, values: list[float]) -> None:
    """Log scale in KB/MB/GB. Data spanning a decade or more gets whole decades (each
    labelled); less than that, e.g. a constant update size, gets padded limits so that a few
    labelled ticks fall near it rather than a sliver of scientific notation."""
    lo = min(v for v in values if v > 0)
    hi = max(values)
    if hi / lo < 10:
        lo, hi = lo / 2, hi * 2
    else:
        lo, hi = 10.0 ** math.floor(math.log10(lo)), 10.0 ** math.ceil(math.log10(hi))
    axis = ax.xaxis if which == "x" else ax.yaxis
    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"set_{which}lim")(lo, hi)
    axis.set_major_formatter(_BytesLogFormatter())
    axis.set_minor_formatter(_BytesLogFormatter(labelOnlyBase=False))


def line_plot(title: str, xlabel: str, ylabel: str, series: list[Series], *,
              bytes_x: bool = False, bytes_y: bool = False,
              dashed: Series | None = None, vlines: list[float] | None = None) -> Figure | None:
    """One titled, labelled, legended line plot; None when no series has data.

    Byte axes are logarithmic; a series with no positive bytes cannot be drawn there and is
    left out (a centralized run moves none).
    """
    def drawable(s: Series) -> bool:
        return (bool(s[1]) and (not bytes_x or max(s[1]) > 0)
                and (not bytes_y or max(s[2]) > 0))

    series = [s for s in series if drawable(s)]
    if not series:
        return None
    fig = Figure(figsize=(6.4, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: renders without a display and touches no pyplot global state
    ax = fig.add_subplot()
    for i, (label, x, y) in enumerate(series):  # markers tell overlapping lines apart
        ax.plot(x, y, label=label, marker="os^vD<>p"[i % 8] if len(x) <= 40 else None,
                markersize=4)
    if dashed is not None and dashed[1]:
        ax.plot(dashed[1], dashed[2], "k--", linewidth=1.2, label=dashed[0])
    for i, x in enumerate(vlines or []):
        ax.axvline(x, color="grey", linestyle=":", label="skipped round" if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if bytes_x:
        _log_bytes_axis(ax, "x", [x for s in series for x in s[1]])
    if bytes_y:
        _log_bytes_axis(ax, "y", [y for s in series for y in s[2]])
    if xlabel == "round":  # whole rounds, not 1.25
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no URL, no version
    return buf.getvalue()


@dataclass
class Plot:
    stem: str  # file name without .png
    section: str  # where the page shows it: curves, sites, privacy or cost
    fig: Figure


def run_plots(run: Run) -> list[Plot]:
    """Every plot the run has data for."""
    recs = run.records
    c = curves(recs)
    loss = "eval loss (global model)"
    skipped = [r["round"] + 1 for r in recs if r.get("skipped")]
    done = run.completed
    per_round = ([r["round"] + 1 for r in done],
                 [total_of(r.get("bytes_up")) for r in done],
                 [total_of(r.get("bytes_down")) for r in done])
    times = [("wall clock", c.wall_s, c.eval_loss)]
    if c.virtual_s is not None:
        times.append(("virtual (simulated clock)", c.virtual_s, c.eval_loss))
    eps = epsilon_values(recs)
    plots = [
        ("loss_vs_round", "curves", line_plot(
            "Eval loss by round", "round", LOSS, [(loss, c.rounds, c.eval_loss)],
            vlines=skipped)),
        ("accuracy_vs_round", "curves", line_plot(
            "Next-token accuracy by round", "round", "accuracy (fraction of tokens)",
            [("accuracy (global model)", c.rounds, c.accuracy)])),
        ("loss_vs_bytes", "curves", line_plot(
            "Eval loss by bytes on the wire", "bytes sent up + down, cumulative (log scale)",
            LOSS, [(loss, c.bytes, c.eval_loss)], bytes_x=True)),
        ("loss_vs_time", "curves", line_plot(
            "Eval loss by time", "time since start, cumulative (s)", LOSS, times)),
        ("bytes_per_round", "curves", line_plot(
            "Bytes on the wire per round", "round", "bytes per round, all sites (log scale)",
            [("up (sites to coordinator)", per_round[0], per_round[1]),
             ("down (coordinator to sites)", per_round[0], per_round[2])],
            bytes_y=True)),
        ("compression_ratio", "curves", line_plot(
            "Update compression by round", "round", "compression ratio (x)",
            [("mean over sites", *compression_values(recs))])),
        ("site_train_loss", "sites", line_plot(
            "Local training loss per site", "round", "train loss (nats/token)",
            [(s, x, y) for s, (x, y) in site_values(recs, "train_loss").items()],
            dashed=(loss, c.rounds, c.eval_loss))),
        ("site_weights", "sites", line_plot(
            "Aggregation weight per site", "round", "weight in the aggregate",
            [(s, x, y) for s, (x, y) in site_values(recs, "weight").items()])),
        ("epsilon", "privacy", line_plot(
            "Privacy budget spent by round", "round", "epsilon (cumulative)",
            [(s, x, y) for s, (x, y) in eps.items()])),
        ("loss_vs_cost", "cost", line_plot(
            "Eval loss by cost", "cost, cumulative (USD)", LOSS,
            [(loss, c.cost_usd or [], c.eval_loss)])),
    ]
    return [Plot(stem, section, fig) for stem, section, fig in plots if fig is not None]


# --- the page ----------------------------------------------------------------------------------

def fmt(v: Any, key: str = "") -> str:
    """A value as a person reads it: bytes in KB/MB, floats to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) and "bytes" in key:
        return f"{human_bytes(v)} ({v:,.0f} B)" if v >= 1000 else f"{v:,.0f} B"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HEADLINE = ["final_eval_loss", "final_perplexity", "final_accuracy", "rounds_completed",
             "rounds_skipped", "bytes_total", "bytes_up", "bytes_down", "wall_s", "elapsed_s"]


def summary_rows(totals: dict[str, Any]) -> list[list[str]]:
    keys = [k for k in _HEADLINE if k in totals] + sorted(k for k in totals if k not in _HEADLINE)
    return [[k, fmt(totals[k], k)] for k in keys]


def site_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Per site over the run: participation, last train loss, totals, mean weight, and the last
    value of any other number the sites report (e.g. epsilon, cost)."""
    stats: dict[str, dict[str, Any]] = {}
    extra_keys: list[str] = []
    for rec in records:
        for s in rec.get("selected") or []:
            st = stats.setdefault(s, {"selected": 0, "in": 0, "tokens": 0, "compute_s": 0.0,
                                      "up": 0.0, "down": 0.0, "weights": [], "extra": {}})
            st["selected"] += 1
            st["up"] += total_of((rec.get("bytes_up") or {}).get(s))
            st["down"] += total_of((rec.get("bytes_down") or {}).get(s))
        for s, info in (rec.get("sites") or {}).items():
            st = stats.setdefault(s, {"selected": 0, "in": 0, "tokens": 0, "compute_s": 0.0,
                                      "up": 0.0, "down": 0.0, "weights": [], "extra": {}})
            st["in"] += 1
            st["train_loss"] = info.get("train_loss")
            st["tokens"] += int(total_of(info.get("tokens")))
            st["compute_s"] += total_of(info.get("compute_s"))
            if number(info.get("weight")) is not None:
                st["weights"].append(info["weight"])
            for k, v in info.items():
                if k not in ("train_loss", "tokens", "compute_s", "num_samples", "weight"):
                    st["extra"][k] = v
                    extra_keys += [k] if k not in extra_keys else []
    headers = ["site", "rounds in / selected", "last train loss", "tokens", "compute (s)",
               "bytes up", "bytes down", "mean weight", *extra_keys]
    rows = [[s, f"{st['in']} / {st['selected'] or st['in']}", fmt(st.get("train_loss")),
             fmt(st["tokens"]), fmt(st["compute_s"]), human_bytes(st["up"]),
             human_bytes(st["down"]),
             fmt(sum(st["weights"]) / len(st["weights"]) if st["weights"] else None),
             *[fmt(st["extra"].get(k), k) for k in extra_keys]] for s, st in stats.items()]
    return headers, rows


def round_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    optional = [k for k in ("virtual_time_s", "cost_usd", "compression_ratio")
                if any(k in r for r in records)]
    headers = ["round", "status", "sites in", "dropped", "eval loss", "perplexity", "accuracy",
               "bytes up", "bytes down", "wall (s)", *optional]
    rows = []
    for r in records:
        status = f"skipped: {r['skipped']}" if r.get("skipped") else "ok"
        rows.append([str(r["round"] + 1), status,
                     f"{len(r.get('participants') or [])} / {len(r.get('selected') or [])}",
                     fmt(r.get("dropped") or None), fmt(r.get("eval_loss")),
                     fmt(r.get("perplexity")), fmt(r.get("accuracy")),
                     fmt(total_of(r.get("bytes_up")), "bytes"),
                     fmt(total_of(r.get("bytes_down")), "bytes"), fmt(r.get("wall_s")),
                     *[fmt(total_of(r[k]) if k in r else None) for k in optional]])
    return headers, rows


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1180px; color: #1d2430; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px;
       margin-top: 32px; }
.sub { color: #57606a; margin-top: 0; }
.notes { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px;
         padding: 8px 16px; margin: 16px 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr));
         gap: 12px; }
.plots img { width: 100%; border: 1px solid #d0d7de; border-radius: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; } tbody tr:nth-child(even) { background: #fafbfc; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 13px; }
"""


def render_html(run: Run, plots: list[tuple[Plot, bytes]]) -> str:
    """The report page; every piece of text from the run is escaped."""
    totals = run.totals()
    mode = totals.get("mode", "unknown mode")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>fedsky report: {_e(run.name)}</h1>",
             f'<p class="sub">{_e(mode)} &middot; {_e(run.path)} &middot; generated {when}</p>']
    if run.notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in run.notes)
        parts.append(f'<div class="notes"><strong>Notes: this run is incomplete or partly '
                     f'unreadable</strong><ul>{items}</ul></div>')
    parts += ["<h2>Summary</h2>", html_table(["", "value"], summary_rows(totals))]

    def images(section: str) -> str:
        imgs = "".join(
            f'<img alt="{_e(p.fig.axes[0].get_title())}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            for p, data in plots if p.section == section)
        return f'<div class="plots">{imgs}</div>' if imgs else ""

    parts += ["<h2>Curves</h2>", images("curves") or "<p>No completed round to plot.</p>"]
    headers, rows = site_table(run.records)
    if rows:
        parts += ["<h2>Sites</h2>", html_table(headers, rows), images("sites")]
    if any(p.section == "privacy" for p, _ in plots):
        eps = epsilon_values(run.records)
        parts += ["<h2>Privacy</h2>", html_table(
            ["site", "epsilon after the last round"], [[s, fmt(y[-1])] for s, (_, y) in
                                                        eps.items()]), images("privacy")]
    cost = curves(run.records).cost_usd
    if cost is not None:
        spent = sum(total_of(r.get("cost_usd")) for r in run.records)
        parts += ["<h2>Cost</h2>", f"<p>Total: {_e(f'{spent:.4g}')} USD over "
                  f"{len(run.records)} rounds.</p>", images("cost")]
    if run.records:
        headers, rows = round_table(run.records)
        parts += ["<h2>Rounds</h2>", html_table(headers, rows)]
    if run.config is not None:
        parts += ["<h2>Configuration</h2>", "<details open><summary>config.json</summary>"
                  f"<pre>{_e(json.dumps(run.config, indent=2))}</pre></details>"]
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>fedsky report: {_e(run.name)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


@dataclass
class Report:
    html: Path
    plots: list[Path]
    notes: list[str]


def write_report(run_dir: Path | str, out_dir: Path | str | None = None) -> Report:
    """Write `plots/*.png` and `report.html` (default: into the run directory)."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    rendered, paths = [], []
    for plot in run_plots(run):
        data = png_bytes(plot.fig)
        path = plot_dir / f"{plot.stem}.png"
        path.write_bytes(data)
        rendered.append((plot, data))
        paths.append(path)
    page = out / "report.html"
    page.write_text(render_html(run, rendered), encoding="utf-8")
    return Report(page, paths, run.notes)
