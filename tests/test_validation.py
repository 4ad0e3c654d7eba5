"""Validation at the boundary: each kind of bad update is refused with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_job
from fedsky.codecs import make_codec
from fedsky.config import CodecConfig, load_job
from fedsky.errors import FedskyError
from fedsky.validation import check_update, decode_update, update_norm

GLOBAL = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}


def good() -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 4), 0.5), "b": torch.ones(4)}


def test_a_good_update_passes_and_its_norm_is_exact() -> None:
    check_update(good(), GLOBAL, "a", max_norm=3.0)
    assert update_norm(good()) == pytest.approx((12 * 0.25 + 4) ** 0.5)  # sqrt(7)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda u: {**u, "extra": torch.zeros(1)}, "different tensor names"),
        (lambda u: {"w": u["w"]}, "different tensor names"),
        (lambda u: {**u, "w": torch.zeros(4, 3)}, r"w has shape \(4, 3\), expected \(3, 4\)"),
        (lambda u: {**u, "b": u["b"].double()}, "b is torch.float64, expected torch.float32"),
        (lambda u: {**u, "b": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, "NaN or Inf"),
        (lambda u: {**u, "w": u["w"].clone().fill_(float("inf"))}, "NaN or Inf"),
        (lambda u: {**u, "w": u["w"] * 1e6}, "L2 norm 1.732e\\+06, over the bound"),
    ],
    ids=["extra-name", "missing-name", "shape", "dtype", "nan", "inf", "norm"],
)
def test_a_bad_update_is_refused_with_its_reason(bad, reason) -> None:
    with pytest.raises(FedskyError, match=reason):
        check_update(bad(good()), GLOBAL, "a", max_norm=10.0)


def test_without_a_bound_a_large_finite_update_passes() -> None:
    check_update({k: v * 1e6 for k, v in good().items()}, GLOBAL, "a")


def test_a_payload_that_trips_the_decoder_is_a_rejection_not_a_crash() -> None:
    codec = make_codec(CodecConfig()).uplink
    wire = {"v": torch.zeros(5)}  # 5 values for a 16-value model
    with pytest.raises(FedskyError, match="update from a cannot be decoded: wire tensor 'v'"):
        decode_update(codec, wire, {}, GLOBAL, "a")


def test_a_norm_bound_needs_plaintext_updates(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(FedskyError, match="max_update_norm needs plaintext updates"):
        load_job(tiny_job(tmp_path, corpus_file),
                 ["coordinator.max_update_norm=10", "secure={bits=32}"])
