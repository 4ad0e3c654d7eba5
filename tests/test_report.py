"""Run reports and comparisons on hand-written run directories (no training here).

The records have the shape `coordinator.run_rounds` writes; the partial run is what a crash
leaves: a cut-off last line and no summary.json.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, tiny_job
from fedsky.cli import app
from fedsky.compare import compare_runs, finals_table
from fedsky.config import JobConfig, load_job, parse_job
from fedsky.errors import FedskyError
from fedsky.metrics import RunLog, summarize, write_summary
from fedsky.report import load_run, render_html, write_report

SITES = ("aws-us-east-1", "gcp-europe-west4", "azure-eastasia")
SAMPLES = {"aws-us-east-1": 2549, "gcp-europe-west4": 1414, "azure-eastasia": 1056}
EXTERNAL = ("http://", "https://", 'src="//', "href=\"//", "url(")


def record(r: int, *, skipped: bool = False, **extra: Any) -> dict[str, Any]:
    """Round `r` of the quickstart, as metrics.jsonl holds it."""
    rec: dict[str, Any] = {
        "round": r, "selected": list(SITES), "dropped": [],
        "bytes_down": {s: 3_752_600 for s in SITES},
        "bytes_up": {s: 3_752_776 for s in SITES},
    }
    if skipped:
        rec.update(participants=[], dropped=list(SITES), bytes_up={}, wall_s=1.5,
                   skipped="0 update(s), quorum is 2")
        return rec
    loss = 6.6 - 0.3 * r
    total = sum(SAMPLES.values())
    rec.update(
        participants=list(SITES), eval_loss=loss, perplexity=math.exp(loss),
        accuracy=0.12 + 0.01 * r, round_s=24.3, eval_s=2.9, wall_s=27.2,
        sites={s: {"train_loss": loss + 0.8 + 0.05 * i, "tokens": 10240, "compute_s": 7.9,
                   "num_samples": SAMPLES[s], "weight": SAMPLES[s] / total}
               for i, s in enumerate(SITES)},
        **extra)
    return rec


def write_run(run_dir: Path, records: list[dict[str, Any]], *, name: str = "quickstart",
              finished: bool = True, mode: str = "federated-inprocess") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    job = JobConfig.model_validate({"name": name, "rounds": len(records),
                                    "sites": [{"name": s} for s in SITES]})
    (run_dir / "config.json").write_text(job.model_dump_json(indent=2))
    if finished:
        write_summary(run_dir, summarize(records, {"job": name, "mode": mode,
                                                   "output_dir": str(run_dir),
                                                   "elapsed_s": 95.0}))
    return run_dir


def assert_valid_pngs(paths: list[Path]) -> None:
    assert paths
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] > 300 and img.size[1] > 200


def assert_offline(page: str) -> None:
    for ref in EXTERNAL:
        assert ref not in page, ref
    assert "<script" not in page and "<link" not in page


def test_report_of_a_finished_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [record(0), record(1), record(2, skipped=True),
                                       record(3)])
    rep = write_report(run)
    assert rep.html == run / "report.html" and rep.notes == []
    assert {p.stem for p in rep.plots} == {
        "loss_vs_round", "accuracy_vs_round", "loss_vs_bytes", "loss_vs_time",
        "bytes_per_round", "site_train_loss", "site_weights"}  # nothing optional is present
    assert_valid_pngs(rep.plots)
    page = rep.html.read_text()
    assert_offline(page)
    assert page.count('src="data:image/png;base64,') == len(rep.plots)
    for text in ("<h2>Summary</h2>", "<h2>Sites</h2>", "<h2>Configuration</h2>",
                 "final_eval_loss", *SITES, "skipped: 0 update(s), quorum is 2",
                 "&quot;local_steps&quot;: 10", "3 / 4"):  # aws took part in 3 of 4 rounds
        assert text in page, text
    assert "<h2>Privacy</h2>" not in page and "<h2>Cost</h2>" not in page
    assert "Notes:" not in page


def test_later_fields_are_plotted_when_present(tmp_path: Path) -> None:
    extra = [dict(virtual_time_s=40.0 + r, cost_usd={s: 0.01 for s in SITES},
                  epsilon={s: 0.5 * (r + 1) for s in SITES}, compression_ratio=4.0)
             for r in range(3)]
    run = write_run(tmp_path / "run", [record(r, **extra[r]) for r in range(3)])
    rep = write_report(run)
    stems = {p.stem for p in rep.plots}
    assert {"epsilon", "loss_vs_cost", "compression_ratio"} <= stems
    page = rep.html.read_text()
    assert "<h2>Privacy</h2>" in page and "<h2>Cost</h2>" in page
    assert "Total: 0.09 USD" in page  # 3 rounds x 3 sites x 0.01
    assert "virtual_time_s" in page  # a column of the rounds table
    table = finals_table([run])
    assert "virtual time (s)" in table and "cost (USD)" in table and "max epsilon" in table
    assert "| 123 |" in table and "| 0.09 |" in table and "| 1.5 |" in table


def test_partial_run_renders_with_a_note(tmp_path: Path) -> None:
    run = write_run(tmp_path / "crashed", [record(0), record(1)], finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record(2))[:57])  # the crash cut the last line short
    loaded = load_run(run)
    assert [r["round"] for r in loaded.records] == [0, 1]
    rep = write_report(run)
    page = rep.html.read_text()
    assert_offline(page)
    assert 'class="notes"' in page
    assert "the last line is not valid JSON" in page and "no summary.json" in page
    assert "loss_vs_round" in {p.stem for p in rep.plots}
    assert_valid_pngs(rep.plots)
    assert "rounds_completed" in page  # totals computed from the records instead


def test_empty_run_directory_still_renders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    rep = write_report(tmp_path / "empty")
    page = rep.html.read_text()
    assert rep.plots == [] and "no metrics.jsonl" in page and "No completed round" in page
    with pytest.raises(FedskyError, match="no such run directory"):
        write_report(tmp_path / "missing")


def test_run_text_is_escaped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [record(0)], name='<script>alert("x")</script>')
    page = render_html(load_run(run), [])
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page


def test_compare_overlays_runs_and_tabulates_finals(tmp_path: Path) -> None:
    fed = write_run(tmp_path / "fedavg", [record(r) for r in range(3)])
    central = write_run(tmp_path / "central", [record(r) for r in range(3)],
                        mode="centralized")
    metrics = central / "metrics.jsonl"  # a centralized run moves no bytes
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "bytes_up": {}, "bytes_down": {}}) + "\n"
                               for r in recs))
    crashed = write_run(tmp_path / "crashed", [record(0)], finished=False)
    cmp = compare_runs([fed, central, crashed], tmp_path / "cmp")
    assert {p.stem for p in cmp.plots} == {"compare_loss_vs_round", "compare_loss_vs_bytes",
                                           "compare_loss_vs_time"}
    assert_valid_pngs(cmp.plots)
    lines = finals_table([fed, central, crashed]).splitlines()
    assert len(lines) == 2 + 3 and lines[1].startswith("|---")
    assert lines[2].startswith("| fedavg | federated-inprocess | fedavg | identity | 3 | 6 |")
    assert "| 67.5 MB |" in lines[2] and "| 0 B |" in lines[3]
    assert lines[3].startswith("| central | centralized | - | - |")
    assert "(incomplete)" in lines[4] and "| 1 |" in lines[4]
    md = cmp.table.read_text()
    assert lines[2] in md and "![compare_loss_vs_bytes](compare_loss_vs_bytes.png)" in md
    assert "crashed: no summary.json" in md


def test_same_folder_names_get_told_apart(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a" / "run", [record(0)])
    b = write_run(tmp_path / "b" / "run", [record(0)])
    table = finals_table([a, b])
    assert "| a/run |" in table and "| b/run |" in table


def test_report_and_compare_commands(tmp_path: Path) -> None:
    one = write_run(tmp_path / "one", [record(r) for r in range(2)])
    two = write_run(tmp_path / "two", [record(r) for r in range(3)])
    cli = CliRunner()
    result = cli.invoke(app, ["report", str(one), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").is_file()
    assert (tmp_path / "rep" / "plots" / "loss_vs_bytes.png").is_file()
    result = cli.invoke(app, ["compare", str(one), str(two), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("| run |") and "| two |" in result.stdout
    assert "compare.md" not in result.stdout  # stdout is the table alone, ready to paste
    assert (tmp_path / "cmp" / "compare.md").is_file()
    result = cli.invoke(app, ["report", str(tmp_path / "nope")])
    assert isinstance(result.exception, FedskyError)  # main() prints it, exits 2
    assert "no such run directory" in str(result.exception)


def _fake_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedsky run` without training: the runner writes a finished run and its summary."""
    def run_centralized(job: JobConfig, job_dir: Path) -> dict[str, Any]:
        out = write_run(Path(job.output_dir), [record(0), record(1)], mode="centralized")
        return json.loads((out / "summary.json").read_text())

    fake = types.ModuleType("fedsky.runner")
    fake.run_centralized = run_centralized  # type: ignore[attr-defined]
    fake.run_federated = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedsky.runner", fake)


