"""Atomic checkpoints: global tensors plus strategy state, in one safetensors file.

Strategy state may nest dicts and lists (a torch optimizer's state_dict does); tensors are
stored by path and the rest of the structure as JSON in the file's metadata. What the state
holds: the server optimizer's state_dict (FedOpt), and with [privacy] the accountant's events,
the adaptive clip and the sites' privacy reports, from which the central noise generator is
reseeded (secure mode draws it from the OS instead, by design). Beside it, `info` records which
sites contributed to the round (`checkpoint_info`). Nothing else needs saving for synchronous
rounds: site sampling is seeded by (seed, round) and secure-aggregation keys are fresh each
round. An async run's state adds the loop's own beside the strategy's (FedBuff's buffer and
server optimizer): see `fedsky.async_loop.loop_state`. Not held: a CKKS context (the sites get
a new one when a resumed run starts) and the sites' own state (their error-feedback residuals
and optimizers live at the sites).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedsky.errors import FedskyError

_TENSOR = "__tensor__"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by references into `tensors`; keep everything else JSON-able."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint state keys must be str or int at {path}")
        # JSON keys are strings; int keys (torch optimizer state) are tagged to restore them.
        return {("i:" if isinstance(k, int) else "s:") + str(k): _flatten(v, f"{path}/{k}", tensors)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {(int(k[2:]) if k.startswith("i:") else k[2:]): _unflatten(v, tensors)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    path: Path, round_idx: int, params: dict[str, torch.Tensor], state: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half checkpoint.
    `info`: JSON-able facts about the round (which sites contributed), for `checkpoint_info`."""
    tensors = {f"global/{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    skeleton = _flatten(state, "state", tensors)
    tmp = path.with_suffix(".tmp")
    # safetensors sorts names; the order matters (a server optimizer's state is by position).
    meta = {"round": str(round_idx), "state": json.dumps(skeleton),
            "order": json.dumps(list(params)), "info": json.dumps(info or {})}
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(last completed round, global tensors, strategy state)."""
    if not path.is_file():
        raise FedskyError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = {k: tensors[f"global/{k}"] for k in json.loads(meta["order"])}
    state = _unflatten(json.loads(meta["state"]), tensors)
    return int(meta["round"]), params, state


def checkpoint_info(path: Path) -> dict[str, Any]:
    """The `info` a checkpoint was saved with ({} for one written without)."""
    if not path.is_file():
        raise FedskyError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata().get("info", "{}"))
