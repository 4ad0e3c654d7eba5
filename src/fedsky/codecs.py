"""Update codecs: a pipeline of compression stages for each direction of every link.

An update (new - old, named fp32 tensors) is flattened into one vector and goes through at
most one stage of each step, in order (`fedsky.config.STAGE_STEP`):

    shape   dense | topk (per chunk) | randk (shared seed) | lowrank (PowerSGD)
    values  fp32 | cast (fp16, bf16) | quantize (2, 4, 8 bits; per-chunk or shared scale)
    bytes   none | zstd (applied by `fedsky.wire.pack` to the whole payload)

The result is a few wire tensors (`v` values, `i` top-k offsets, `s` scales) and a small JSON
header that describes them fully, so decoding needs no configuration and no state:
`decode_update(tensors, header, like)`. Encoding may keep state on the pipeline instance: the
error-feedback residual (what compression dropped, added to the next update; Karimireddy et
al. 2019) and PowerSGD's warm start. A site's uplink instance keeps its own; the
coordinator's downlink instance encodes the global delta.

The math is in `fedsky.compression`; this module chooses and wires it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsky import compression as cz
from fedsky.accounting import Link
from fedsky.config import STAGE_STEP, CodecConfig, StageConfig
from fedsky.errors import FedskyError

Params = dict[str, torch.Tensor]
Header = dict[str, Any]

log = logging.getLogger("fedsky.codecs")

# Bytes a payload spends besides its values and offsets (safetensors and JSON headers, the
# site's counters); the adaptive stage keeps this much of the budget aside.
OVERHEAD_BYTES = 2048


@dataclass(frozen=True)
class RoundSeeds:
    shared: int  # the same at every site this round: rand-k supports line up
    private: int  # the encoder's own draws (stochastic rounding, PowerSGD's first start)


@dataclass
class Encoded:
    tensors: Params  # what goes on the wire
    header: Header  # how to read it
    zstd_level: int | None  # compress the packed payload (None: don't)
    decoded: Params  # what the receiver will reconstruct: fp32, the update's names and shapes


class Codec(Protocol):
    def encode(self, delta: Params, seeds: RoundSeeds) -> Encoded: ...

    def decode(self, tensors: Params, header: Header, like: Params) -> Params:
        """Back to fp32 tensors with the names and shapes of `like`."""
        ...


@dataclass(frozen=True)
class Plan:
    """This round's knobs: the density of topk/randk and the quantize bit-width."""

    density: float | None
    bits: int | None


# ---- shape step: dense, topk, randk, lowrank -------------------------------------------------
# Encoders return (wire tensors, header, values to code); decoders rebuild the flat vector.

def _lowrank_layout(like: Params, names: list[str], rank: int) -> list[tuple[str, bool]]:
    """(name, factored?) in wire order: who is sent as rank-r factors and who as is."""
    return [(k, cz.lowrank_pays(like[k].shape, rank)) for k in names]


def encode_lowrank(x: torch.Tensor, like: Params, names: list[str], rank: int,
                   warm: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, Header]:
    """P and Q of every 2-D tensor where factors are smaller, the other values as they are.

    `warm` (name -> Q) is updated in place: next round's power iteration starts there.
    """
    parts = []
    gen = torch.Generator().manual_seed(seed)
    segments = cz.unflatten(x, like, names)
    for name, factored in _lowrank_layout(like, names, rank):
        seg = segments[name]
        if not factored:
            parts.append(seg.reshape(-1))
            continue
        q = warm.get(name)
        if q is None:
            q = torch.randn(seg.shape[1], rank, generator=gen)  # (b, r)
        p, q = cz.powersgd(seg, q)
        warm[name] = q
        parts += [p.reshape(-1), q.reshape(-1)]
    return torch.cat(parts), {"kind": "lowrank", "rank": rank}


def _kept(header: Header, like: Params, names: list[str], n: int) -> int:
    """How many values the shape step left, from its header alone."""
    kind = header["kind"]
    if kind == "dense":
        return n
    if kind == "topk":
        return cz.chunk_count(n, int(header["chunk"])) * int(header["k"])
    if kind == "randk":
        return int(header["k"])
    if kind == "lowrank":
        r = int(header["rank"])
        return sum(r * (like[k].shape[0] + like[k].shape[1]) if f else like[k].numel()
                   for k, f in _lowrank_layout(like, names, r))
    raise FedskyError(f"unknown shape kind {kind!r}")


