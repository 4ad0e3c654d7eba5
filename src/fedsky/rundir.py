"""Reading a run folder: the round records, summary and config a run left behind.

A crashed run has no summary and may end in a half-written line, and it is often the very run
someone needs to look at, so what is missing becomes a note on the `Run`, not an error. Fields
that later features add to round records are read when present and skipped when absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsky.errors import FedskyError
from fedsky.metrics import summarize

Record = dict[str, Any]

@dataclass
class Run:
    """A run directory, as far as it could be read."""

    path: Path
    records: list[Record]  # round records in file order, skipped rounds included
    summary: dict[str, Any] | None  # None: the run did not finish
    config: dict[str, Any] | None
    notes: list[str]  # what was missing or unreadable, shown to the reader

    @property
    def completed(self) -> list[Record]:
        return [r for r in self.records if _completed(r)]

    @property
    def name(self) -> str:
        for source in (self.summary, self.config):
            if source and isinstance(source.get("job", source.get("name")), str):
                return source.get("job", source.get("name"))
        return self.path.name

    def totals(self) -> dict[str, Any]:
        """`summary.json`, or the same totals computed from the records of an unfinished run."""
        if self.summary is not None:
            return self.summary
        try:
            return summarize(self.records, {"job": self.name})
        except (KeyError, TypeError, AttributeError):  # a record without the usual fields
            return {"job": self.name, "rounds_completed": len(self.completed)}


def number(v: Any) -> float | None:
    """A finite number, or None (bools, strings, NaN and missing values are not data)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def total_of(v: Any) -> float:
    """A number, or the sum of a {site: number} dict; 0 when absent."""
    if isinstance(v, dict):
        return sum(x for x in map(number, v.values()) if x is not None)
    return number(v) or 0.0


def _completed(rec: Record) -> bool:
    return not rec.get("skipped") and number(rec.get("eval_loss")) is not None


def load_run(run_dir: Path | str) -> Run:
    """Read a run directory; raises only when it is not a directory at all."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FedskyError(f"{path}: no such run directory (expected one holding metrics.jsonl)")
    notes: list[str] = []
    records = _read_records(path / "metrics.jsonl", notes)
    summary = _read_json(path / "summary.json", notes, "no summary.json: the run did not finish "
                         "(it crashed, was stopped or is still running); totals are computed "
                         "from metrics.jsonl")
    config = _read_json(path / "config.json", notes, "no config.json: the job's settings are "
                        "not shown")
    if records and not any(_completed(r) for r in records):
        notes.append("no round completed (every round was skipped): nothing to plot")
    return Run(path, records, summary, config, notes)


def _read_records(path: Path, notes: list[str]) -> list[Record]:
    if not path.is_file():
        notes.append("no metrics.jsonl: no round finished, so there is nothing to plot")
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            where = "the last line" if i == len(lines) else f"line {i}"
            notes.append(f"metrics.jsonl: {where} is not valid JSON (cut off when the run "
                         "stopped?) and was ignored")
            continue
        if not isinstance(rec, dict) or number(rec.get("round")) is None:
            notes.append(f"metrics.jsonl line {i} is not a round record and was ignored")
            continue
        records.append(rec)
    return records


def _read_json(path: Path, notes: list[str], missing: str) -> dict[str, Any] | None:
    if not path.is_file():
        notes.append(missing)
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        notes.append(f"{path.name} is unreadable ({err}) and was ignored")
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Curves:
    """One value per completed round; the time, byte and cost axes are cumulative since the
    start of the run, skipped rounds included (their bytes and seconds were spent too)."""

    rounds: list[float]  # 1-based, as `fedsky run` prints them
    eval_loss: list[float]
    accuracy: list[float]
    bytes: list[float]  # up + down
    wall_s: list[float]
    virtual_s: list[float] | None  # None: the run has no virtual clock
    cost_usd: list[float] | None


def curves(records: list[Record]) -> Curves:
    c = Curves([], [], [], [], [], [], [])
    acc_bytes = acc_wall = acc_virtual = acc_cost = 0.0
    for rec in records:
        acc_bytes += total_of(rec.get("bytes_up")) + total_of(rec.get("bytes_down"))
        acc_wall += total_of(rec.get("wall_s"))
        acc_virtual += total_of(rec.get("virtual_time_s"))
        acc_cost += total_of(rec.get("cost_usd"))
        if _completed(rec):
            c.rounds.append(rec["round"] + 1)
            c.eval_loss.append(float(rec["eval_loss"]))
            acc = number(rec.get("accuracy"))
            c.accuracy.append(float("nan") if acc is None else acc)
            c.bytes.append(acc_bytes)
            c.wall_s.append(acc_wall)
            c.virtual_s.append(acc_virtual)
            c.cost_usd.append(acc_cost)
    if not any("virtual_time_s" in r for r in records):
        c.virtual_s = None
    if not any("cost_usd" in r for r in records):
        c.cost_usd = None
    return c


def site_values(records: list[Record], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """{site: (rounds, values)} of `sites.<site>.<key>` over the rounds that report it."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        for site, info in (rec.get("sites") or {}).items():
            v = number(info.get(key)) if isinstance(info, dict) else None
            if v is not None:
                xs, ys = out.setdefault(site, ([], []))
                xs.append(rec["round"] + 1)
                ys.append(v)
    return out


def epsilon_values(records: list[Record]) -> dict[str, tuple[list[float], list[float]]]:
    """Privacy spent by round: a top-level `epsilon` (number or {site: eps}) or per site."""
    out = site_values(records, "epsilon")
    for rec in records:
        eps = rec.get("epsilon")
        for site, v in (eps.items() if isinstance(eps, dict) else [("all sites", eps)]):
            if number(v) is not None:
                xs, ys = out.setdefault(site, ([], []))
                xs.append(rec["round"] + 1)
                ys.append(float(v))
    return out


def compression_values(records: list[Record]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = rec.get("compression_ratio")
        vals = [number(x) for x in (v.values() if isinstance(v, dict) else [v])]
        vals = [x for x in vals if x is not None]
        if vals:
            xs.append(rec["round"] + 1)
            ys.append(sum(vals) / len(vals))
    return xs, ys


# --- plots -------------------------------------------------------------------------------------
