"""CKKS homomorphic encryption of flat update vectors (TenSEAL), for sums only.

The sites hold the secret key; the coordinator holds a context without it, adds ciphertexts
block by block (`sum_all`) and never decrypts. Nothing here multiplies ciphertexts, so the
parameters skip the modulus chain that multiplications need: one data prime carries the values
and a small special prime exists only because TenSEAL always makes key-switching keys (we never
ship them). Encryption is symmetric (with the secret key): half the cost of public-key
encryption, less noise, and only key holders can make a ciphertext. Measurements and the
security argument: docs/encryption.md.

An update (all its tensors concatenated) is cut into blocks of `slots` values, one ciphertext
each, so small tensors do not waste a ciphertext apiece. TenSEAL holds the GIL and its
`n_threads` does not parallelise vector encryption (bench/he_throughput.py measures both), so
with `workers` = w the blocks are shared by this process and w - 1 spawned worker processes,
each of which loads the context once.

Every ciphertext travels in a frame that the receiver checks before TenSEAL sees it:

    magic "FSC1" | key id (16 B) | block index (u32) | value count (u32) | TenSEAL bytes | CRC-32

The key id is random (it reveals nothing about the key) and names the key set, so a block made
under another context is refused instead of decrypting to noise. The CRC catches truncation and
corruption (a cryptographic hash would cost a fifth of a block's decryption and buy nothing: it
is not a MAC either way). Against an active attacker on the wire TLS protects the bytes, and
the coordinator is trusted to add honestly (it could drop or repeat a site's blocks: CKKS does
not make the computation verifiable); a block tampered with anyway decrypts to values far
beyond the parameters' capacity, which `decrypt` refuses.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import secrets
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts
from zlib_ng.zlib_ng import crc32  # zlib's CRC-32 (same values), SIMD

from fedsky.errors import FedskyError

# Largest total coefficient-modulus bits per ring degree N for 128-bit classical security with a
# ternary secret: the Homomorphic Encryption Standard (Albrecht et al. 2018, table 1), which is
# what SEAL enforces.
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

_CTX_MAGIC = b"FSK1"
_CTX_HEAD = struct.Struct(">4sB16sIBB")  # magic, holds secret key, key id, N, scale bits, primes
_BLOCK_MAGIC = b"FSC1"
_BLOCK_HEAD = struct.Struct(">4s16sII")  # magic, key id, block index, value count
_CRC = struct.Struct(">I")


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters for additions only (the default: docs/encryption.md).

    `coeff_mod_bit_sizes` lists the data primes then TenSEAL's special prime; values are
    encoded at scale 2^scale_bits. `workers` is how many processes encrypt and decrypt blocks
    (0: one per CPU core this process may use; 1: no pool).
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 20)
    scale_bits: int = 40
    workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in MAX_BITS_128:
            raise FedskyError(f"he: poly_modulus_degree {n} must be one of "
                              f"{sorted(MAX_BITS_128)}")
        if len(bits) < 2 or not all(isinstance(b, int) and 17 <= b <= 60 for b in bits):
            raise FedskyError(f"he: coeff_mod_bit_sizes {list(bits)} must list at least two "
                              "primes of 17 to 60 bits: the data prime(s), then the special prime "
                              "TenSEAL's key-switching keys need")
        if sum(bits) > MAX_BITS_128[n]:
            raise FedskyError(
                f"he: coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits, more than the "
                f"{MAX_BITS_128[n]} bits that poly_modulus_degree {n} allows at 128-bit security "
                "(Homomorphic Encryption Standard); use fewer or smaller primes or a larger "
                "poly_modulus_degree")
        if not 1 <= self.scale_bits <= self.data_bits - 2:
            raise FedskyError(f"he: scale_bits {self.scale_bits} must be from 1 to "
                              f"{self.data_bits - 2} (the data primes' {self.data_bits} bits "
                              "minus 2), or sums have no room")
        if self.workers < 0:
            raise FedskyError(f"he: workers {self.workers} must be >= 0 (0: one per core)")

    @property
    def slots(self) -> int:
        """Values per ciphertext (CKKS packs N/2 of them)."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def capacity(self) -> float:
        """Largest |value| of a decrypted sum: q / (4 * scale), half of where values wrap.

        An encoded polynomial's coefficients are at most the largest slot value, so sums within
        this bound never wrap modulo q; the factor 2 to the wrap point is the noise margin.
        """
        return float(2 ** (self.data_bits - self.scale_bits - 2))


