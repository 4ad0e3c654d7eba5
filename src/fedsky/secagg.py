"""Secure aggregation by pairwise masking (Bonawitz et al. 2017): the arithmetic and the crypto.

Each site turns its (pre-weighted) update into integers mod 2^bits and adds, for every other
site v of the cohort, +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv comes from an X25519
agreement that u and v can both compute; plus a self mask PRG(b_u). Summed over the cohort the
pairwise masks cancel, so the coordinator learns the sum and nothing else. Every site Shamir-
shares its masking key and b_u t-of-n, so the sum is still recovered when up to n - t sites drop
after the key exchange: the survivors reveal the shares of the dropped sites' masking keys (to
remove their pairwise masks) and of the survivors' self masks (never both for one site).

Two X25519 key pairs per site per round, as in the paper: `channel` encrypts the shares to
each recipient (ChaCha20-Poly1305, never revealed), `mask` derives the pairwise seeds (its
secret is what the survivors may reveal for a dropped site). Keys are fresh every round.

This module is pure functions over numpy arrays and bytes; the message flow is in
`fedsky.secure_round` (coordinator) and `fedsky.secure_site` (site).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedsky.errors import FedskyError

# Shamir shares live in GF(p), p the Mersenne prime 2^521 - 1: any 32-byte secret fits.
PRIME = 2**521 - 1
SHARE_BYTES = 66
DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


# ---- keys and the pairwise secrets ---------------------------------------------------------

@dataclass
class KeyPair:
    secret: X25519PrivateKey

    @classmethod
    def new(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def public(self) -> bytes:
        return self.secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def agree(own: KeyPair, peer_public: bytes, purpose: str) -> bytes:
    """A 32-byte key both ends derive from their X25519 agreement, separated by `purpose`."""
    try:
        shared = own.secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise FedskyError(f"bad X25519 public key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=purpose.encode()).derive(shared)


def seal(own: KeyPair, peer_public: bytes, plaintext: bytes, context: str) -> bytes:
    """Encrypt to one peer (ChaCha20-Poly1305, key from X25519); `context` is authenticated."""
    nonce = secrets.token_bytes(12)
    key = agree(own, peer_public, "fedsky-seal")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context.encode())


def unseal(own: KeyPair, peer_public: bytes, sealed: bytes, context: str) -> bytes:
    key = agree(own, peer_public, "fedsky-seal")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], context.encode())
    except (InvalidTag, ValueError):
        raise FedskyError(f"a sealed message failed authentication ({context}): tampered, "
                          "truncated, or sealed for another key") from None


# ---- the pseudo-random masks ----------------------------------------------------------------

def prg(seed: bytes, length: int, bits: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """Integers `offset` .. `offset + length` of a uniform sequence mod 2^bits drawn from a
    32-byte seed (ChaCha20 keystream): a block of the sequence costs only that block.

    `stream` picks an independent sequence: it is ChaCha20's 96-bit nonce, and the 32-bit
    block counter (the first 4 bytes of the cryptography library's 16-byte "nonce") the
    position, so two streams never share keystream (2^32 64-byte blocks: 256 GiB each)."""
    itemsize = np.dtype(DTYPES[bits]).itemsize
    first = offset * itemsize
    skip = first % 64  # a multiple of itemsize: the view below stays aligned
    buf = np.zeros(skip + length * itemsize, dtype=np.uint8)
    nonce = (first // 64).to_bytes(4, "little") + stream.to_bytes(12, "little")
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    enc.update_into(buf, buf)  # keystream XOR zeros, in place
    return buf[skip:].view(DTYPES[bits])


def pair_seed(own: KeyPair, peer_public: bytes, tag: str) -> bytes:
    return agree(own, peer_public, f"fedsky-mask|{tag}")


def mask(values: np.ndarray, me: str, mask_keys: KeyPair, peers: dict[str, bytes],
         self_seed: bytes, bits: int, tag: str, stream: int = 0) -> np.ndarray:
    """values + PRG(b_u) + sum over peers of +-PRG(s_uv), mod 2^bits (numpy wraps).

    `stream` separates the masks of different vectors masked under the same keys."""
    out = values + prg(self_seed, len(values), bits, stream)
    for peer, public in peers.items():
        if peer == me:
            continue
        m = prg(pair_seed(mask_keys, public, tag), len(values), bits, stream)
        if me < peer:
            out += m
        else:
            out -= m
    return out


def unmask(total: np.ndarray, self_seeds: list[bytes], dropped: dict[str, bytes],
           survivors: dict[str, bytes], bits: int, tag: str, stream: int = 0,
           offset: int = 0) -> np.ndarray:
    """Remove the survivors' self masks and the pairwise masks they share with dropped sites.

    `dropped` maps a dropped site to its reconstructed masking secret; `survivors` maps a
    survivor to its masking public key. `total` may be a block of the sum: its values
    `offset` .. `offset + len(total)`.
    """
    out = total.copy()
    for seed in self_seeds:
        out -= prg(seed, len(out), bits, stream, offset)
    for gone, secret in dropped.items():
        keys = KeyPair.from_secret(secret)
        for site, public in survivors.items():
            m = prg(pair_seed(keys, public, tag), len(out), bits, stream, offset)
            # The survivor added +m if site < gone, else -m: take it back out.
            if site < gone:
                out -= m
            else:
                out += m
    return out


# ---- fixed point ----------------------------------------------------------------------------

def levels_for(bits: int, cohort: int) -> int:
    """Quantization levels per unit of clip such that the cohort's sum cannot wrap."""
    levels = (2 ** (bits - 1) - 1) // cohort
    if levels < 1:
        raise FedskyError(f"{bits}-bit secure aggregation cannot hold a sum of {cohort} sites")
    return levels


def encode_fixed(x: np.ndarray, clip: float, levels: int, bits: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale to [-levels, levels], round stochastically (unbiased),
    and reduce mod 2^bits."""
    y = np.clip(x, -clip, clip, dtype=np.float64)
    y *= levels / clip
    y += rng.random(y.shape)
    np.floor(y, out=y)
    # Two's complement: the int64 -> unsigned cast keeps the low bits, i.e. reduces mod 2^bits.
    return y.astype(np.int64).astype(DTYPES[bits])


def decode_fixed(total: np.ndarray, clip: float, levels: int, bits: int) -> np.ndarray:
    """A sum mod 2^bits back to a signed real vector (exact if the sum did not wrap)."""
    s = total.astype(np.int64)
    s[s >= 1 << (bits - 1)] -= 1 << bits
    return s * (clip / levels)


# ---- Shamir t-of-n over GF(p) ---------------------------------------------------------------

def share_secret(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` at the points `xs` (each >= 1); any `threshold` of them rebuild it."""
    if not 1 <= threshold <= len(xs):
        raise FedskyError(f"threshold {threshold} is not between 1 and {len(xs)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out[x] = acc.to_bytes(SHARE_BYTES, "big")
    return out


def recover_secret(shares: dict[int, bytes], threshold: int, length: int = 32) -> bytes:
    """Lagrange interpolation at 0 from at least `threshold` shares."""
    if len(shares) < threshold:
        raise FedskyError(f"{len(shares)} share(s) cannot rebuild a {threshold}-of-n secret")
    points = list(shares.items())[:threshold]
    acc = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        acc = (acc + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if acc >= 1 << (8 * length):
        raise FedskyError("the revealed shares do not agree (tampered or from another round)")
    return acc.to_bytes(length, "big")
