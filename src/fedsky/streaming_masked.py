"""Streaming aggregation of masked (secure) rounds: each site's masked reply is added into the
round's sums as its chunks arrive, so the coordinator holds one sum, not one vector per site.

A masked vector is integers mod 2^bits (`secure.bits`), so its sum can be taken chunk by chunk
in any order and is exactly the buffered path's sum (`secure_round._add`); so is the masked
weight (uint32). `plain`-routed tensors of the same round are summed in fp64 as there (exact
for fp32 inputs unless their exponents span more than ~29 binades). CKKS (`he`) ciphertexts
are added whole by TenSEAL: rounds with an `he` route buffer.

Checked before any byte counts: the round, site and phase, and the payload's tensors (names,
dtypes, shapes, and that their bytes tile the payload), as `secure_round._check_masked` does;
plain values are checked finite chunk by chunk. The payload's SHA-256 (`wire.digest`, over
the tensors in name order) is recomputed as the bytes arrive: a masked vector looks random
whatever happens to it, and the buffered path checks the digest too. safetensors puts fp32
tensors before uint8 ones, so `plain/...` tensors arrive before `masked`, which the digest
takes first; their bytes are hashed from the undo log once `masked` is done. A reply whose
digest does not match is found only at its end, after all of it was summed: every upload's
bytes are kept in its undo log (`fedsky.undo_log`), and a refused upload's are read back and
subtracted (mod 2^bits: exactly). The site then counts as dropped after the key exchange, as
on the buffered path, and the unmask phase recovers its pairwise masks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky import secagg
from fedsky.config import JobConfig
from fedsky.errors import FedskyError
from fedsky.secure_site import routes, weight_route
from fedsky.strategies import Params
from fedsky.streaming import Folder, Upload
from fedsky.undo_log import UndoLog

_TORCH_DTYPE = {"U8": "torch.uint8", "F32": "torch.float32"}  # as `wire.digest` names them


def why_not_masked(job: JobConfig, global_params: Params) -> str | None:
    """Why this secure job's rounds must buffer every masked reply (None: they can stream)."""
    if routes(job, list(global_params))["he"]:
        return ("CKKS ciphertexts (secure route 'he') are added whole; rounds with only "
                "'mask' and 'plain' routes stream")
    return None


@dataclass
class Part:
    """One tensor of a masked reply: where its bytes sit and what sum they go into."""

    name: str
    dtype: str  # safetensors' name: "U8", "F32"
    shape: list[int]
    itemsize: int  # bytes per summed element (the masked vector's are uint{bits})
    nbytes: int  # its bytes in the payload
    acc: np.ndarray  # the flat sum it is added into (a view)
    start: int = 0  # byte offsets in the payload's data section, from the upload's header
    end: int = 0


