"""Update codecs: how a site's update is encoded for the wire and decoded by the receiver.

A codec lives on both sides; the site's instance may keep state between rounds (error
feedback residuals come with the compression issue). Encoded tensors plus a small header go
into one `fedsky.wire` payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from fedsky.config import CodecConfig
from fedsky.errors import FedskyError

Params = dict[str, torch.Tensor]


class Codec(Protocol):
    def encode(self, delta: Params) -> tuple[Params, dict[str, Any]]:
        """(tensors to send, JSON-able header the decoder needs)."""
        ...

    def decode(self, tensors: Params, header: dict[str, Any]) -> Params:
        """Back to fp32 tensors with the original names and shapes."""
        ...


class Identity:
    """fp32 as is: the baseline every compression ratio is measured against."""

    def encode(self, delta: Params) -> tuple[Params, dict[str, Any]]:
        return {k: v.to(torch.float32) for k, v in delta.items()}, {}

    def decode(self, tensors: Params, header: dict[str, Any]) -> Params:
        return {k: v.to(torch.float32) for k, v in tensors.items()}


class Fp16:
    """Half-precision cast: 2x fewer bytes; local-SGD deltas survive it (DiLoCo)."""

    def encode(self, delta: Params) -> tuple[Params, dict[str, Any]]:
        return {k: v.to(torch.float16) for k, v in delta.items()}, {}

    def decode(self, tensors: Params, header: dict[str, Any]) -> Params:
        return {k: v.to(torch.float32) for k, v in tensors.items()}


CODECS: dict[str, Callable[[CodecConfig], Codec]] = {
    "identity": lambda cfg: Identity(),
    "fp16": lambda cfg: Fp16(),
}


def make_codec(cfg: CodecConfig) -> Codec:
    try:
        return CODECS[cfg.name](cfg)
    except KeyError:
        raise FedskyError(f"unknown codec {cfg.name!r}; known: {sorted(CODECS)}") from None
