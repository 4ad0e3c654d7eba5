"""Payload format: named tensors plus a small JSON header, serialized with safetensors.

Every payload between coordinator and site is one of these blobs, on every transport, so the
byte counts in the metrics are the exact serialized sizes. A payload may be zstd-compressed as a
whole (the codec pipelines' last, lossless stage); `unpack` recognises the zstd frame magic,
which no safetensors blob can start with (its first 8 bytes are a header length, and that one
would be over 4 GB of JSON). The header carries a SHA-256 of the tensor bytes, so a payload
corrupted or cut short anywhere on its way is refused, never read as a wrong update (masked
and encrypted values look random whatever happens to them; only a digest can tell).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedsky.errors import FedskyError

_HEADER_KEY = "fedsky"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A decompressed payload larger than this is refused (a tiny frame can claim a huge size).
MAX_PAYLOAD_BYTES = 1 << 36


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any],
         zstd_level: int | None = None) -> bytes:
    """Serialize tensors (moved to CPU, made contiguous) and a JSON-able header; with
    `zstd_level`, compress the whole blob (lossless: sparse offsets and low-bit codes shrink)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {**header, "sha256": digest(cpu)}
    blob = save(cpu, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})
    if zstd_level is None:
        return blob
    return zstandard.ZstdCompressor(level=zstd_level).compress(blob)


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `pack`; a malformed payload raises FedskyError, never a wrong tensor."""
    try:
        if blob[:4] == _ZSTD_MAGIC:
            size = zstandard.frame_content_size(blob)  # -1: not declared (pack always declares)
            if not 0 <= size <= MAX_PAYLOAD_BYTES:
                raise ValueError(f"zstd frame declares {size} bytes")
            blob = zstandard.ZstdDecompressor().decompress(blob)
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
        header = json.loads(meta[_HEADER_KEY])
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError,
            zstandard.ZstdError) as err:
        raise FedskyError(f"malformed payload ({len(blob)} bytes): {err}") from None
    if header.pop("sha256", None) != digest(tensors):
        raise FedskyError(f"corrupted payload ({len(blob)} bytes): its tensors do not match "
                          "the digest in its header")
    return tensors, header


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()