@dataclass
class MaskedSum:
    """The sums of one secure round's masked replies (`sums`: what `_unmask` takes), built
    chunk by chunk from concurrent uploads (one `MaskedStream` each, from `open`)."""

    job: JobConfig
    global_params: Params
    round_idx: int
    length: int  # masked values per site (fewer than the masked tensors' with randk)
    spill_dir: str | Path | None = None  # where the undo logs go (None: $TMPDIR)
    sums: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        assert self.job.secure is not None
        by_route = routes(self.job, list(self.global_params))
        self.bits = self.job.secure.bits
        dtype = secagg.DTYPES[self.bits]
        self.sums = {}
        if by_route["mask"]:
            self.sums["masked"] = np.zeros(self.length, dtype=dtype)
        if weight_route(by_route) == "mask":
            self.sums["masked_weight"] = np.zeros(1, dtype=np.uint32)
        for n in by_route["plain"]:
            self.sums[f"plain/{n}"] = torch.zeros(self.global_params[n].shape,
                                                  dtype=torch.float64)
        # Always with undo logs (coordinator.streaming_undo is for plaintext rounds): a masked
        # reply's digest is known only at its end, and `plain/` bytes are hashed from the log.
        self.uploads = Folder(self.spill_dir)

    def parts(self) -> dict[str, Part]:
        """The tensors a masked reply must hold, by name."""
        out = {}
        for key, acc in self.sums.items():
            if key.startswith("plain/"):
                flat = acc.numpy().reshape(-1)
                out[key] = Part(key, "F32", list(acc.shape), 4, 4 * flat.size, flat)
            else:
                out[key] = Part(key, "U8", [acc.nbytes], acc.itemsize, acc.nbytes, acc)
        return out

    def open(self, site: str) -> MaskedStream:
        """A sink for one masked reply of `site` (`fedsky.transport.frames.PayloadSink`)."""
        return self.uploads.add(MaskedStream(self, site))

    def fold(self, part: Part, start: int, values: np.ndarray, sign: int) -> None:
        """acc[start : start + len(values)] += values (mod 2^bits for integers); -= with -1."""
        self.uploads.fold(part.acc, start, values, sign)

    def settle(self, accepted: Collection[str]) -> list[str]:
        """Take back what every upload that does not count had added; the sites that count,
        in no particular order (see `Folder.settle`)."""
        return [s.site for s in self.uploads.settle(accepted)]


