"""The asynchronous loop: sites train all the time and updates are applied as they arrive.

A second loop of the same kind as `fedsky.coordinator.run_rounds`, read top to bottom: send
every site the current model; then, arrival by arrival, decode the update, drop it if it is
more than `max_staleness` versions old, let the strategy apply it (`fedsky.async_strategies`)
and send that site the newest model. Every `len(job.sites)` arrivals (one synchronous round's
worth of updates) the model is evaluated, checkpointed and a record written, so `rounds`
records train the token budget of `rounds` synchronous rounds.

Time comes from a clock. `VirtualClock` (simulation, in-process transport): a task sent at
virtual time t arrives at t + its download + tokens / tokens-per-second + its upload, from the
site's profile and the exact payload sizes (`fedsky.accounting.task_seconds`). The site trains
the moment its task is sent, on the model of that moment, and arrivals are taken in
virtual-time order, so an async run's results depend on the job and its seed only, never on
how busy the host is. `RealClock` (gRPC): arrivals in the order the sites really finish.

The budget is counted in local steps, `rounds * len(job.sites) * local_steps` (with
`training.local_steps_by_speed` a slow site's tasks are shorter, so arrivals alone would not
measure it). Each checkpoint holds, besides the model and the strategy's state (FedBuff's
buffer, the server optimizer), the loop's own: version, arrivals, steps, the clock, and every
task in flight with the model it carried. A resumed run sends those tasks again, as sent at the
same clock time, so a virtual-time simulation resumed from any checkpoint ends with the same
model as the uninterrupted run (sites must keep no state between tasks for that: no
`keep_optimizer`, no error-feedback codec).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedsky.accounting import round_accounting, site_local_steps, task_seconds
from fedsky.async_strategies import Arrival, AsyncStrategy
from fedsky.checkpoint import save_checkpoint
from fedsky.config import JobConfig, SiteProfile
from fedsky.coordinator import RoundContext, decode_reply
from fedsky.downlink import Downlink
from fedsky.errors import FedskyError
from fedsky.evaluation import evaluate
from fedsky.model import load_trainable
from fedsky.site import link_seeds
from fedsky.strategies import Params, SiteUpdate
from fedsky.transport.base import Reply, Transport
from fedsky.wire import unpack

log = logging.getLogger("fedsky.async")


class Clock(Protocol):
    virtual: bool  # whether `now` is simulated time (recorded as virtual_time_s)

    @property
    def now(self) -> float:
        """Seconds since the run started."""
        ...

    def send(self, site: str, tag: int, task: bytes, sent_at: float | None = None) -> bool:
        """Send a task; False if the site is gone. `sent_at`: a task sent again after a
        resume, timed as if sent at that clock time."""
        ...

    def resume_at(self, now: float) -> None:
        """Continue from a checkpoint's clock time."""
        ...

    def next(self, timeout_s: float) -> Reply | None:
        """The next arrival, advancing `now` to it; None when nothing more will come."""
        ...


class VirtualClock:
    """Simulation: each reply is computed when its task is sent, and delivered at the virtual
    time the site's profile says it would arrive (ties: in the order sent)."""

    virtual = True

    def __init__(self, transport: Transport, profiles: dict[str, SiteProfile]) -> None:
        self.transport = transport
        self.profiles = profiles
        self.now = 0.0
        self._pending: list[tuple[float, int, Reply]] = []  # a heap by arrival time
        self._sent = itertools.count()

    def send(self, site: str, tag: int, task: bytes, sent_at: float | None = None) -> bool:
        if not self.transport.submit(site, tag, task):
            return False
        reply = self.transport.poll(0.0)  # in-process: the site has answered already
        if reply is None or reply.site != site:
            raise FedskyError("the virtual clock needs a transport that answers at once "
                              "(in-process)")
        up = reply.payload or b""
        tokens = int(unpack(up)[1]["tokens"]) if up else 0
        start = self.now if sent_at is None else sent_at
        done = start + task_seconds(self.profiles[site], tokens, len(task), len(up))
        heapq.heappush(self._pending, (done, next(self._sent), reply))
        return True

    def resume_at(self, now: float) -> None:
        self.now = now

    def next(self, timeout_s: float) -> Reply | None:
        if not self._pending:
            return None
        self.now, _, reply = heapq.heappop(self._pending)
        return reply