def check_capacity(params: CkksParams, n_terms: int, max_abs: float) -> None:
    """Refuse a job whose sum of `n_terms` values of at most `max_abs` could wrap."""
    if n_terms * max_abs > params.capacity:
        raise FedskyError(
            f"he: {n_terms} summands of |x| <= {max_abs:g} may reach {n_terms * max_abs:g}, "
            f"beyond the {params.capacity:g} these CKKS parameters decode; clip updates "
            "harder or lower he.scale_bits")


@dataclass(frozen=True)
class CkksContext:
    """A TenSEAL context with the parameters it was made from and its key set's id."""

    params: CkksParams
    key_id: bytes  # 16 random bytes shared by every copy of this key set
    tenseal: ts.Context = field(repr=False)


def new_secret_context(params: CkksParams | None = None) -> CkksContext:
    """A fresh key set (secret key included): made by one site, shared with the others."""
    params = params or CkksParams()
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    except (ValueError, RuntimeError) as e:
        raise FedskyError(f"he: TenSEAL rejects {params}: {e}") from e
    ctx.global_scale = 2.0 ** params.scale_bits
    return CkksContext(params, secrets.token_bytes(16), ctx)


def has_secret_key(ctx: CkksContext) -> bool:
    return bool(ctx.tenseal.has_secret_key())


def _context_bytes(ctx: CkksContext, secret: bool) -> bytes:
    p = ctx.params
    head = _CTX_HEAD.pack(_CTX_MAGIC, secret, ctx.key_id, p.poly_modulus_degree, p.scale_bits,
                          len(p.coeff_mod_bit_sizes))
    # No public key (symmetric scheme) and no key-switching keys: additions need neither.
    body = ctx.tenseal.serialize(save_public_key=False, save_secret_key=secret,
                                 save_galois_keys=False, save_relin_keys=False)
    return head + bytes(p.coeff_mod_bit_sizes) + body


def public_context_bytes(ctx: CkksContext) -> bytes:
    """The coordinator's copy: parameters and key id, no key at all (about 100 bytes)."""
    return _context_bytes(ctx, secret=False)


def secret_context_bytes(ctx: CkksContext) -> bytes:
    """A site's copy, with the secret key: encrypt it before it leaves the site."""
    if not has_secret_key(ctx):
        raise FedskyError("he: this context holds no secret key to export")
    return _context_bytes(ctx, secret=True)


def load_context(data: bytes, workers: int | None = None) -> CkksContext:
    """Inverse of `public_context_bytes` / `secret_context_bytes`, checked against its header."""
    if len(data) < _CTX_HEAD.size or data[:4] != _CTX_MAGIC:
        raise FedskyError("he: not a fedsky CKKS context (bad header)")
    _, secret, key_id, n, scale_bits, n_primes = _CTX_HEAD.unpack_from(data)
    body_at = _CTX_HEAD.size + n_primes
    primes = tuple(data[_CTX_HEAD.size:body_at])
    params = CkksParams(n, primes, scale_bits, 0 if workers is None else workers)
    try:
        ctx = ts.context_from(data[body_at:], n_threads=1)
        seal = ctx.data.seal_context()
        shape = (seal.first_context_data().parms().poly_modulus_degree(),
                 seal.first_context_data().total_coeff_modulus_bit_count(),
                 seal.key_context_data().total_coeff_modulus_bit_count(), ctx.global_scale)
    except (ValueError, RuntimeError, TypeError) as e:
        raise FedskyError(f"he: the CKKS context bytes are corrupt ({e})") from e
    if shape != (n, params.data_bits, sum(primes), 2.0 ** scale_bits):
        raise FedskyError("he: the CKKS context does not match its header (corrupt or forged)")
    if bool(ctx.has_secret_key()) != bool(secret):
        raise FedskyError("he: the CKKS context's secret key does not match its header: "
                          "refusing a 'public' context that holds a secret key")
    return CkksContext(params, key_id, ctx)


def public_context(ctx: CkksContext) -> CkksContext:
    """The same key set without the secret key: what the coordinator loads."""
    return load_context(public_context_bytes(ctx), ctx.params.workers)


# ---- blocks ---------------------------------------------------------------------------------

def block_count(params: CkksParams, length: int) -> int:
    return math.ceil(length / params.slots)


def _frame(ctx: CkksContext, index: int, vec: ts.CKKSVector) -> bytes:
    body = _BLOCK_HEAD.pack(_BLOCK_MAGIC, ctx.key_id, index, vec.size()) + vec.serialize()
    return body + _CRC.pack(crc32(body))


