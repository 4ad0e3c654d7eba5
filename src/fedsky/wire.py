"""Payload format: named tensors plus a small JSON header, serialized with safetensors.

Every payload between coordinator and site is one of these blobs, on every transport, so the
byte counts in the metrics are the exact serialized sizes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedsky.errors import FedskyError

_HEADER_KEY = "fedsky"


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """Serialize tensors (moved to CPU, made contiguous) and a JSON-able header."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `pack`; a malformed payload raises FedskyError, never a wrong tensor."""
    try:
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
        header = json.loads(meta[_HEADER_KEY])
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise FedskyError(f"malformed payload ({len(blob)} bytes): {err}") from None
    return tensors, header