class RealClock:
    """Over a network: arrivals as the transport delivers them, timed by the wall clock."""

    virtual = False

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._start = time.perf_counter()

    @property
    def now(self) -> float:
        return time.perf_counter() - self._start

    def send(self, site: str, tag: int, task: bytes, sent_at: float | None = None) -> bool:
        return self.transport.submit(site, tag, task)  # real time: sent now, whatever sent_at

    def resume_at(self, now: float) -> None:
        self._start = time.perf_counter() - now  # the downtime does not count

    def next(self, timeout_s: float) -> Reply | None:
        return self.transport.poll(timeout_s)


@dataclass
class Task:
    """A task in flight: the model it carried, how many bytes that took, when it left."""

    tag: int  # the site's task count: its seeds, and the downlink's "round"
    version: int  # the global model's version when sent
    base: Params  # that model
    down_bytes: int
    steps: int  # local steps it trains (the budget's unit)
    sent_at: float  # clock time when sent
    seq: int  # send order in the run (a resume sends tasks again in this order)


@dataclass
class Progress:
    """The loop's bookkeeping; checkpointed with the model (`loop_state`)."""

    version: int = 0  # how many times the global model stepped
    arrived: int = 0  # updates arrived (applied, dropped as stale, or rejected)
    steps: int = 0  # local steps those updates trained
    records: int = 0  # records written (the next one's index)
    sent: int = 0  # tasks sent


@dataclass
class Window:
    """What happened since the last record."""

    arrivals: list[dict[str, Any]] = field(default_factory=list)
    updates: list[SiteUpdate] = field(default_factory=list)  # decoded, applied or not
    weights: dict[str, list[float]] = field(default_factory=dict)  # applied, per site
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    messages_up: dict[str, int] = field(default_factory=dict)
    messages_down: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)


def _count(sizes: dict[str, int], counts: dict[str, int], site: str, n_bytes: int) -> None:
    sizes[site] = sizes.get(site, 0) + n_bytes
    counts[site] = counts.get(site, 0) + 1


def send_task(clock: Clock, downlink: Downlink, win: Window, job: JobConfig, site: str,
              tag: int, params: Params, version: int, steps: int, prog: Progress,
              sent_at: float | None = None) -> Task | None:
    """The site's task: the model `params`, as a delta from the one it holds if it can.
    `sent_at`: a task in flight at a checkpoint, sent again on resume."""
    task = downlink.tasks(tag, [site], params, link_seeds(job.seed, tag, None))[site]
    if not clock.send(site, tag, task, sent_at):
        downlink.settle(site, replied=False)
        return None
    _count(win.bytes_down, win.messages_down, site, len(task))
    prog.sent += 1
    return Task(tag, version, params, len(task), steps,
                clock.now if sent_at is None else sent_at, prog.sent - 1)