def _open(ctx: CkksContext, blob: bytes, index: int, count: int | None) -> ts.CKKSVector:
    """The ciphertext in one frame, or FedskyError naming what is wrong with it."""
    where = f"he: ciphertext block {index}"
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise FedskyError(f"{where} is a {type(blob).__name__}, not bytes")
    blob = bytes(blob)
    if len(blob) < _BLOCK_HEAD.size + _CRC.size or blob[:4] != _BLOCK_MAGIC:
        raise FedskyError(f"{where} is not a fedsky CKKS block ({len(blob)} bytes)")
    body, (crc,) = blob[:-_CRC.size], _CRC.unpack(blob[-_CRC.size:])
    if crc32(body) != crc:
        raise FedskyError(f"{where} is corrupt or truncated (CRC mismatch)")
    _, key_id, got_index, got_count = _BLOCK_HEAD.unpack_from(body)
    if key_id != ctx.key_id:
        raise FedskyError(f"{where} was made under another key set (key id "
                          f"{key_id.hex()[:8]}, this context {ctx.key_id.hex()[:8]})")
    if got_index != index:
        raise FedskyError(f"{where} is labelled block {got_index}: blocks missing or reordered")
    if count is not None and got_count != count:
        raise FedskyError(f"{where} holds {got_count} values, expected {count}: "
                          "the update has another length")
    try:
        vec = ts.ckks_vector_from(ctx.tenseal, body[_BLOCK_HEAD.size:])
    except (ValueError, RuntimeError, TypeError) as e:
        raise FedskyError(f"{where} does not load under this context ({e})") from e
    if vec.size() != got_count:
        raise FedskyError(f"{where} holds {vec.size()} values, its header says {got_count}")
    return vec


def _expected_counts(params: CkksParams, length: int) -> list[int]:
    full, rest = divmod(length, params.slots)
    return [params.slots] * full + ([rest] if rest else [])


def _encrypt_span(ctx: CkksContext, start: int, values: np.ndarray) -> list[bytes]:
    """Blocks start, start+1, ... of the update; `values` begins at block `start`."""
    s = ctx.params.slots
    return [_frame(ctx, start + j, ts.ckks_vector(ctx.tenseal, values[i:i + s]))
            for j, i in enumerate(range(0, len(values), s))]


def _sum_span(ctx: CkksContext, start: int, columns: list[list[bytes]]) -> list[bytes]:
    """Per block (from `start`), the sum of every site's ciphertext of that block."""
    out = []
    for j, blobs in enumerate(columns):
        acc = _open(ctx, blobs[0], start + j, None)
        for blob in blobs[1:]:
            acc += _open(ctx, blob, start + j, acc.size())
        out.append(_frame(ctx, start + j, acc))
    return out


def _decrypt_span(ctx: CkksContext, start: int, blobs: list[bytes],
                  counts: list[int]) -> list[np.ndarray]:
    return [np.asarray(_open(ctx, b, start + j, c).decrypt(), dtype=np.float64)
            for j, (b, c) in enumerate(zip(blobs, counts, strict=True))]


# ---- worker pool ----------------------------------------------------------------------------
# One pool per role (secret: sites' encrypt/decrypt; public: the coordinator's sums), kept for
# the process's life and replaced when another key set or worker count is asked for. Workers
# are spawned, not forked: forking a process that runs gRPC or torch threads is unsafe. The
# context travels to each worker once, through the pool's pipe to a child of this process.

_POOLS: dict[bool, tuple[tuple[bytes, int], ProcessPoolExecutor]] = {}
_WORKER_CTX: CkksContext | None = None


def _init_worker(data: bytes) -> None:
    global _WORKER_CTX
    _WORKER_CTX = load_context(data, workers=1)


def _in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    assert _WORKER_CTX is not None
    return fn(_WORKER_CTX, *args)


def resolve_workers(workers: int) -> int:
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool(ctx: CkksContext, workers: int) -> Executor:
    secret = has_secret_key(ctx)
    key = (ctx.key_id, workers)
    held = _POOLS.get(secret)
    if held is not None and held[0] == key:
        return held[1]
    if held is not None:
        held[1].shutdown(wait=False, cancel_futures=True)
    data = secret_context_bytes(ctx) if secret else public_context_bytes(ctx)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(data,))
    _POOLS[secret] = (key, pool)
    return pool


def shutdown_pools() -> None:
    """Stop the worker processes (they also stop when this process exits)."""
    while _POOLS:
        _, (_, pool) = _POOLS.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


