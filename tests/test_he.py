"""CKKS encryption (real TenSEAL): sums decrypt to the plaintext sum, the coordinator's context
holds no key, serial and parallel paths agree, and every broken ciphertext is a FedskyError."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedsky import he
from fedsky.errors import FedskyError

LENGTH = 5000  # three blocks of 2048 slots, the last one ragged (904 values)


@pytest.fixture(scope="module")
def ctx() -> Iterator[he.CkksContext]:
    yield he.new_secret_context(he.CkksParams(workers=1))
    he.shutdown_pools()


@pytest.fixture(scope="module")
def coordinator(ctx: he.CkksContext) -> he.CkksContext:
    return he.load_context(he.public_context_bytes(ctx), workers=1)


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-10, 10, LENGTH) for _ in range(4)]


@pytest.fixture(scope="module")
def blocks(ctx: he.CkksContext, updates: list[np.ndarray]) -> list[list[bytes]]:
    return [he.encrypt(ctx, u) for u in updates]


def _assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == want.shape and got.dtype == np.float64
    assert np.linalg.norm(got - want) <= rel * np.linalg.norm(want)
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


def test_sum_decrypts_to_the_plaintext_sum(ctx, coordinator, updates, blocks) -> None:
    assert [len(b) for b in blocks] == [3] * 4
    total = he.sum_all(coordinator, blocks, length=LENGTH)
    _assert_close(he.decrypt(ctx, total, LENGTH), np.sum(updates, axis=0))
    pair = he.add(coordinator, blocks[0], blocks[1])
    _assert_close(he.decrypt(ctx, pair, LENGTH), updates[0] + updates[1])


def test_thousand_sites_within_design_precision(ctx, coordinator) -> None:
    """The parameters' design point: 1000 summands of |x| <= 10 (one block each)."""
    he.check_capacity(ctx.params, 1000, 10.0)
    rng = np.random.default_rng(1)
    xs = rng.uniform(-10, 10, (1000, 300))
    total = he.sum_all(coordinator, [he.encrypt(ctx, x) for x in xs])
    _assert_close(he.decrypt(ctx, total, 300), xs.sum(axis=0))


def test_torch_input_and_empty_update(ctx) -> None:
    t = torch.linspace(-1, 1, 100)
    np.testing.assert_allclose(he.decrypt(ctx, he.encrypt(ctx, t), 100), t.double().numpy(),
                               atol=1e-6)
    assert he.encrypt(ctx, np.zeros(0)) == []
    assert he.decrypt(ctx, [], 0).shape == (0,)


def test_public_context_holds_no_secret_key(ctx, coordinator, blocks) -> None:
    public, secret = he.public_context_bytes(ctx), he.secret_context_bytes(ctx)
    assert he.has_secret_key(ctx) and not he.has_secret_key(coordinator)
    assert not coordinator.tenseal.has_secret_key() and not coordinator.tenseal.is_private()
    assert coordinator.key_id == ctx.key_id and coordinator.params == ctx.params
    assert len(public) < 1024 < len(secret)  # parameters only vs a secret key of N coefficients
    with pytest.raises(FedskyError, match="secret key"):
        he.decrypt(coordinator, blocks[0], LENGTH)
    with pytest.raises(FedskyError, match="secret key"):
        he.encrypt(coordinator, np.ones(3))
    with pytest.raises(FedskyError, match="no secret key"):
        he.secret_context_bytes(coordinator)
    # Below our checks, TenSEAL itself cannot decrypt with the coordinator's context.
    import tenseal as ts
    raw = ts.ckks_vector_from(coordinator.tenseal, blocks[0][0][he._BLOCK_HEAD.size:-4])
    with pytest.raises(ValueError, match="secret"):
        raw.decrypt()
    site = he.load_context(secret, workers=1)
    assert he.has_secret_key(site) and site.key_id == ctx.key_id
    np.testing.assert_array_equal(he.decrypt(site, blocks[0], LENGTH),
                                  he.decrypt(ctx, blocks[0], LENGTH))
    # A context labelled public that carries a secret key is refused, not silently used.
    forged = public[:4] + b"\x00" + secret[5:]
    with pytest.raises(FedskyError, match="holds a secret key"):
        he.load_context(forged)
    for bad in (b"", public[:10], public[:-20], b"XXXX" + public[4:]):
        with pytest.raises(FedskyError, match="context"):
            he.load_context(bad)