def run_async(job: JobConfig, clock: Clock, sites: list[str], global_params: Params,
              ctx: RoundContext, state: dict[str, Any],
              resumed: dict[str, Any] | None = None) -> Params:
    """Train until `rounds * len(job.sites) * local_steps` local steps have arrived; returns
    the final model. `resumed`: the loop's part of a checkpoint (`loop_state`)."""
    strategy: AsyncStrategy = ctx.strategy
    limit = job.strategy.max_staleness  # type: ignore[union-attr]
    per_record = len(job.sites) * job.training.local_steps  # one synchronous round's steps
    budget = job.rounds * per_record
    steps = {s.name: site_local_steps(job, i) for i, s in enumerate(job.sites)}
    bandwidth = {s.name: s.profile.bandwidth_mbps for s in job.sites}
    # What each site holds: the initial model at the start; after a resume, unknown.
    downlink = Downlink(ctx.codec.downlink, global_params if resumed is None else None)
    win = Window()
    inflight: dict[str, Task] = {}
    if resumed is None:
        prog, alive = Progress(), list(sites)
        again: list[tuple[str, Task | None]] = [(site, None) for site in sites]
    else:
        prog, alive, tasks = restore(resumed, sites, global_params)
        clock.resume_at(resumed["clock_s"])
        again = sorted(tasks.items(), key=lambda kv: kv[1].seq)
    for site, old in again:
        task = (send_task(clock, downlink, win, job, site, 0, global_params, 0, steps[site],
                          prog) if old is None else
                send_task(clock, downlink, win, job, site, old.tag, old.base, old.version,
                          old.steps, prog, old.sent_at))
        if task is not None:
            inflight[site] = task
        else:
            leave(site, "gone before its first task", alive, win)
    marks = (time.perf_counter(), clock.now)  # wall and clock time at the last record
    while prog.steps < budget and inflight:
        if len(alive) < job.coordinator.min_sites:
            ctx.log.info(f"stopping: {len(alive)} site(s) left, quorum is "
                         f"{job.coordinator.min_sites}")
            break
        reply = clock.next(job.coordinator.round_deadline_s)
        if reply is None:
            ctx.log.info(f"stopping: no update within {job.coordinator.round_deadline_s:g}s "
                         f"from {', '.join(sorted(inflight))}")
            break
        site = reply.site
        task = inflight.get(site)
        if task is None or reply.tag not in (None, task.tag):
            log.info("discarded a reply from %s for task %s (not in flight)", site, reply.tag)
            continue
        del inflight[site]
        downlink.settle(site, reply.payload is not None)
        if reply.payload is None:  # failed or disconnected: it leaves the run
            leave(site, reply.reason, alive, win)
            continue

        prog.arrived += 1
        prog.steps += task.steps
        _count(win.bytes_up, win.messages_up, site, len(reply.payload))
        staleness = prog.version - task.version
        entry: dict[str, Any] = {"site": site, "staleness": staleness, "clock_s": clock.now}
        try:
            update = decode_reply(reply.payload, task.tag, site, global_params,
                                  ctx.codec.uplink, bandwidth[site])
        except FedskyError as err:
            log.warning("rejected an update from %s: %s", site, err)
            entry["dropped"] = f"rejected: {err}"
        else:
            win.updates.append(update)
            if limit is not None and staleness > limit:
                entry["dropped"] = "stale"
            else:
                entry["weight"] = strategy.weight(staleness)
                win.weights.setdefault(site, []).append(entry["weight"])
                global_params, state, stepped = strategy.receive(
                    global_params, Arrival(update, task.base, staleness,
                                           clock.now - task.sent_at), state)
                prog.version += stepped
        win.arrivals.append(entry)
        committed = prog.steps + sum(t.steps for t in inflight.values())
        if committed + steps[site] <= budget:
            task = send_task(clock, downlink, win, job, site, task.tag + 1, global_params,
                             prog.version, steps[site], prog)
            if task is not None:
                inflight[site] = task
            else:
                leave(site, "gone before its next task", alive, win)
        if prog.steps >= (prog.records + 1) * per_record:
            rec = write_record(job, ctx, prog.records, win, global_params, prog.version,
                               clock, marks)
            checkpoint(ctx, prog, global_params, state, alive, inflight, clock, rec)
            marks, win = (time.perf_counter(), clock.now), Window()
    if win.arrivals or win.lost:  # the run stopped between records
        rec = write_record(job, ctx, prog.records, win, global_params, prog.version, clock,
                           marks)
        checkpoint(ctx, prog, global_params, state, alive, inflight, clock, rec)
    return global_params


def leave(site: str, reason: str | None, alive: list[str], win: Window) -> None:
    """A site failed, disconnected or could not be sent a task: it is out, and the record
    says so."""
    log.warning("site %s left the run: %s", site, reason)
    alive.remove(site)
    win.lost.append(site)


def checkpoint(ctx: RoundContext, prog: Progress, global_params: Params,
               state: dict[str, Any], alive: list[str], inflight: dict[str, Task],
               clock: Clock, rec: dict[str, Any]) -> None:
    """After record `rec` (number `prog.records`): count it, and save the model, the
    strategy's state (FedBuff's buffer, its server optimizer) and the loop's (`loop_state`)."""
    prog.records += 1
    save_checkpoint(ctx.checkpoint_path, prog.records - 1, global_params,
                    {"strategy": state, "loop": loop_state(prog, alive, inflight, clock.now)},
                    {"contributors": rec["participants"], "dropped": rec["dropped"]})


