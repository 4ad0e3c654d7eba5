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

What cannot be undone: a sum cannot give back the part of an update it took in. An update
found bad after some of it was folded (a NaN in a later chunk, a norm that grows past the
bound, a site that vanished mid-upload and never resumed) voids the round:
the caller skips it and the model stays as it was, so a bad update never reaches the model.
Strategies that need every update at once (median, trimmed mean, the dynamic rules' softmax over
all losses), central DP, secure aggregation and compressed uplinks take the buffered path.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsky.compression import unflatten
from fedsky.config import JobConfig, StrategyConfig
from fedsky.errors import FedskyError
from fedsky.strategies import Params, log_weight

_MAX_HEADER_BYTES = 1 << 20  # a payload header (JSON) larger than this is refused
_WIRE_TENSOR = "v"  # the identity uplink's one tensor: all values, flat, in sorted-name order


def why_not_streamed(job: JobConfig, global_params: Params) -> str | None:
    """Why this job's rounds must buffer every update (None: they can stream)."""
    if job.secure is not None:
        return "secure aggregation unmasks the sum of whole updates"
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
    folded: int  # bytes of its values already in the sum
    size: int  # payload bytes received


@dataclass
class RoundSum:
    """Sum_k w_k * delta_k over a round's sites, as one flat fp32 vector (n,), built chunk by
    chunk from concurrent uploads (one `SiteStream` each, from `open`)."""

    global_params: Params
    round_idx: int
    strategy: StrategyConfig
    max_norm: float | None = None
    names: list[str] = field(init=False)
    total: torch.Tensor = field(init=False)  # (n,) fp32
    streams: list[SiteStream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = sorted(self.global_params)
        self.total = torch.zeros(sum(t.numel() for t in self.global_params.values()))
        self._acc = self.total.numpy()  # the same memory, for numpy's in-place adds
        self._lock = threading.Lock()  # uploads arrive on one thread per site

    def open(self, site: str) -> SiteStream:
        """A sink for one upload of `site` (`fedsky.transport.frames.PayloadSink`)."""
        stream = SiteStream(self, site)
        with self._lock:
            self.streams.append(stream)
        return stream

    def fold(self, start: int, values: np.ndarray) -> None:
        """total[start : start + len(values)] += values (already weighted)."""
        with self._lock:
            self._acc[start : start + len(values)] += values

    def void_reason(self, accepted: set[str]) -> str | None:
        """Why the sum holds part of an update that does not count (None: it holds exactly
        the accepted sites' updates)."""
        for s in self.streams:
            if s.folded and (s.site not in accepted or s.result is None or s.result.error):
                why = s.error or "its upload never completed"
                return (f"part of the update from {s.site} was already summed when it was "
                        f"refused ({why}); a sum cannot give it back, so the round is void")
        return None

    def mean(self, accepted: set[str]) -> Params:
        """The weighted mean delta of the accepted sites (consumes the sum: divided in place)."""
        weight = math.fsum(float(s.weight) for s in self.streams
                           if s.site in accepted and s.result is not None and not s.result.error)
        self.total.div_(weight)
        return unflatten(self.total, self.global_params, self.names)


class SiteStream:
    """One upload: parses the payload's header, then checks and folds each chunk of values."""

    def __init__(self, owner: RoundSum, site: str) -> None:
        self.owner = owner
        self.site = site
        self.head = bytearray()  # the payload's first bytes, until its header is whole
        self.header: dict[str, Any] = {}
        self.values_at: int | None = None  # payload offset where the values start
        self.weight = np.float32(0)
        self.error: str | None = None  # set once: the rest of the upload is drained, unused
        self.folded = 0  # bytes of values folded
        self.received = 0
        self.carry = b""  # a value split between two chunks
        self.norm_sq = 0.0
        self.scratch = np.empty(0, dtype=np.float32)  # an aligned copy of a chunk, reused
        self.result: Streamed | None = None
        n = owner.total.numel()
        self.n = n

    def write(self, offset: int, data: memoryview) -> None:
        """Take bytes [offset, offset + len(data)); a bad update is remembered, not raised, so
        the site's stream stays open and it is told why (REJECT) like any rejected update."""
        self.received += len(data)
        if self.error is not None:
            return
        try:
            if self.values_at is None:
                data = self._take_header(data)
            if len(data):
                self._values(data)
        except FedskyError as err:
            self.error = str(err)

    def close(self) -> Streamed:
        if self.error is None and (self.values_at is None or self.carry
                                   or self.folded != 4 * self.n):
            self.error = (f"update from {self.site} is truncated: {self.folded} of "
                          f"{4 * self.n} value bytes")
        self.result = Streamed(self.site, self.header, self.error, self.folded, self.received)
        return self.result

    def _take_header(self, data: memoryview) -> memoryview:
        """Collect the header; what follows it (values) is returned."""
        while self.values_at is None:
            need = 8
            if len(self.head) >= 8:
                size = int.from_bytes(self.head[:8], "little")
                if size > _MAX_HEADER_BYTES:
                    raise FedskyError(f"update from {self.site}: a {size}-byte header")
                need = 8 + size
            take = need - len(self.head)
            self.head += data[:take]
            data = data[take:]
            if len(self.head) < need:
                return data
            if need > 8:
                self._check_header(bytes(self.head[8:]))
                self.values_at = need
        return data

    def _check_header(self, raw: bytes) -> None:
        """Everything about the update that its header tells, before any value counts."""
        try:
            meta = json.loads(raw)
            header = json.loads(meta.pop("__metadata__")["fedsky"])
            info = meta[_WIRE_TENSOR]
            layout = (set(meta), info["dtype"], info["shape"], info["data_offsets"])
        except (ValueError, KeyError, TypeError) as err:
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

    def _values(self, data: memoryview) -> None:
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
        self.owner.fold(start, values)
        self.folded += len(data)