def _unshape(v: torch.Tensor, tensors: Params, header: Header, like: Params,
             names: list[str], n: int) -> torch.Tensor:
    kind = header["kind"]
    if kind == "dense":
        return v
    if kind == "topk":
        chunk, k = int(header["chunk"]), int(header["k"])
        off = _wire(tensors, "i", torch.int16, cz.chunk_count(n, chunk) * k)
        if not 1 <= k <= chunk <= cz.MAX_TOPK_CHUNK or off.min() < 0 or off.max() >= chunk:
            raise FedskyError(f"top-k offsets out of range for chunk {chunk}, k {k}")
        return cz.scatter_chunks(off.view(-1, k), v, n, chunk)
    if kind == "randk":
        k = int(header["k"])
        if not 1 <= k <= n:
            raise FedskyError(f"rand-k keeps {k} of {n} values")
        out = torch.zeros(n)
        out[cz.randk_indices(n, k, int(header["seed"]))] = v
        return out
    r = int(header["rank"])  # lowrank (the kind was checked by _kept)
    parts, at = [], 0
    for name, factored in _lowrank_layout(like, names, r):
        shape = like[name].shape
        if factored:
            a, b = shape
            p = v[at : at + a * r].view(a, r)
            q = v[at + a * r : at + (a + b) * r].view(b, r)
            parts.append((p @ q.T).reshape(-1))
            at += (a + b) * r
        else:
            parts.append(v[at : at + shape.numel()])
            at += shape.numel()
    return torch.cat(parts) if parts else v


# ---- values step: fp32, cast, quantize --------------------------------------------------------

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = 65504.0