def test_serial_and_parallel_paths_agree(ctx, coordinator, updates, blocks) -> None:
    """Sums are exact modular arithmetic, so both paths give the same bytes."""
    serial = he.sum_all(coordinator, blocks, workers=1)
    parallel = he.sum_all(coordinator, blocks, workers=2)
    assert serial == parallel
    np.testing.assert_array_equal(he.decrypt(ctx, serial, LENGTH, workers=2),
                                  he.decrypt(ctx, serial, LENGTH, workers=1))
    encrypted = he.encrypt(ctx, updates[0], workers=2)
    assert len(encrypted) == 3
    _assert_close(he.decrypt(ctx, encrypted, LENGTH, workers=1), updates[0], rel=1e-8)


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x10
    return bytes(b)


def test_broken_ciphertexts_are_errors(ctx, coordinator, blocks) -> None:
    good = blocks[0]
    cases = {
        "truncated": [good[0], good[1], good[2][:-100]],
        "cut to a header": [good[0][:20], good[1], good[2]],
        "empty block": [b"", good[1], good[2]],
        "not bytes": ["abc", good[1], good[2]],
        "payload bit flip": [good[0], _flip(good[1], len(good[1]) // 2), good[2]],
        "header bit flip": [good[0], good[1], _flip(good[2], 10)],
        "reordered": [good[1], good[0], good[2]],
        "block missing": good[:2],
        "block extra": [*good, good[2]],
    }
    for bad in cases.values():
        with pytest.raises(FedskyError, match="he: "):
            he.decrypt(ctx, bad, LENGTH)
        if len(bad) == 3:
            with pytest.raises(FedskyError, match="he: "):
                he.sum_all(coordinator, [blocks[1], bad])
    with pytest.raises(FedskyError, match="holds 904 values, expected 1"):
        he.decrypt(ctx, good, 2 * 2048 + 1)  # three blocks but another ragged tail
    with pytest.raises(FedskyError, match="same length"):
        he.sum_all(coordinator, [good, good[:2]])
    with pytest.raises(FedskyError, match="expected 1"):
        he.sum_all(coordinator, [good, good], length=2048)


def _relabel(blob: bytes, key_id: bytes) -> bytes:
    """The block with another key id and a matching CRC: what a forger would send."""
    body = blob[:4] + key_id + blob[20:-4]
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_ciphertexts_of_another_context_are_errors(ctx, coordinator, blocks) -> None:
    other = he.new_secret_context(he.CkksParams(workers=1))  # same parameters, other key
    theirs = he.encrypt(other, np.ones(LENGTH))
    with pytest.raises(FedskyError, match="another key set"):
        he.decrypt(ctx, theirs, LENGTH)
    with pytest.raises(FedskyError, match="another key set"):
        he.sum_all(coordinator, [blocks[0], theirs])
    # Relabelled as ours (CRC recomputed), they decrypt to noise far beyond the capacity.
    with pytest.raises(FedskyError, match="beyond"):
        he.decrypt(ctx, [_relabel(b, ctx.key_id) for b in theirs], LENGTH)
    wider = he.new_secret_context(he.CkksParams(poly_modulus_degree=8192, workers=1))
    theirs = he.encrypt(wider, np.ones(10))
    with pytest.raises(FedskyError, match="another key set"):
        he.decrypt(ctx, theirs, 10)
    with pytest.raises(FedskyError, match="does not load under this context"):
        he.decrypt(ctx, [_relabel(b, ctx.key_id) for b in theirs], 10)


def test_inputs_outside_the_encodable_range_are_errors(ctx) -> None:
    for bad, match in [(np.array([1.0, np.nan]), "NaN"), (np.ones((2, 2)), "flat"),
                       (np.array([ctx.params.capacity * 2]), "exceed")]:
        with pytest.raises(FedskyError, match=match):
            he.encrypt(ctx, bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"coeff_mod_bit_sizes": (60, 60)}, "128-bit security"),  # 120 > 109 bits at N=4096
    ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (40, 20)}, "128-bit security"),
    ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit"),
    ({"poly_modulus_degree": 3000}, "one of"),
    ({"coeff_mod_bit_sizes": (60,)}, "at least two"),
    ({"coeff_mod_bit_sizes": (61, 20)}, "17 to 60"),
    ({"scale_bits": 59}, "scale_bits"),
    ({"workers": -1}, "workers"),
])
def test_insecure_or_unusable_parameters_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(FedskyError, match=match):
        he.CkksParams(**kwargs)


def test_capacity_bound() -> None:
    p = he.CkksParams()
    assert p.capacity == 2.0 ** 18 and p.slots == 2048
    he.check_capacity(p, 1000, 10.0)
    with pytest.raises(FedskyError, match="clip"):
        he.check_capacity(p, 1000, 1000.0)
