"""What the streamed sum's undo log costs: folding 3 sites' updates with and without it.

    python bench/streaming_undo.py [--params 100e6] [--repeats 3] [--spill-dir DIR]

In process, no network: each site's payload (a real `wire.pack` update of N fp32 values) is
fed to a `fedsky.streaming.RoundSum` in 1 MiB pieces, round robin over the sites, as the
transport hands them on; then the mean is taken. `undo`: the real path, every folded run also
written to the upload's undo log (an unlinked file in `--spill-dir`: page cache); baseline
`no_undo`, measured in the same run, alternating: the same with the log's writes skipped. Also
timed: taking one site's whole update back out (the log read back and subtracted). Prints
JSON: medians of `--repeats` and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

SITES = ("s0", "s1", "s2")
PIECE = 1 << 20


def payloads(n: int) -> dict[str, bytes]:
    import torch

    from fedsky.wire import pack

    delta = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3
    return {s: pack({"v": delta}, {"round": 0, "site": s, "codec": {}, "num_samples": k + 1})
            for k, s in enumerate(SITES)}


def fold_all(blobs: dict[str, bytes], n: int, spill_dir: str, undo: bool,
             refuse: str | None = None) -> dict[str, float]:
    import torch

    from fedsky.config import FedAvgConfig
    from fedsky.streaming import RoundSum
    from fedsky.undo_log import UndoLog

    record = UndoLog.record
    if not undo:
        UndoLog.record = lambda self, offset, data: None  # the baseline: nothing kept
    try:
        acc = RoundSum({"v": torch.empty(n)}, 0, FedAvgConfig(), spill_dir=spill_dir)
        streams = {s: acc.open(s) for s in blobs}
        started = time.perf_counter()
        size = len(next(iter(blobs.values())))
        for at in range(0, size, PIECE):
            for s, blob in blobs.items():
                streams[s].write(at, memoryview(blob)[at : at + PIECE])
        for st in streams.values():
            st.close()
        folded = time.perf_counter()
        acc.mean({s for s in SITES if s != refuse})
        done = time.perf_counter()
    finally:
        UndoLog.record = record
    return {"fold_s": folded - started, "settle_s": done - folded, "total_s": done - started}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spill-dir", default=None, help="default: $TMPDIR (must be a disk)")
    opts = ap.parse_args()
    n = int(opts.params)
    blobs = payloads(n)
    spill = opts.spill_dir or tempfile.gettempdir()
    runs: dict[str, list[float]] = {"undo": [], "no_undo": []}
    for _ in range(opts.repeats):  # alternating, so the machine's load hits both alike
        runs["no_undo"].append(fold_all(blobs, n, spill, undo=False)["total_s"])
        runs["undo"].append(fold_all(blobs, n, spill, undo=True)["total_s"])
    refused = fold_all(blobs, n, spill, undo=True, refuse="s1")
    mb = 3 * 4 * n / 1e6
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "params_per_site": n, "sites": len(SITES), "update_mb": 4 * n / 1e6,
        "no_undo_s": round(med["no_undo"], 3), "undo_s": round(med["undo"], 3),
        "no_undo_mb_s": round(mb / med["no_undo"], 1), "undo_mb_s": round(mb / med["undo"], 1),
        "undo_over_no_undo": round(med["undo"] / med["no_undo"], 3),
        "take_back_one_site_s": round(refused["settle_s"], 3),
        "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }))


if __name__ == "__main__":
    main()
