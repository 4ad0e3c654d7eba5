"""The synchronous round loop: select, send, gather, decode, aggregate, evaluate, checkpoint.

One function, read top to bottom. It knows nothing of processes or sockets (the transport)
nor of how updates are combined (the strategy) or encoded (the codec).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky.accounting import round_accounting, task_seconds
from fedsky.checkpoint import save_checkpoint
from fedsky.codecs import Codec, Codecs
from fedsky.config import JobConfig
from fedsky.downlink import Downlink
from fedsky.dp_aggregation import account_round, read_report
from fedsky.errors import FedskyError
from fedsky.evaluation import evaluate
from fedsky.metrics import RunLog
from fedsky.model import load_trainable
from fedsky.secure_round import he_setup, run_secure_round
from fedsky.secure_site import routes
from fedsky.site import link_seeds
from fedsky.strategies import Params, SiteUpdate, Strategy
from fedsky.streaming import RoundSum, why_not_streamed
from fedsky.transport.base import Transport
from fedsky.validation import check_update, decode_update
from fedsky.wire import unpack

log = logging.getLogger("fedsky.coordinator")


@dataclass
class RoundContext:
    """What the loop needs besides the job: the global model and where things go."""

    model: torch.nn.Module  # holds the global trainable tensors between rounds, for evaluation
    eval_data: torch.Tensor  # (N, T)
    device: torch.device
    strategy: Strategy  # in `fedsky.async_loop.run_async`, an AsyncStrategy
    codec: Codecs  # the coordinator's: decodes uplinks, encodes the downlink
    log: RunLog
    checkpoint_path: Path


def select_sites(job: JobConfig, round_idx: int, available: list[str]) -> list[str]:
    """All available sites, or a seeded sample of `sites_per_round` in config order."""
    k = job.coordinator.sites_per_round
    if k is None or k >= len(available):
        return list(available)
    rng = np.random.default_rng([job.seed, round_idx])
    chosen = set(rng.choice(len(available), size=k, replace=False).tolist())
    return [s for i, s in enumerate(available) if i in chosen]


def _float_or_nan(value: object) -> float:
    """Probe losses are sent only when the strategy reads them."""
    return math.nan if value is None else float(value)


def decode_reply(blob: bytes, round_idx: int, site: str, global_params: Params,
                 codec: Codec, bandwidth_mbps: float,
                 max_norm: float | None = None) -> SiteUpdate:
    """Validate at the boundary: right round and site, then `validation.check_update`."""
    tensors, header = unpack(blob)
    if header.get("round") != round_idx or header.get("site") != site:
        raise FedskyError(f"reply from {site} is for round {header.get('round')} "
                          f"of site {header.get('site')}, expected round {round_idx}")
    delta = decode_update(codec, tensors, header.get("codec", {}), global_params, site)
    check_update(delta, global_params, site, max_norm)
    return site_update(site, header, delta, bandwidth_mbps)


def site_update(site: str, header: dict[str, Any], delta: Params,
                bandwidth_mbps: float) -> SiteUpdate:
    """A site's update from its reply header (`delta` is {} when it went into a RoundSum)."""
    return SiteUpdate(
        site=site,
        delta=delta,
        num_samples=int(header["num_samples"]),
        tokens=int(header["tokens"]),
        train_loss=float(header["train_loss"]),
        compute_s=float(header["compute_s"]),
        loss_before=_float_or_nan(header.get("loss_before")),
        loss_after=_float_or_nan(header.get("loss_after")),
        bandwidth_mbps=bandwidth_mbps,
        privacy=read_report(header.get("privacy"), site),
    )