def _run_spans(ctx: CkksContext, workers: int | None, n_blocks: int,
               fn: Callable[..., list[Any]], args_for: Callable[[int, int], tuple]) -> list[Any]:
    """fn(ctx, start, *args_for(start, stop)) over spans of blocks, in a pool when it pays."""
    w = min(resolve_workers(ctx.params.workers if workers is None else workers), n_blocks)
    if w <= 1:
        return fn(ctx, 0, *args_for(0, n_blocks))
    # This process is one of the w workers: the pool has w - 1. It takes spans from the end
    # while the pool has not started them, so when other jobs hold the cores the work stays
    # here instead of paying for the pipe. Several spans per worker even out the progress.
    bounds = np.linspace(0, n_blocks, min(n_blocks, 4 * w) + 1).round().astype(int)
    spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    pool = _pool(ctx, w - 1)
    try:
        futures = [pool.submit(_in_worker, fn, a, *args_for(a, b)) for a, b in spans]
        done: dict[int, list[Any]] = {}
        for i in range(len(spans) - 1, 0, -1):
            if not futures[i].cancel():
                break
            done[i] = fn(ctx, spans[i][0], *args_for(*spans[i]))
        return [item for i, f in enumerate(futures)
                for item in (done[i] if i in done else f.result())]
    except BrokenProcessPool as e:
        _POOLS.pop(has_secret_key(ctx), None)
        raise FedskyError("he: a CKKS worker process died (out of memory, killed, or a script "
                          "that starts work outside `if __name__ == '__main__':`, which "
                          "spawned workers re-import)") from e


# ---- the three operations -------------------------------------------------------------------

def encrypt(ctx: CkksContext, flat: Any, workers: int | None = None) -> list[bytes]:
    """One framed ciphertext per block of `slots` values of a 1-D float tensor or array."""
    if not has_secret_key(ctx):
        raise FedskyError("he: encrypting needs the secret key; this context has none")
    if hasattr(flat, "detach"):  # a torch tensor; no torch import needed for arrays
        flat = flat.detach().cpu().double().numpy()
    x = np.asarray(flat, dtype=np.float64)
    if x.ndim != 1:
        raise FedskyError(f"he: encrypt takes a flat vector, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FedskyError("he: the update holds NaN or infinite values")
    if x.size and np.abs(x).max() > ctx.params.capacity:
        raise FedskyError(f"he: update values up to {np.abs(x).max():g} exceed the "
                          f"{ctx.params.capacity:g} these CKKS parameters decode")
    s = ctx.params.slots
    return _run_spans(ctx, workers, block_count(ctx.params, x.size), _encrypt_span,
                      lambda a, b: (x[a * s:b * s],))


def sum_all(ctx: CkksContext, updates: Sequence[Sequence[bytes]], length: int | None = None,
            workers: int | None = None) -> list[bytes]:
    """The coordinator's step: block-wise sum of several sites' ciphertexts, never decrypted.

    Needs no secret key. With `length` (the update's value count) the block count is checked.
    """
    if not updates:
        raise FedskyError("he: nothing to sum")
    n_blocks = len(updates[0])
    if any(len(u) != n_blocks for u in updates):
        raise FedskyError(f"he: sites sent {sorted({len(u) for u in updates})} ciphertext "
                          "blocks: every update must have the same length")
    if length is not None and n_blocks != block_count(ctx.params, length):
        raise FedskyError(f"he: {n_blocks} ciphertext blocks for an update of {length} values "
                          f"(expected {block_count(ctx.params, length)})")
    columns = [[u[i] for u in updates] for i in range(n_blocks)]
    return _run_spans(ctx, workers, n_blocks, _sum_span, lambda a, b: (columns[a:b],))


def add(ctx: CkksContext, a: Sequence[bytes], b: Sequence[bytes]) -> list[bytes]:
    return sum_all(ctx, [a, b], workers=1)


def decrypt(ctx: CkksContext, blocks: Sequence[bytes], length: int,
            workers: int | None = None) -> np.ndarray:
    """The (length,) float64 vector in `blocks`, checked for count, order, key and range."""
    if not has_secret_key(ctx):
        raise FedskyError("he: decrypting needs the secret key; this context has none")
    counts = _expected_counts(ctx.params, length)
    if len(blocks) != len(counts):
        raise FedskyError(f"he: {len(blocks)} ciphertext blocks for an update of {length} "
                          f"values (expected {len(counts)})")
    blocks = list(blocks)
    parts = _run_spans(ctx, workers, len(counts), _decrypt_span,
                       lambda a, b: (blocks[a:b], counts[a:b]))
    x = np.concatenate(parts) if parts else np.zeros(0)
    # Decrypting under the wrong key, or a sum that wrapped, gives values spread over +-q/scale.
    if x.size and not np.abs(x).max() <= ctx.params.capacity:
        raise FedskyError(f"he: decrypted values reach {np.abs(x).max():g}, beyond the "
                          f"{ctx.params.capacity:g} these parameters decode: the sum "
                          "overflowed or the ciphertexts were tampered with")
    return x