def test_run_writes_the_report_unless_told_not_to(tmp_path: Path, corpus_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_runner(monkeypatch)
    job = tiny_job(tmp_path, corpus_file)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(job), "--centralized", "--no-report"])
    assert result.exit_code == 0, result.output
    assert not (out / "report.html").exists()
    shutil.rmtree(out)
    result = CliRunner().invoke(app, ["run", str(job), "--centralized"])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in result.output


def test_a_failing_report_does_not_fail_the_run(tmp_path: Path, corpus_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_runner(monkeypatch)

    def broken(run_dir: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fedsky.report.write_report", broken)
    result = CliRunner().invoke(app, ["run", str(tiny_job(tmp_path, corpus_file)),
                                      "--centralized"])
    assert result.exit_code == 0
    assert "warning: no report written (OSError: disk full)" in result.output


def test_trackers_receive_every_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    mlflow = types.ModuleType("mlflow")
    mlflow.set_experiment = lambda name: calls.append(("experiment", name))  # type: ignore
    mlflow.start_run = lambda run_name: calls.append(("start", run_name))  # type: ignore
    mlflow.log_metrics = lambda values, step: calls.append(("mlflow", step, values))  # type: ignore
    mlflow.end_run = lambda: calls.append(("end",))  # type: ignore

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            calls.append(("tensorboard", log_dir))

        def add_scalar(self, name: str, value: float, step: int) -> None:
            calls.append(("scalar", name, value, step))

        def flush(self) -> None: ...

        def close(self) -> None:
            calls.append(("closed",))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    (tmp_path / "config.json").write_text(json.dumps({"tracking": {
        "tensorboard": True, "mlflow": True, "mlflow_experiment": "codecs"}}))

    log = RunLog(tmp_path, 2, "quickstart (inprocess)")
    log.round(record(0))
    log.round(record(1, skipped=True))
    log.close()

    assert calls[0] == ("tensorboard", str(tmp_path / "tensorboard"))
    assert calls[1:3] == [("experiment", "codecs"), ("start", "quickstart (inprocess)")]
    logged = [c for c in calls if c[0] == "mlflow"]
    assert [c[1] for c in logged] == [0, 1]
    assert logged[0][2]["eval_loss"] == pytest.approx(6.6)
    assert logged[0][2]["sites/gcp-europe-west4/num_samples"] == 1414
    assert logged[0][2]["bytes_up/aws-us-east-1"] == 3_752_776
    assert "round" not in logged[0][2] and "eval_loss" not in logged[1][2]
    assert ("scalar", "eval_loss", pytest.approx(6.6), 0) in calls
    assert calls[-2:] == [("closed",), ("end",)]


def test_no_tracking_opens_no_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importing it would now raise
    (tmp_path / "config.json").write_text(json.dumps({"tracking": None}))
    log = RunLog(tmp_path, 1, "t")
    log.round(record(0))
    log.close()


def test_enabled_tracker_must_be_installed_at_load(tmp_path: Path, corpus_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_job(tmp_path, corpus_file)
    monkeypatch.setattr("fedsky.config.find_spec", lambda name: None)
    with pytest.raises(FedskyError, match=r"tensorboard.*pip install tensorboard"):
        load_job(path, ["tracking.tensorboard=true"])
    with pytest.raises(FedskyError, match="pip install tensorboard mlflow"):
        load_job(path, ["tracking.tensorboard=true", "tracking.mlflow=true"])
    job, _ = load_job(path, ["tracking.tensorboard=false"])
    # A site receives the job but does not track: it need not have the packages.
    raw = job.model_dump(mode="json")
    raw["tracking"]["tensorboard"] = True
    assert parse_job(raw).tracking.tensorboard
    with pytest.raises(FedskyError, match="mlflow_experiment"):
        load_job(path, ['tracking.mlflow_experiment="x"'])
    with pytest.raises(FedskyError, match="tracking.wandb.*unknown key"):
        load_job(path, ["tracking.wandb=true"])
    monkeypatch.setattr("fedsky.config.find_spec", lambda name: object())
    assert load_job(path, ["tracking.mlflow=true"])[0].tracking.mlflow


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from render_report import find_chromium
    finally:
        sys.path.pop(0)
    if find_chromium() is None:
        pytest.skip("no chromium (apt-get install chromium)")
    run = write_run(tmp_path / "run", [record(r) for r in range(3)])
    shot = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "render_report.py"), str(run),
                           "--screenshot", str(shot)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    with Image.open(shot) as img:
        assert img.size == (1200, 2400)
        low, high = img.convert("L").getextrema()
        assert high - low > 100  # something was drawn, not a blank page