def gather_updates(job: JobConfig, transport: Transport, r: int, tasks: dict[str, bytes],
                   global_params: Params, codec: Codec) -> tuple[list[SiteUpdate], dict[str, Any]]:
    """The plain round: every site's update decoded and checked (the coordinator reads them)."""
    replies = transport.exchange(r, tasks, job.coordinator.round_deadline_s)
    bandwidth = {s.name: s.profile.bandwidth_mbps for s in job.sites}  # declared, Mbit/s
    updates: list[SiteUpdate] = []
    rejected: dict[str, str] = {}
    for site in tasks:  # config order, whatever order replies came in
        if site in replies:
            try:
                updates.append(decode_reply(replies[site], r, site, global_params, codec,
                                            bandwidth[site], job.coordinator.max_update_norm))
            except FedskyError as err:
                rejected[site] = str(err)
                log.warning("round %d: rejected update from %s: %s", r, site, err)
                transport.reject(r, site, str(err))
    return updates, {
        "replies": replies,
        "dropped": [s for s in tasks if s not in replies] + sorted(rejected),
        "bytes_up": {s: len(replies[s]) for s in tasks if s in replies},
    }


def gather_streamed(job: JobConfig, transport: Transport, r: int, tasks: dict[str, bytes],
                    global_params: Params, spill_dir: Path | None = None,
                    ) -> tuple[list[SiteUpdate], dict[str, Any]]:
    """The plain round with streaming aggregation (`fedsky.streaming`): each reply is folded
    into one running sum as it arrives; `got["mean"]` is the accepted sites' weighted mean
    delta (None when there are none). A refused update is left out as on the buffered path:
    what of it had been folded is subtracted again, from its undo log in `spill_dir`
    (with `coordinator.streaming_undo` off, `got["void"]` says why the round is void)."""
    acc = RoundSum(global_params, r, job.strategy, job.coordinator.max_update_norm, spill_dir,
                   job.coordinator.streaming_undo)
    results = transport.exchange(r, tasks, job.coordinator.round_deadline_s, sink=acc.open)
    bandwidth = {s.name: s.profile.bandwidth_mbps for s in job.sites}  # declared, Mbit/s
    updates: list[SiteUpdate] = []
    rejected: list[str] = []
    for site in tasks:  # config order, whatever order replies came in
        res = results.get(site)
        if res is None:
            continue
        if res.error is not None:
            rejected.append(site)
            log.warning("round %d: rejected update from %s: %s", r, site, res.error)
            transport.reject(r, site, res.error)
            continue
        updates.append(site_update(site, res.header, {}, bandwidth[site]))
    accepted = {u.site for u in updates}
    acc.uploads.settle(accepted)  # takes back what refused uploads had folded
    for site, why in acc.uploads.undone.items():
        log.info("round %d: the part of %s's update already summed was taken back out (%s)",
                 r, site, why)
    return updates, {
        "replies": results,
        "dropped": [s for s in tasks if s not in results] + sorted(rejected),
        "bytes_up": {s: results[s].size for s in tasks if s in results},
        "void": acc.uploads.void,
        "mean": acc.mean(accepted) if updates and acc.uploads.void is None else None,
    }