class MaskedStream(Upload):
    """One masked reply: checks its header, then adds each tensor's bytes as they arrive."""

    what = "masked reply"

    def __init__(self, owner: MaskedSum, site: str) -> None:
        super().__init__(owner.uploads, site)
        self.owner = owner
        self.parts: list[Part] = []  # in payload order
        self.size = 0  # bytes of the data section
        self.at = 0  # bytes of the data section taken (recorded and added)
        self.carry = b""  # an element split between two chunks
        self.done: dict[str, int] = {}  # by tensor: its bytes [0, done) were added
        self.digest = hashlib.sha256()
        self.hash_order: list[Part] = []  # the digest's order: by name
        self.hashed = 0  # bytes of hash_order[0] hashed

    def _finish(self) -> None:
        if self.reader.data_at is None or self.at != self.size or self.carry:
            raise FedskyError(f"masked reply from {self.site} is truncated: {self.at} of "
                              f"{self.size} data bytes")
        self._hash_more(None, 0, b"")  # what is left, from the undo log
        if self.digest.hexdigest() != self.header.pop("sha256", None):
            raise FedskyError(f"corrupted payload from {self.site}: its tensors do not match "
                              "the digest in its header")

    def _take_back(self, log: UndoLog) -> None:
        for part in self.parts:
            dtype = np.float32 if part.dtype == "F32" else part.acc.dtype
            for at, block in log.blocks(part.start, part.start + self.done.get(part.name, 0)):
                self.owner.fold(part, (at - part.start) // part.itemsize,
                                np.frombuffer(block, dtype=dtype), -1)

    def _check_header(self, meta: dict[str, Any]) -> None:
        """Everything the reply's header tells, before any of its bytes counts."""
        header, tensors = meta["header"], meta["tensors"]
        r = self.owner.round_idx
        if (header.get("round"), header.get("site"), header.get("phase")) != (
                r, self.site, "masked"):
            raise FedskyError(f"reply is for round {header.get('round')}, site "
                              f"{header.get('site')}, phase {header.get('phase')}")
        if not isinstance(header.get("sha256"), str):
            raise FedskyError(f"masked reply from {self.site} carries no digest")
        want = self.owner.parts()
        if set(tensors) != set(want):
            raise FedskyError(f"masked reply from {self.site} holds tensors {sorted(tensors)}, "
                              f"expected {sorted(want)}")
        for name, part in want.items():
            info = tensors[name]
            try:
                part.start, part.end = (int(x) for x in info["data_offsets"])
                ok = info["dtype"] == part.dtype and list(info["shape"]) == part.shape
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok or part.end - part.start != part.nbytes:
                raise FedskyError(f"masked reply from {self.site}: tensor {name} is "
                                  f"{json.dumps(info)[:200]}, expected {part.dtype} "
                                  f"{part.shape} in {part.nbytes} bytes")
        self.parts = sorted(want.values(), key=lambda p: p.start)
        at = 0
        for part in self.parts:  # the tensors' bytes tile the data section, in order
            if part.start != at:
                raise FedskyError(f"masked reply from {self.site}: tensor {part.name} starts "
                                  f"at byte {part.start}, expected {at}")
            at = part.end
        self.size = at
        self.hash_order = sorted(self.parts, key=lambda p: p.name)
        self._hash_prefix()
        self.header = header

    def _data(self, data: memoryview) -> None:
        """Record bytes [at, at + len) of the data section, then add them, tensor by tensor."""
        if self.at + len(data) > self.size:
            raise FedskyError(f"masked reply from {self.site} runs past its {self.size} "
                              "data bytes")
        if self.log is None:
            self.log = UndoLog(self.owner.spill_dir, f"the masked reply from {self.site}")
        self.log.record(self.at, data)  # first: what is added must be in the log
        for part in self.parts:
            lo, hi = max(self.at, part.start), min(self.at + len(data), part.end)
            if lo >= hi:
                continue
            piece = data[lo - self.at : hi - self.at]
            self._add(part, lo - part.start, piece)
            self._hash_more(part, lo - part.start, piece)
        self.at += len(data)

    def _add(self, part: Part, offset: int, piece: memoryview) -> None:
        """Add the whole elements of `piece` (bytes [offset, ...) of `part`)."""
        if self.carry:  # complete an element split across chunks
            fill = part.itemsize - len(self.carry)
            self.carry += bytes(piece[:fill])
            piece, offset = piece[fill:], offset + fill
            if len(self.carry) < part.itemsize:
                return
            self._fold(part, offset - part.itemsize, memoryview(self.carry))
            self.carry = b""
        whole = len(piece) - len(piece) % part.itemsize
        if whole:
            self._fold(part, offset, piece[:whole])
        self.carry = bytes(piece[whole:])

    def _fold(self, part: Part, offset: int, raw: memoryview) -> None:
        if part.dtype == "F32":
            values = np.frombuffer(raw, dtype=np.float32)
            if not np.isfinite(values).all():
                raise FedskyError(f"plaintext tensor {part.name} from {self.site} is not finite")
        else:
            values = np.frombuffer(raw, dtype=part.acc.dtype)
        self.owner.fold(part, offset // part.itemsize, values, 1)
        self.folded += len(raw)
        self.done[part.name] = offset + len(raw)

    def _hash_prefix(self) -> None:
        if self.hash_order:
            p = self.hash_order[0]
            self.digest.update(f"{p.name}|{_TORCH_DTYPE[p.dtype]}|{tuple(p.shape)}|".encode())

    def _hash_more(self, part: Part | None, offset: int, piece: memoryview | bytes) -> None:
        """Hash, in name order, every byte that has arrived: from `piece` (bytes [offset, ...)
        of `part`, just recorded) when its tensor is the digest's next, else from the undo log.
        `part` None: the upload is whole; hash what is left."""
        reached = self.at if part is None else part.start + offset + len(piece)
        while self.hash_order:
            head = self.hash_order[0]
            have = min(max(reached - head.start, 0), head.end - head.start)
            if self.hashed < have:
                if head is part and offset <= self.hashed:
                    self.digest.update(piece[self.hashed - offset :])
                else:
                    self._hash_from_log(head, self.hashed, have)
                self.hashed = have
            if self.hashed < head.end - head.start:
                return
            self.hash_order.pop(0)
            self.hashed = 0
            self._hash_prefix()

    def _hash_from_log(self, part: Part, lo: int, hi: int) -> None:
        assert self.log is not None  # bytes that arrived were recorded
        for _, block in self.log.blocks(part.start + lo, part.start + hi):
            self.digest.update(block)