def _wire(tensors: Params, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A wire tensor, checked: present, of the dtype and size the header implies."""
    t = tensors.get(key)
    if t is None or t.dtype != dtype or t.numel() != numel:
        got = "nothing" if t is None else f"{t.dtype} x {t.numel()}"
        raise FedskyError(f"wire tensor {key!r}: expected {dtype} x {numel}, got {got}")
    return t.reshape(-1)


def _unvalue(tensors: Params, header: Header, m: int) -> torch.Tensor:
    kind = header["kind"]
    if kind == "fp32":
        return _wire(tensors, "v", torch.float32, m)
    if kind == "cast":
        return _wire(tensors, "v", CAST_DTYPES[header["dtype"]], m).to(torch.float32)
    if kind != "quantize":
        raise FedskyError(f"unknown values kind {kind!r}")
    bits = int(header["bits"])
    if bits not in (2, 4, 8):
        raise FedskyError(f"quantize bits {bits} not in 2, 4, 8")
    codes = cz.unpack_bits(_wire(tensors, "v", torch.uint8, cz.packed_len(m, bits)), bits, m)
    if "scale" in header:  # shared: one scale for everything
        return cz.dequantize(codes, bits, torch.tensor([float(header["scale"])]), max(m, 1))
    chunk = int(header["chunk"])
    scales = _wire(tensors, "s", torch.float32, cz.chunk_count(m, chunk) if m else 0)
    return cz.dequantize(codes, bits, scales, chunk)


def decode_update(tensors: Params, header: Header, like: Params) -> Params:
    """Rebuild an update from its wire tensors and header; `like` gives names and shapes.

    Every count and range the header implies is checked, so a malformed or hostile payload
    raises FedskyError rather than producing a wrong tensor.
    """
    names = sorted(like)
    n = sum(like[k].numel() for k in names)
    try:
        shape = header.get("shape", {"kind": "dense"})
        v = _unvalue(tensors, header.get("values", {"kind": "fp32"}), _kept(shape, like, names, n))
        flat = _unshape(v, tensors, shape, like, names, n)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FedskyError(f"malformed codec header {header}: {err!r}") from None
    return cz.unflatten(flat, like, names)


# ---- the pipeline ------------------------------------------------------------------------------

class Pipeline:
    """One direction's stages and the encoder's state (residual, PowerSGD warm start)."""

    def __init__(self, stages: list[StageConfig], error_feedback: bool = False,
                 link: Link | None = None) -> None:
        """`link`: the sender's declared link, which the adaptive stage sizes uploads for."""
        self.shape = next((st for st in stages if STAGE_STEP.get(st.name) == 0), None)
        self.values = next((st for st in stages if STAGE_STEP.get(st.name) == 1), None)
        self.zstd = next((st for st in stages if st.name == "zstd"), None)
        self.adaptive = next((st for st in stages if st.name == "adaptive"), None)
        self.lossy = self.shape is not None or self.values is not None
        self.error_feedback = error_feedback and self.lossy
        self.link = link
        self.residual: torch.Tensor | None = None  # (n,) what earlier rounds did not send
        self.warm: dict[str, torch.Tensor] = {}  # PowerSGD: name -> Q (b, r)

    def plan(self, n: int) -> Plan:
        """The configured density and bits, or what fits the budget on this link."""
        density = getattr(self.shape, "density", None)
        bits = getattr(self.values, "bits", None)
        ad = self.adaptive
        if ad is None or self.link is None:
            return Plan(density, bits)
        budget = cz.budget_bytes(ad.budget_s, self.link.up_mbps, self.link.latency_ms,
                                 OVERHEAD_BYTES)
        offset_bytes = 2 if self.shape.name == "topk" else 0  # int16 offsets
        options = [b for b in (8, 4, 2) if b <= bits] if bits is not None else [None]
        for b in options:
            d = cz.fit_density(n, budget, offset_bytes + self._value_bytes(b))
            if d >= ad.min_density:
                return Plan(min(d, ad.max_density), b)
        log.warning("adaptive: %d values do not fit %.3gs on %.3g Mbit/s even at density %g",
                    n, ad.budget_s, self.link.up_mbps, ad.min_density)
        return Plan(ad.min_density, options[-1])

    def _value_bytes(self, bits: int | None) -> float:
        if self.values is None:
            return 4.0
        if self.values.name == "cast":
            return 2.0
        per_scale = 0.0 if self.values.scale is not None else 4 / self.values.chunk
        return bits / 8 + per_scale

    def encode(self, delta: Params, seeds: RoundSeeds) -> Encoded:
        names = sorted(delta)
        x = cz.flatten(delta, names)  # (n,)
        if self.error_feedback and self.residual is not None:
            x = x + self.residual
        plan = self.plan(x.numel())
        tensors, header = {}, {}
        v = self._shape(x, delta, names, plan, seeds, tensors, header)
        self._code_values(v, plan, seeds, tensors, header)
        decoded = decode_update(tensors, header, delta)
        if self.error_feedback:
            self.residual = x - cz.flatten(decoded, names)
        return Encoded(tensors, header, self.zstd_level, decoded)

    @property
    def zstd_level(self) -> int | None:
        return self.zstd.level if self.zstd else None

    def decode(self, tensors: Params, header: Header, like: Params) -> Params:
        return decode_update(tensors, header, like)

    def _shape(self, x: torch.Tensor, like: Params, names: list[str], plan: Plan,
               seeds: RoundSeeds, tensors: Params, header: Header) -> torch.Tensor:
        st = self.shape
        if st is None:
            return x
        if st.name == "topk":
            k = cz.per_chunk_k(plan.density, st.chunk)
            sp = cz.topk_chunks(x, k, st.chunk)
            tensors["i"] = sp.offsets
            header["shape"] = {"kind": "topk", "chunk": st.chunk, "k": k}
            return sp.values
        if st.name == "randk":
            k = max(1, min(x.numel(), int(plan.density * x.numel())))
            header["shape"] = {"kind": "randk", "k": k, "seed": seeds.shared}
            return x[cz.randk_indices(x.numel(), k, seeds.shared)]
        v, header["shape"] = encode_lowrank(x, like, names, st.rank, self.warm, seeds.private)
        return v

    def _code_values(self, v: torch.Tensor, plan: Plan, seeds: RoundSeeds, tensors: Params,
                     header: Header) -> None:
        st = self.values
        if st is None:
            tensors["v"] = v
            return
        if st.name == "cast":
            if st.dtype == "fp16":
                v = v.clamp(-FP16_MAX, FP16_MAX)  # finite, so the receiver never sees inf
            tensors["v"] = v.to(CAST_DTYPES[st.dtype])
            header["values"] = {"kind": "cast", "dtype": st.dtype}
            return
        gen = torch.Generator().manual_seed(seeds.private) if st.stochastic else None
        header["values"] = {"kind": "quantize", "bits": plan.bits}
        if st.scale is not None:
            scales, chunk = torch.tensor([st.scale]), max(v.numel(), 1)
            header["values"]["scale"] = st.scale
        else:
            scales, chunk = cz.chunk_absmax(v, st.chunk), st.chunk
            tensors["s"] = scales
            header["values"]["chunk"] = chunk
        tensors["v"] = cz.pack_bits(cz.quantize(v, plan.bits, scales, chunk, gen), plan.bits)


@dataclass
class Codecs:
    """Both directions of a link: the uplink encodes site updates, the downlink global deltas."""

    uplink: Pipeline
    downlink: Pipeline


def make_codec(cfg: CodecConfig, link: Link | None = None) -> Codecs:
    """A site's codecs (with its `link`, for adaptive uploads) or the coordinator's (none).

    Error feedback applies to the uplink; the downlink needs none, because the coordinator
    takes each delta against the very model the site reconstructed (`fedsky.downlink`).
    """
    return Codecs(Pipeline(cfg.uplink, cfg.error_feedback, link), Pipeline(cfg.downlink))
