"""Render a run's report.html in headless Chromium and save a screenshot of it.

Proves the page renders offline (name resolution is switched off for the browser, so any
external reference would come out broken) and gives the README its picture:

    python bench/render_report.py RUN_DIR [--screenshot docs/report-screenshot.png]
    python bench/render_report.py --job examples/quickstart.toml [--set rounds=3 ...]

Without RUN_DIR the job is run first (`fedsky run`, into a temporary folder). Without Chromium
(`apt-get install chromium`, or set $CHROMIUM to its path) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_BYTES = 600_000  # keep the committed screenshot small


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(chromium: str, page: Path, out: Path, width: int = 1200,
               height: int = 2400) -> None:
    """Headless Chromium, fresh profile, no network: what a reader offline would see."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedsky-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: nothing may be fetched
               f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.is_file():
        raise SystemExit(f"chromium wrote no screenshot to {out}")


def shrink(path: Path, limit: int = MAX_BYTES) -> None:
    """Reduce the PNG to a 256-colour palette when it is over the limit (plots stay crisp)."""
    if path.stat().st_size <= limit:
        return
    from PIL import Image  # a matplotlib dependency

    with Image.open(path) as img:
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", type=Path, help="a finished (or crashed) run")
    ap.add_argument("--job", default="examples/quickstart.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--screenshot", type=Path, default=Path("report-screenshot.png"))
    args = ap.parse_args()

    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="fedsky-report-"))
        cmd = [sys.executable, "-m", "fedsky", "run", args.job, "--no-report",
               "--set", f'output_dir="{run_dir}"']
        for s in args.overrides:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    from fedsky.report import write_report

    report = write_report(run_dir)
    text = report.html.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)|url\(\s*["\']?([^"\')]*)', text)
    external = [a or b for a, b in refs if not (a or b).startswith(("data:", "#"))]
    if external:
        raise SystemExit(f"{report.html} refers outside itself: {external[:3]}")
    print(f"report: {report.html} ({len(report.plots)} plots, {len(text) / 1e3:.0f} KB)")

    chromium = find_chromium()
    if chromium is None:
        print("skipped the screenshot: no chromium found (apt-get install chromium, "
              "or set CHROMIUM)")
        return
    screenshot(chromium, report.html, args.screenshot)
    shrink(args.screenshot)
    print(f"screenshot: {args.screenshot} ({args.screenshot.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
