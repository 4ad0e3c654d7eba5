"""Streaming aggregation: every site's update is folded into one running weighted sum as its
chunks arrive, so the coordinator holds one model-sized sum, never one update per site.

It applies where the round's result is a weighted mean whose weights each site's header gives
(FedAvg, FedOpt) and the uplink sends dense fp32 deltas (no compression stages). The payload is
then a safetensors blob (`fedsky.wire`) with one tensor, "v" (n,) fp32, the delta flattened in
sorted-name order, behind a JSON header. Everything `validation.check_update` checks is checked
here too, as early as it can be: the round, the site, the tensor's name, dtype and shape and the
weight before any value is folded; every chunk's values are finite, and the L2 norm so far is
within `max_update_norm`, before that chunk is folded. The payload's SHA-256 (`wire.digest`)
is not recomputed: every chunk's CRC-32, taken by the sender from the very payload buffer, is
checked on arrival (`transport.frames`), and on CPUs without SHA extensions SHA-256 runs at
100 to 400 MB/s, slower than the link it would check.

An update refused after part of it was folded (a NaN in a later chunk, a norm that grows past
the bound, a site that vanished mid-upload and never resumed) is taken back out: every folded
run of weighted values is also written to the upload's undo log (`fedsky.undo_log`, an
unlinked file: page cache, not RSS), and a refused upload's runs are read back and subtracted
before the mean is taken. The round goes on with the other sites, as on the buffered path.
fp32 add-then-subtract is not bit-exact: the sum keeps rounding residue of the order of an ulp
of the running sum per value (`tests/test_streaming.py` holds it to 1e-6 of the buffered mean
without that site; 6e-8 measured). With `coordinator.streaming_undo` off no log is written,
and such an update voids the round instead (skipped, model unchanged).
Strategies that need every update at once (median, trimmed mean, the dynamic rules' softmax over
all losses), central DP and compressed uplinks take the buffered path. Masked (secure) rounds
stream in `fedsky.streaming_masked`, on the same `Upload` and `Folder`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky.compression import unflatten
from fedsky.config import JobConfig, StrategyConfig
from fedsky.errors import FedskyError
from fedsky.strategies import Params, log_weight
from fedsky.undo_log import UndoLog

_MAX_HEADER_BYTES = 1 << 20  # a payload header (JSON) larger than this is refused
_WIRE_TENSOR = "v"  # the identity uplink's one tensor: all values, flat, in sorted-name order


def why_not_streamed(job: JobConfig, global_params: Params) -> str | None:
    """Why this job's rounds must buffer every update (None: they can stream)."""
    if job.secure is not None:
        from fedsky.streaming_masked import why_not_masked  # the secure path's own rules
        return why_not_masked(job, global_params)
    if job.privacy is not None:
        return "[privacy] clips and accounts each update as a whole"
    if job.strategy.name not in ("fedavg", "fedopt"):
        return f"strategy {job.strategy.name!r} needs every update (or every loss) at once"
    if job.codec.uplink:
        return "a compressed uplink is decoded from whole payloads"
    if any(t.dtype != torch.float32 for t in global_params.values()):
        return "the model's trainable tensors are not all fp32"
    return None


@dataclass
class Streamed:
    """What one site's upload came to: its header, or why it was refused."""

    site: str
    header: dict[str, Any]
    error: str | None
    folded: int  # bytes of its values that went into the sum
    size: int  # payload bytes received


