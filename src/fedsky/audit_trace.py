"""The coordinator's view of a run, recorded for the leakage audit (`audit = true`).

The recorder wraps the coordinator's transport, the one place every payload reaches the
coordinator whatever the transport (in-process, gRPC) or the round (plain, secure, async).
It keeps the bytes exactly as received: masked integers, CKKS ciphertexts or plaintext
tensors, whichever the sites sent. Nothing from inside a site is recorded; a site's secrets
never reach the coordinator, so they cannot reach the trace.

Layout of OUTPUT_DIR/audit/:

    trace.jsonl      one line per payload: direction, tag, site, bytes, sha256
    blobs/SHA.bin    each distinct payload once (a downlink sent to many sites is one file)
    meta.json        how to read tags: `plain` (tag = round), `secure` (tag = round * 8 +
                     phase index, phases in `phases`) or `async` (tag = the site's task count)
    truth.json       written by the runner, not the coordinator: what the attacks are scored
                     against (canaries, held-out records); see fedsky.canaries
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsky.transport.base import Reply, Transport

TRACE = "trace.jsonl"


def audit_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "audit"


class AuditTrace:
    """Append-only record of payloads, content-addressed so repeats cost one index line."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], downlink: bool = True,
                 start_fresh: bool = True) -> None:
        self.dir = audit_dir(run_dir)
        (self.dir / "blobs").mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=2))
        self.downlink = downlink
        self._index = open(self.dir / TRACE, "w" if start_fresh else "a")  # noqa: SIM115
        self._stored: set[str] = {p.stem for p in (self.dir / "blobs").glob("*.bin")}

    def record(self, direction: str, tag: int, site: str, blob: bytes) -> None:
        """One payload: `up` (site -> coordinator) or `down` (coordinator -> site)."""
        if direction == "down" and not self.downlink:
            return
        sha = hashlib.sha256(blob).hexdigest()
        if sha not in self._stored:
            path = self.dir / "blobs" / f"{sha}.bin"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            self._stored.add(sha)
        line = {"dir": direction, "tag": tag, "site": site, "bytes": len(blob), "sha256": sha}
        self._index.write(json.dumps(line) + "\n")
        self._index.flush()

    def close(self) -> None:
        self._index.close()


class AuditedTransport:
    """A transport that records what passes through it, then delegates (wrap, not subclass)."""

    def __init__(self, inner: Transport, trace: AuditTrace) -> None:
        self.inner, self.trace = inner, trace

    def __getattr__(self, name: str) -> Any:  # e.g. the gRPC transport's `port`
        return getattr(self.inner, name)

    def start(self, sites: Sequence[str], setup: bytes) -> list[str]:
        return self.inner.start(sites, setup)

    def exchange(self, round_idx: int, tasks: Mapping[str, bytes],
                 deadline_s: float) -> dict[str, bytes]:
        for site, task in tasks.items():
            self.trace.record("down", round_idx, site, task)
        replies = self.inner.exchange(round_idx, tasks, deadline_s)
        for site, reply in replies.items():
            self.trace.record("up", round_idx, site, reply)
        return replies

    def reject(self, round_idx: int, site: str, reason: str) -> None:
        self.inner.reject(round_idx, site, reason)

    def submit(self, site: str, tag: int, task: bytes) -> bool:
        self.trace.record("down", tag, site, task)
        return self.inner.submit(site, tag, task)

    def poll(self, timeout_s: float) -> Reply | None:
        reply = self.inner.poll(timeout_s)
        if reply is not None and reply.payload is not None and reply.tag is not None:
            self.trace.record("up", reply.tag, reply.site, reply.payload)
        return reply

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.trace.close()


def trace_meta(secure: bool, asynchronous: bool, phases: Sequence[str] = ()) -> dict[str, Any]:
    """How `fedsky.audit` turns a tag back into (round, phase)."""
    if asynchronous:
        return {"tags": "async"}
    if secure:
        return {"tags": "secure", "phases": list(phases)}
    return {"tags": "plain"}


def read_trace(run_dir: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """meta.json and the index lines; FileNotFoundError when the run has no trace."""
    d = audit_dir(run_dir)
    meta = json.loads((d / "meta.json").read_text())
    lines = [json.loads(line) for line in (d / TRACE).read_text().splitlines() if line.strip()]
    return meta, lines


def blob(run_dir: Path | str, sha256: str) -> bytes:
    return (audit_dir(run_dir) / "blobs" / f"{sha256}.bin").read_bytes()