def loop_state(prog: Progress, alive: list[str], inflight: dict[str, Task],
               clock_s: float) -> dict[str, Any]:
    """Plain dicts and tensors for a checkpoint. Tasks sent at the same version carried the
    same model, which is stored once, and not at all if it is the current one."""
    return {
        **asdict(prog),
        "clock_s": clock_s,
        "alive": list(alive),
        "inflight": {site: {k: v for k, v in asdict(t).items() if k != "base"}
                     for site, t in inflight.items()},
        "bases": {t.version: t.base for t in inflight.values() if t.version != prog.version},
    }


def restore(saved: dict[str, Any], joined: list[str], global_params: Params
            ) -> tuple[Progress, list[str], dict[str, Task]]:
    """The loop's bookkeeping from `loop_state`: progress, the sites still in the run (alive
    then, and joined again now), and their tasks in flight."""
    prog = Progress(**{k: saved[k] for k in asdict(Progress())})
    alive = [s for s in saved["alive"] if s in joined]
    bases = {**saved["bases"], prog.version: global_params}
    tasks = {site: Task(base=bases[t["version"]], **t)
             for site, t in saved["inflight"].items() if site in alive}
    return prog, alive, tasks


def write_record(job: JobConfig, ctx: RoundContext, r: int, win: Window, global_params: Params,
                 version: int, clock: Clock, marks: tuple[float, float]) -> dict[str, Any]:
    """Evaluate the current model, log the window as record `r` (returned)."""
    t_eval = time.perf_counter()
    load_trainable(ctx.model, global_params)
    ev = evaluate(ctx.model, ctx.eval_data, job.training.batch_size, ctx.device)
    now = time.perf_counter()
    order = [s.name for s in job.sites]
    applied = {a["site"] for a in win.arrivals if "dropped" not in a}
    dropped = {a["site"] for a in win.arrivals if "dropped" in a} | set(win.lost)
    fp32_bytes = 4 * sum(t.numel() for t in global_params.values())
    rec: dict[str, Any] = {
        "round": r,
        "version": version,  # how many times the global model has stepped
        "arrivals": win.arrivals,
        "selected": [s for s in order if s in win.bytes_up or s in win.bytes_down],
        "participants": [s for s in order if s in applied],
        "dropped": [s for s in order if s in dropped],
        "stale_dropped": sum(a.get("dropped") == "stale" for a in win.arrivals),
        "lost": win.lost,
        "bytes_up": win.bytes_up,
        "bytes_down": win.bytes_down,
        "messages_up": win.messages_up,
        "messages_down": win.messages_down,
        **round_accounting(job, win.bytes_up, win.bytes_down, fp32_bytes, win.messages_up,
                           win.messages_down),
        "sites": site_stats(win),
        "eval_loss": ev.loss,
        "perplexity": ev.perplexity,
        "accuracy": ev.accuracy,
        "eval_s": now - t_eval,
        "wall_s": now - marks[0],  # real time since the last record, evaluation included
    }
    if clock.virtual:
        rec["virtual_time_s"] = clock.now - marks[1]  # since the last record
        rec["virtual_clock_s"] = clock.now
    ctx.log.round(rec)
    return rec


def site_stats(win: Window) -> dict[str, dict[str, Any]]:
    """Per site over the window: updates that arrived, their loss, tokens, compute, weight."""
    out: dict[str, dict[str, Any]] = {}
    for u in win.updates:
        st = out.setdefault(u.site, {"updates": 0, "tokens": 0, "compute_s": 0.0,
                                     "num_samples": u.num_samples, "losses": []})
        st["updates"] += 1
        st["tokens"] += u.tokens
        st["compute_s"] += u.compute_s
        st["losses"].append(u.train_loss)
    for site, st in out.items():
        losses = st.pop("losses")
        st["train_loss"] = math.fsum(losses) / len(losses)
        if win.weights.get(site):
            st["weight"] = math.fsum(win.weights[site]) / len(win.weights[site])
    return out