def run_rounds(
    job: JobConfig,
    transport: Transport,
    sites: list[str],
    global_params: Params,
    ctx: RoundContext,
    state: dict[str, Any],
    start_round: int = 0,
) -> Params:
    """Run rounds `start_round .. job.rounds - 1`; returns the final global tensors."""
    profiles = {s.name: s.profile for s in job.sites}
    # What each site holds: at the start, the initial model every site built; after a restart,
    # unknown (so each site gets the whole model once).
    downlink = Downlink(ctx.codec.downlink, global_params if start_round == 0 else None)
    fp32_bytes = 4 * sum(t.numel() for t in global_params.values())  # one dense fp32 update
    he_public = None
    streamed = False
    if job.coordinator.streaming:
        why_not = why_not_streamed(job, global_params)
        streamed = why_not is None
        if why_not is not None:
            log.warning("coordinator.streaming: every update is buffered instead, because %s",
                        why_not)
    if job.secure is not None and routes(job, list(global_params))["he"]:
        he_public, sites = he_setup(job, transport, sites, start_round)
    for r in range(start_round, job.rounds):
        t0 = time.perf_counter()
        selected = select_sites(job, r, sites)
        tasks = downlink.tasks(r, selected, global_params, link_seeds(job.seed, r, None))
        mean, void = None, None
        if job.secure is None:
            if streamed:
                updates, got = gather_streamed(job, transport, r, tasks, global_params,
                                               ctx.checkpoint_path.parent)
                mean, void = got["mean"], got["void"]
            else:
                updates, got = gather_updates(job, transport, r, tasks, global_params,
                                              ctx.codec.uplink)
            replies, dropped, bytes_up = got["replies"], got["dropped"], got["bytes_up"]
            bytes_down = {s: len(tasks[s]) for s in selected}
        else:
            sec = run_secure_round(job, transport, r, tasks, global_params, he_public,
                                   streamed, ctx.checkpoint_path.parent)
            replies, updates, mean = sec.trained, sec.updates, sec.mean
            dropped, bytes_up, bytes_down = list(sec.dropped), sec.bytes_up, sec.bytes_down
        downlink.confirm(replies)
        rec: dict[str, Any] = {
            "round": r,
            "selected": selected,
            "participants": [u.site for u in updates],
            "dropped": dropped,
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
        }
        if job.secure is not None:
            rec["secure"] = {**sec.info, "dropped": sec.dropped}
        rec.update(round_accounting(job, rec["bytes_up"], rec["bytes_down"], fp32_bytes))
        # What the clouds would take: the slowest participant's task by its profile.
        rec["virtual_time_s"] = max((task_seconds(profiles[u.site], u.tokens,
                                                  bytes_down.get(u.site, 0),
                                                  bytes_up.get(u.site, 0)) for u in updates),
                                    default=0.0)
        if (void is not None or len(updates) < job.coordinator.min_sites
                or (job.secure is not None and mean is None)):
            rec["skipped"] = void or (sec.failed if job.secure is not None and sec.failed else (
                f"{len(updates)} update(s), quorum is {job.coordinator.min_sites}"))
            rec["wall_s"] = time.perf_counter() - t0
            ctx.log.round(rec)
            continue

        if mean is None:
            weights = ctx.strategy.weights(updates, state)
            global_params, state = ctx.strategy.aggregate(global_params, updates, state)
        else:  # streamed: the weights came with the sum; secure: the coordinator never saw them
            weights = (ctx.strategy.weights(updates, state) if job.secure is None
                       else {u.site: math.nan for u in updates})
            global_params, state = ctx.strategy.step(global_params, mean, state, updates)
        round_s = time.perf_counter() - t0

        t_eval = time.perf_counter()
        load_trainable(ctx.model, global_params)
        ev = evaluate(ctx.model, ctx.eval_data, job.training.batch_size, ctx.device)
        eval_s = time.perf_counter() - t_eval

        rec.update(
            eval_loss=ev.loss,
            perplexity=ev.perplexity,
            accuracy=ev.accuracy,
            round_s=round_s,  # exchange + decode + aggregate (no evaluation)
            eval_s=eval_s,
            wall_s=round_s + eval_s,
            sites={u.site: _site_record(u, weights[u.site]) for u in updates},
        )
        stop = account_round(job, rec, state) if job.privacy is not None else None
        ctx.log.round(rec)
        # After the metrics line: a crash in between leaves the checkpoint one round behind,
        # and resuming redoes that round (its metrics line is replaced).
        save_checkpoint(ctx.checkpoint_path, r, global_params, state,
                        {"contributors": rec["participants"], "dropped": dropped})
        if stop is not None:  # the privacy budget would not survive another round
            ctx.log.info(stop)
            break
    return global_params


def _site_record(u: SiteUpdate, weight: float) -> dict[str, Any]:
    """A site's line in the round record; what a secure round does not reveal is left out."""
    rec: dict[str, Any] = {"tokens": u.tokens, "compute_s": u.compute_s}
    optional = {"train_loss": u.train_loss, "loss_before": u.loss_before,
                "loss_after": u.loss_after, "weight": weight}
    rec.update({k: v for k, v in optional.items() if not math.isnan(v)})
    if u.num_samples:
        rec["num_samples"] = u.num_samples
    return rec