class HeaderReader:
    """The first bytes of a safetensors payload (`fedsky.wire`): an 8-byte length, then that
    much JSON; `take` collects them across chunks and hands back what follows."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.head = bytearray()
        self.data_at: int | None = None  # payload offset where the tensors' bytes start

    def take(self, data: memoryview) -> tuple[dict[str, Any] | None, memoryview]:
        """(the parsed JSON once whole, else None; the bytes after it)."""
        need = 8
        if len(self.head) >= 8:
            size = int.from_bytes(self.head[:8], "little")
            if not 2 <= size <= _MAX_HEADER_BYTES:  # the shortest JSON object is "{}"
                raise FedskyError(f"update from {self.site}: a {size}-byte header")
            need = 8 + size
        take = need - len(self.head)
        self.head += data[:take]
        data = data[take:]
        if len(self.head) < need:
            return None, data
        if need == 8:
            return self.take(data)
        try:
            meta = json.loads(bytes(self.head[8:]))
            header = json.loads(meta.pop("__metadata__")["fedsky"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise FedskyError(f"update from {self.site}: malformed payload header: {err!r}"
                              ) from None
        if not isinstance(meta, dict) or not isinstance(header, dict):
            raise FedskyError(f"update from {self.site}: malformed payload header")
        self.data_at = need
        return {"header": header, "tensors": meta}, data


class Folder:
    """What a streamed sum needs of its uploads: each open upload, and at the end which of
    them count. An upload that does not count but was folded is taken back out (its undo
    log), so the sum holds exactly the counted uploads."""

    def __init__(self, spill_dir: str | Path | None, undo: bool = True) -> None:
        self.spill_dir = spill_dir
        self.undo = undo  # False: no undo logs; a refused upload that was folded voids the sum
        self.lock = threading.Lock()  # uploads arrive on one thread per site
        self.streams: list[Any] = []  # Upload-like: site, result, folded, settle()
        self.closed: list[Any] = []  # in the order they closed
        self.counted: list[Any] | None = None  # once settled
        self.undone: dict[str, str] = {}  # site -> why its folded part was taken back
        self.void: str | None = None  # without undo logs: why the sum holds what does not count

    def add(self, stream: Any) -> Any:
        with self.lock:
            self.streams.append(stream)
        return stream

    def fold(self, acc: np.ndarray, start: int, values: np.ndarray, sign: int) -> None:
        """acc[start : start + len(values)] += values (wrapping mod 2^bits for unsigned
        integers), or -= with sign -1; one fold at a time, whoever's upload it is."""
        with self.lock:
            view = acc[start : start + len(values)]
            if sign > 0:
                view += values
            else:
                view -= values

    def settle(self, accepted: Collection[str]) -> list[Any]:
        """Stop every upload (later bytes are dropped), take back what the uploads that do not
        count had folded, and return those that count: per accepted site, the first of its
        uploads that closed whole and valid (the one the transport handed on)."""
        if self.counted is not None:
            return self.counted
        with self.lock:
            closed, streams = list(self.closed), list(self.streams)
        counted: dict[str, Any] = {}
        for s in closed:
            if s.site in accepted and s.result.error is None:
                counted.setdefault(s.site, s)
        for s in streams:
            keep = counted.get(s.site) is s
            why = s.settle(keep)
            if why is not None and self.undo:
                self.undone[s.site] = why
            elif why is not None and self.void is None:
                self.void = (f"part of the update from {s.site} was already summed when it "
                             f"was refused ({why}) and coordinator.streaming_undo is off, so "
                             "the round is void")
        self.counted = list(counted.values())
        return self.counted


