"""A multi-process site: `torchrun --nproc-per-node N -m fedsky worker ...`.

One site, N processes (one per GPU, or CPU processes for tests), joined by torch.distributed:
NCCL between GPUs, gloo on CPUs. Only rank 0 talks to the coordinator. It broadcasts the
setup and every round's task (the encoded global model) to the other ranks, so every rank
decodes the same global parameters and loads them; each then trains its share of every batch
under DistributedDataParallel (`fedsky.training.train_steps`), and rank 0 alone encodes and
sends the site's update (and answers secure aggregation's later phases, which train nothing). Nothing here is home-made parallelism: the gradient averaging is DDP's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedsky.errors import FedskyError
from fedsky.training import Ranks

log = logging.getLogger("fedsky.distributed")

# Ranks other than 0 wait in a broadcast while the coordinator gathers a round from all sites
# (its deadline, or a slow join), so their collectives may wait far longer than torch's default.
WAIT = timedelta(hours=24)
_SETUP, _TASK, _STOP = 0, 1, 2


@dataclass(frozen=True)
class Group:
    """This process's place in its site's process group."""

    ranks: Ranks
    device: torch.device  # cuda:LOCAL_RANK with NCCL, cpu with gloo

    @property
    def leader(self) -> bool:
        return self.ranks.rank == 0


def init_from_env() -> Group | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*);
    None when this process runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise FedskyError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                              "devices: start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=WAIT)
    group = Group(Ranks(dist.get_rank(), dist.get_world_size()), device)
    log.info("rank %d of %d (%s on %s)", group.ranks.rank, group.ranks.world, backend, device)
    return group


def wrap(model: torch.nn.Module, group: Group) -> torch.nn.Module:
    """DistributedDataParallel over the trainable parameters (LoRA: the adapters alone)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def broadcast(group: Group, kind: int, blob: bytes = b"") -> tuple[int, bytes]:
    """Rank 0's (kind, bytes) on every rank: a length header, then the bytes as uint8."""
    head = torch.tensor([kind, len(blob)], dtype=torch.int64, device=group.device)
    dist.broadcast(head, src=0)
    kind, size = int(head[0]), int(head[1])
    if size == 0:
        return kind, b""
    if group.leader:
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(group.device)
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=group.device)
    dist.broadcast(buf, src=0)
    return kind, blob if group.leader else buf.cpu().numpy().tobytes()


def serve_site_group(address: str, site: str, data_path: str | None, group: Group, *,
                     token: str = "", tls: Any = None, connect_retries: int = 5) -> None:
    """Run one rank of a multi-process site until the coordinator is done."""
    from fedsky.site import handle_task, open_site, train_round
    from fedsky.transport.grpc_worker import serve_site
    from fedsky.wire import unpack

    try:
        if not group.leader:
            return _follow(site, data_path, group)

        def factory(name: str, setup: bytes):
            broadcast(group, _SETUP, setup)
            state = open_site(name, setup, data_path, group)

            def handle(task: bytes) -> bytes:
                tensors, header = unpack(task)
                if header.get("phase", "train") != "train":  # secure aggregation: rank 0's
                    return handle_task(state, task)
                broadcast(group, _TASK, task)
                return train_round(state, tensors, header)

            return handle

        try:
            serve_site(address, site, factory, token=token, tls=tls,
                       connect_retries=connect_retries)
        finally:
            broadcast(group, _STOP)
    finally:
        dist.destroy_process_group()


def _follow(site: str, data_path: str | None, group: Group) -> None:
    """Ranks > 0: do what rank 0 broadcasts (open the site, train a round) until STOP."""
    from fedsky.site import open_site, train_round
    from fedsky.wire import unpack

    state = None
    while True:
        kind, blob = broadcast(group, -1)  # kind and bytes come from rank 0
        if kind == _STOP:
            return
        if kind == _SETUP:
            state = open_site(site, blob, data_path, group)
        elif state is not None:
            try:
                train_round(state, *unpack(blob))
            except Exception:
                log.exception("site %s rank %d: the round failed", site, group.ranks.rank)
