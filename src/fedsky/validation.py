"""Validation at the boundary: every update is checked before it can touch the global model.

An update comes from another organisation's machine: a bug, a bad GPU or an attacker can put
anything in it. Whatever is wrong with it becomes one FedskyError with a reason, which the
coordinator logs and sends back to the site; the round goes on without that update.
"""

from __future__ import annotations

import math

import torch

from fedsky.codecs import Codec, Params
from fedsky.errors import FedskyError


def decode_update(codec: Codec, tensors: Params, header: dict, global_params: Params,
                  site: str) -> Params:
    """`codec.decode`, where a hostile payload that trips torch (a wrong size, a bad index)
    is a rejection, not a crash of the round."""
    try:
        return codec.decode(tensors, header, global_params)
    except (FedskyError, RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
        raise FedskyError(f"update from {site} cannot be decoded: {err}") from None


def update_norm(delta: Params) -> float:
    """The L2 norm over all tensors of an update, accumulated in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def check_update(delta: Params, global_params: Params, site: str,
                 max_norm: float | None = None) -> None:
    """Raise FedskyError unless `delta` has the global model's tensor names, shapes and
    dtypes, only finite values, and (with `max_norm`) an L2 norm of at most `max_norm`."""
    if delta.keys() != global_params.keys():
        extra, missing = sorted(delta.keys() - global_params), sorted(global_params - delta.keys())
        raise FedskyError(f"update from {site} has different tensor names "
                          f"(unexpected {extra[:3]}, missing {missing[:3]})")
    for name, t in delta.items():
        like = global_params[name]
        if not isinstance(t, torch.Tensor) or t.shape != like.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise FedskyError(f"update from {site}: {name} has shape {shape}, "
                              f"expected {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise FedskyError(f"update from {site}: {name} is {t.dtype}, expected {like.dtype}")
        if not torch.isfinite(t).all():
            raise FedskyError(f"update from {site}: {name} has NaN or Inf values")
    if max_norm is not None:
        norm = update_norm(delta)
        if norm > max_norm:
            raise FedskyError(f"update from {site} has L2 norm {norm:.4g}, over the bound "
                              f"coordinator.max_update_norm = {max_norm:g}")