class Upload:
    """What the sinks of both streamed sums (this module's, `fedsky.streaming_masked`'s)
    share: one upload's header, then its data handed on as it arrives, an error remembered
    rather than raised, and its undo log until the round is settled."""

    what = "update"  # for messages

    def __init__(self, folder: Folder, site: str) -> None:
        self.folder = folder
        self.site = site
        self.reader = HeaderReader(site)
        self.header: dict[str, Any] = {}
        self.error: str | None = None  # set once: the rest of the upload is drained, unused
        self.received = 0
        self.folded = 0  # bytes of it added into the sum (all of them in `log`)
        self.log: UndoLog | None = None  # opened with the first fold
        self.settled = False  # the round took its sum: nothing more is folded
        self.result: Streamed | None = None
        self._io = threading.Lock()  # one write at a time, and none while settling

    def write(self, offset: int, data: memoryview) -> None:
        """Take bytes [offset, offset + len(data)); a bad update is remembered, not raised, so
        the site's stream stays open and it is told why (REJECT) like any rejected update."""
        with self._io:
            self.received += len(data)
            if self.error is not None:
                return
            if self.settled:
                self.error = f"{self.what} from {self.site} arrived after the round was summed"
                return
            try:
                if self.reader.data_at is None:
                    meta, data = self.reader.take(data)
                    if meta is not None:
                        self._check_header(meta)
                if len(data):
                    self._data(data)
            except FedskyError as err:
                self.error = str(err)

    def close(self) -> Streamed:
        """The last byte arrived: the upload's result (an error if it is incomplete)."""
        with self._io:
            try:
                if self.error is None:
                    self._finish()
            except FedskyError as err:
                self.error = str(err)
            self.result = Streamed(self.site, self.header, self.error, self.folded,
                                   self.received)
        with self.folder.lock:
            self.folder.closed.append(self)
        return self.result

    def settle(self, keep: bool) -> str | None:
        """The round is summed: drop the undo log, first subtracting what it holds unless this
        upload counts. Returns why it was taken back (None: nothing was)."""
        with self._io:
            self.settled = True
            log, self.log = self.log, None
            if keep or not self.folded:
                if log is not None:
                    log.close()
                return None
            why = self.error or "its upload never completed"
            if log is None:  # no undo log kept (RoundSum.undo off): the caller voids the sum
                return why
            try:
                self._take_back(log)
                return why
            finally:
                log.close()

    def _check_header(self, meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def _data(self, data: memoryview) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _take_back(self, log: UndoLog) -> None:
        raise NotImplementedError


@dataclass
class RoundSum:
    """Sum_k w_k * delta_k over a round's sites, as one flat fp32 vector (n,), built chunk by
    chunk from concurrent uploads (one `SiteStream` each, from `open`)."""

    global_params: Params
    round_idx: int
    strategy: StrategyConfig
    max_norm: float | None = None
    spill_dir: str | Path | None = None  # where the undo logs go (None: $TMPDIR)
    undo: bool = True  # keep undo logs (False: a refused, partly summed upload voids the sum)
    names: list[str] = field(init=False)
    total: torch.Tensor = field(init=False)  # (n,) fp32

    def __post_init__(self) -> None:
        self.names = sorted(self.global_params)
        self.total = torch.zeros(sum(t.numel() for t in self.global_params.values()))
        self._acc = self.total.numpy()  # the same memory, for numpy's in-place adds
        self.uploads = Folder(self.spill_dir, self.undo)

    @property
    def streams(self) -> list[SiteStream]:
        return self.uploads.streams

    def open(self, site: str) -> SiteStream:
        """A sink for one upload of `site` (`fedsky.transport.frames.PayloadSink`)."""
        return self.uploads.add(SiteStream(self, site))

    def fold(self, start: int, values: np.ndarray, sign: int = 1) -> None:
        """total[start : start + len(values)] += values (already weighted); -= with sign -1."""
        self.uploads.fold(self._acc, start, values, sign)

    def mean(self, accepted: Collection[str]) -> Params:
        """The weighted mean delta of the accepted sites' uploads; what any other upload had
        folded is taken back out first (consumes the sum: divided in place)."""
        counted = self.uploads.settle(accepted)
        weight = math.fsum(float(s.weight) for s in counted)
        self.total.div_(weight)
        return unflatten(self.total, self.global_params, self.names)


class SiteStream(Upload):
    """One upload: parses the payload's header, then checks and folds each chunk of values."""

    def __init__(self, owner: RoundSum, site: str) -> None:
        super().__init__(owner.uploads, site)
        self.owner = owner
        self.weight = np.float32(0)
        self.carry = b""  # a value split between two chunks
        self.norm_sq = 0.0
        self.scratch = np.empty(0, dtype=np.float32)  # an aligned copy of a chunk, reused
        self.n = owner.total.numel()

    def _finish(self) -> None:
        if self.reader.data_at is None or self.carry or self.folded != 4 * self.n:
            raise FedskyError(f"update from {self.site} is truncated: {self.folded} of "
                              f"{4 * self.n} value bytes")

    def _take_back(self, log: UndoLog) -> None:
        for at, block in log.blocks(0, self.folded):
            self.owner.fold(at // 4, np.frombuffer(block, dtype=np.float32), sign=-1)

    def _check_header(self, meta: dict[str, Any]) -> None:
        """Everything about the update that its header tells, before any value counts."""
        header, tensors = meta["header"], meta["tensors"]
        try:
            info = tensors[_WIRE_TENSOR]
            layout = (set(tensors), info["dtype"], info["shape"], info["data_offsets"])
        except (KeyError, TypeError) as err:
            raise FedskyError(f"update from {self.site}: malformed payload header: {err!r}"
                              ) from None
        r = self.owner.round_idx
        if header.get("round") != r or header.get("site") != self.site:
            raise FedskyError(f"reply from {self.site} is for round {header.get('round')} of "
                              f"site {header.get('site')}, expected round {r}")
        if header.get("codec") != {} or layout != ({_WIRE_TENSOR}, "F32", [self.n],
                                                   [0, 4 * self.n]):
            raise FedskyError(f"update from {self.site} is not the model's {self.n} values as "
                              f"dense fp32 (tensors {sorted(layout[0])}, codec "
                              f"{header.get('codec')})")
        try:
            w = math.exp(log_weight(self.owner.strategy, int(header["num_samples"]), math.nan,
                                    math.nan, math.nan))
        except (KeyError, TypeError, ValueError) as err:
            raise FedskyError(f"update from {self.site}: no usable weight ({err!r})") from None
        if not (math.isfinite(w) and w > 0):
            raise FedskyError(f"update from {self.site}: weight {w} is not positive")
        self.header, self.weight = header, np.float32(w)

    def _data(self, data: memoryview) -> None:
        if self.carry:  # complete the value split across chunks
            fill = 4 - len(self.carry)
            self.carry += bytes(data[:fill])
            data = data[fill:]
            if len(self.carry) < 4:
                return
            self._fold(memoryview(self.carry))
            self.carry = b""
        whole = len(data) - len(data) % 4
        if whole:
            self._fold(data[:whole])
        self.carry = bytes(data[whole:])

    def _fold(self, data: memoryview) -> None:
        """Check one run of whole fp32 values, then add them, weighted, into the sum."""
        start = self.folded // 4
        if start + len(data) // 4 > self.n:
            raise FedskyError(f"update from {self.site} has more than {self.n} values")
        values = np.frombuffer(data, dtype=np.float32)
        if not values.flags.aligned or self.weight != 1:
            # A chunk's data sits after its frame's header, at any byte; numpy's (and BLAS')
            # fast paths need aligned values, so copy (cheap next to the slow paths) and scale
            # the copy in place.
            if len(self.scratch) < len(values):
                self.scratch = np.empty(len(values), dtype=np.float32)
            copy = self.scratch[: len(values)]
            np.copyto(copy, values)
            values = copy
        # One BLAS pass gives the squared norm, and is NaN or Inf if any value is.
        sq = float(np.dot(values, values))
        if not math.isfinite(sq):
            if not np.isfinite(values).all():
                raise FedskyError(f"update from {self.site}: values {start}.."
                                  f"{start + len(values)} include NaN or Inf")
            sq = float(np.square(values, dtype=np.float64).sum())  # fp32 squares overflowed
        bound = self.owner.max_norm
        self.norm_sq += sq
        if bound is not None and math.sqrt(self.norm_sq) > bound:
            raise FedskyError(f"update from {self.site} has L2 norm over "
                              f"{math.sqrt(self.norm_sq):.4g}, over the bound "
                              f"coordinator.max_update_norm = {bound:g}")
        if self.weight != 1:
            values *= self.weight  # the scratch copy
        if self.owner.undo:
            if self.log is None:
                self.log = UndoLog(self.owner.spill_dir, f"the update from {self.site}")
            self.log.record(4 * start, values)  # first: what is folded must be in the log
        self.owner.fold(start, values)
        self.folded += len(data)
