"""Asynchronous training: staleness functions, FedAsync and FedBuff math, the virtual clock,
staleness drops, site profiles and presets, config rules, and a gRPC run that loses a site."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_job
from fedsky.accounting import site_local_steps, task_seconds
from fedsky.async_loop import RealClock, run_async
from fedsky.async_strategies import Arrival, FedAsync, FedBuff, make_async_strategy, mix
from fedsky.async_strategies import staleness_weight as s
from fedsky.checkpoint import checkpoint_info, load_checkpoint
from fedsky.codecs import make_codec
from fedsky.config import (
    FedAsyncConfig,
    FedBuffConfig,
    FedOptConfig,
    SiteProfile,
    StalenessConfig,
    load_job,
)
from fedsky.coordinator import RoundContext
from fedsky.errors import FedskyError
from fedsky.metrics import RunLog, read_metrics
from fedsky.model import trainable_state
from fedsky.profiles import PRESETS, REFERENCE_TOKENS_PER_S
from fedsky.runner import grpc_security, grpc_transport, prepare, run_federated, spawn_workers
from fedsky.site import make_setup, site_factory
from fedsky.strategies import FedOpt, SiteUpdate

# Measured times: everything else in an async simulation's records must repeat exactly.
TIMING = {"round_s", "eval_s", "wall_s", "compute_s", "transfer_s"}
FEDBUFF = '\n[strategy]\nname = "fedbuff"\n'


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _update(site: str, delta: dict[str, torch.Tensor], n: int = 10) -> SiteUpdate:
    return SiteUpdate(site=site, delta=delta, num_samples=n, tokens=0, train_loss=0.0,
                      compute_s=0.0)


def _run(tmp_path: Path, corpus: Path, strategy: str, *overrides: str, rounds: int = 2):
    job, job_dir = load_job(tiny_job(tmp_path, corpus, "threads = 1\n" + strategy,
                                     rounds=rounds), list(overrides))
    summary = run_federated(job, job_dir, "inprocess")
    return summary, read_metrics(Path(summary["output_dir"]))


# ---- pure math -------------------------------------------------------------------------------

def test_staleness_functions_match_their_closed_forms() -> None:
    const = StalenessConfig(fn="constant")
    poly = StalenessConfig(fn="polynomial", a=0.5)
    hinge = StalenessConfig(fn="hinge", a=10, b=4)
    for t in range(12):
        assert s(const, t) == 1.0
        assert s(poly, t) == pytest.approx(1 / math.sqrt(t + 1), rel=1e-12)
        assert s(StalenessConfig(fn="polynomial", a=2), t) == pytest.approx(1 / (t + 1) ** 2)
        assert s(hinge, t) == (1.0 if t <= 4 else pytest.approx(1 / (10 * (t - 4) + 1)))
    assert s(hinge, 5) == pytest.approx(1 / 11) and s(hinge, 6) == pytest.approx(1 / 21)
    with pytest.raises(ValueError):
        s(poly, -1)


def test_fedasync_mixes_the_site_model_with_alpha_times_staleness() -> None:
    x = {"w": torch.tensor([1.0, 2.0, 3.0])}
    base = {"w": torch.tensor([0.0, 1.0, 1.0])}  # an older model the site started from
    delta = {"w": torch.tensor([0.5, -1.0, 2.0])}
    strat = FedAsync(FedAsyncConfig(alpha=0.6, staleness=StalenessConfig(fn="polynomial", a=0.5)))
    new, _, stepped = strat.receive(x, Arrival(_update("a", delta), base, staleness=3), {})
    a = 0.6 / math.sqrt(4)
    torch.testing.assert_close(new["w"], (1 - a) * x["w"] + a * (base["w"] + delta["w"]))
    assert stepped and strat.weight(3) == pytest.approx(a)
    torch.testing.assert_close(mix(x, base, 1.0)["w"], base["w"])


def test_fedbuff_steps_the_server_optimizer_every_k_updates_on_their_scaled_mean() -> None:
    server = FedOptConfig(optimizer="adam", lr=0.1)
    cfg = FedBuffConfig(buffer_size=3, staleness=StalenessConfig(fn="polynomial", a=1.0),
                        server=server)
    strat = FedBuff(cfg, n_sites=3)
    x = {"w": torch.tensor([1.0, -1.0]), "b": torch.tensor([0.5])}
    deltas = [{"w": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3])},
              {"w": torch.tensor([-0.4, 0.1]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([0.2, 0.2]), "b": torch.tensor([-0.6])}]
    stalenesses, sizes = [0, 1, 3], [10, 20, 30]
    state = strat.init_state(x)
    params = x
    for i, (d, t, n) in enumerate(zip(deltas, stalenesses, sizes, strict=True)):
        params, state, stepped = strat.receive(
            params, Arrival(_update("abc"[i], d, n), x, t), state)
        assert stepped == (i == 2)
        if i < 2:
            assert params is x  # the model waits for the buffer to fill
    assert state["buffer"] == []
    # Oracle: FedOpt on the same updates, each delta scaled by s(t) = 1 / (t + 1).
    scaled = [_update("abc"[i], {k: v / (t + 1) for k, v in d.items()}, n)
              for i, (d, t, n) in enumerate(zip(deltas, stalenesses, sizes, strict=True))]
    expected, _ = FedOpt(server).aggregate(x, scaled, {})
    for k in x:
        torch.testing.assert_close(params[k], expected[k], rtol=0, atol=1e-7)


def test_time_weighted_fedbuff_weighs_each_update_by_sequences_times_task_seconds() -> None:
    strat = FedBuff(FedBuffConfig(buffer_size=3, time_weighted=True,
                                  staleness=StalenessConfig(fn="polynomial", a=1.0)), 3)
    x = {"w": torch.tensor([1.0, -2.0])}
    deltas = [torch.tensor([0.3, 0.0]), torch.tensor([0.0, 0.6]), torch.tensor([-0.9, 0.3])]
    sizes, seconds, stalenesses = [50, 50, 30], [1.0, 1.0, 4.0], [0, 1, 2]
    state, params = strat.init_state(x), x
    for i in range(3):
        params, state, _ = strat.receive(params, Arrival(
            _update("aab"[i], {"w": deltas[i]}, sizes[i]), x, stalenesses[i], seconds[i]), state)
    # sgd lr 1: x + sum(n t s(t) delta) / sum(n t); the slow site's one update weighs 120,
    # as much as the fast site's two together
    w = [n * t for n, t in zip(sizes, seconds, strict=True)]
    mean = sum(wi * d / (t + 1) for wi, d, t in zip(w, deltas, stalenesses, strict=True)) / sum(w)
    torch.testing.assert_close(params["w"], x["w"] + mean)
    with pytest.raises(ValueError, match="choose one"):
        FedBuffConfig(time_weighted=True, delayed_nesterov=True, server=FedOptConfig(
            momentum=0.5, nesterov=True, weighting="uniform"))


def test_delayed_nesterov_over_k_fresh_updates_is_one_nesterov_step_on_their_mean() -> None:
    server = FedOptConfig(optimizer="sgd", lr=0.7, momentum=0.9, nesterov=True,
                          weighting="uniform")
    strat = FedBuff(FedBuffConfig(buffer_size=3, delayed_nesterov=True, server=server), 3)
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(4, generator=gen), "b": torch.randn(2, generator=gen)}
    state, params, oracle, oracle_state = strat.init_state(x), x, x, {}
    for step in range(2):  # the second step carries momentum
        deltas = [{k: torch.randn(v.shape, generator=gen) for k, v in x.items()}
                  for _ in range(3)]
        for i, d in enumerate(deltas):
            before = params
            params, state, stepped = strat.receive(params, Arrival(_update("abc"[i], d),
                                                                   oracle, 0), state)
            assert stepped  # every arrival is a version: the site gets it at once
            if i < 2:  # lr / K of the delta, no momentum yet
                for k in x:
                    torch.testing.assert_close(params[k], before[k] + 0.7 / 3 * d[k])
        oracle, oracle_state = FedOpt(server).aggregate(
            oracle, [_update("abc"[i], d) for i, d in enumerate(deltas)], oracle_state)
        for k in x:
            torch.testing.assert_close(params[k], oracle[k], rtol=0, atol=1e-6)
        assert state["count"] == 0
    # staleness scales the update: a 3-versions-old one counts s(3) = 1/2 (polynomial, a = 0.5)
    d = {k: torch.ones_like(v) for k, v in x.items()}
    moved, _, _ = strat.receive(params, Arrival(_update("a", d), oracle, 3), state)
    torch.testing.assert_close(moved["w"], params["w"] + 0.7 / 3 * 0.5)


def test_task_seconds_is_download_plus_compute_plus_upload() -> None:
    p = SiteProfile(tokens_per_s=1000, bandwidth_mbps=8, latency_ms=10)
    # 1 MB down at 8 Mbit/s = 1 s; 500 tokens at 1000/s = 0.5 s; 2 MB up = 2 s; 2 x 10 ms
    assert task_seconds(p, 500, 1_000_000, 2_000_000) == pytest.approx(3.52)
    slow = SiteProfile(compute=0.25, up_mbps=4, bandwidth_mbps=8)
    assert task_seconds(slow, 2500, 0, 1_000_000) == pytest.approx(
        2500 / (0.25 * REFERENCE_TOKENS_PER_S) + 2.0)


def test_profile_presets_fill_in_and_explicit_keys_win() -> None:
    p = SiteProfile.model_validate({"preset": "azure-eastasia", "compute": 0.25})
    ref = PRESETS["azure-eastasia"]
    assert (p.cloud, p.bandwidth_mbps, p.latency_ms, p.usd_per_hour) == (
        ref["cloud"], ref["bandwidth_mbps"], ref["latency_ms"], ref["usd_per_hour"])
    assert p.compute == 0.25
    assert SiteProfile.model_validate({"preset": "aws-us-east-1", "latency_ms": 70}).latency_ms == 70
    # a dumped profile (all keys) loads back to the same profile
    assert SiteProfile.model_validate(p.model_dump()) == p


# ---- config ----------------------------------------------------------------------------------

def test_invalid_async_combinations_are_rejected_at_load(tmp_path: Path,
                                                        corpus_file: Path) -> None:
    path = tiny_job(tmp_path, corpus_file, FEDBUFF)
    with pytest.raises(FedskyError, match="asynchronous and \\[privacy\\] is not supported"):
        load_job(path, ['training.sampling="poisson"',
                        "privacy.dp_sgd={noise_multiplier=1.0}"])
    with pytest.raises(FedskyError, match="asynchronous and \\[secure\\] is not supported"):
        load_job(path, ["secure={}"])
    with pytest.raises(FedskyError, match="sites_per_round does not apply"):
        load_job(path, ["coordinator.sites_per_round=2"])
    with pytest.raises(FedskyError, match="unknown profile preset 'aws-mars-1'; known: aws-eu"):
        load_job(path, ['sites.0.profile={preset="aws-mars-1"}'])
    with pytest.raises(FedskyError, match="strategy.fedbuff.server.*nesterov needs"):
        load_job(path, ["strategy.server={nesterov=true}"])
    with pytest.raises(FedskyError, match="strategy.fedasync.staleness.fn"):
        load_job(path, ['strategy={name="fedasync", staleness={fn="linear"}}'])
    with pytest.raises(FedskyError, match="delayed_nesterov needs server"):
        load_job(path, ["strategy.delayed_nesterov=true"])
    with pytest.raises(FedskyError, match="local_steps_by_speed applies to asynchronous"):
        load_job(path, ['strategy={name="fedavg"}', "training.local_steps_by_speed=true"])


def test_local_steps_by_speed_are_proportional_to_tokens_per_second(
        tmp_path: Path, corpus_file: Path) -> None:
    path = tiny_job(tmp_path, corpus_file, FEDBUFF)
    speeds = ["sites.0.profile={compute=2}", "sites.1.profile={tokens_per_s=5000}",
              "sites.2.profile={compute=0.01}", "training.local_steps=10"]
    job, _ = load_job(path, speeds)
    assert [site_local_steps(job, i) for i in range(3)] == [10, 10, 10]  # off: all the same
    job, _ = load_job(path, [*speeds, "training.local_steps_by_speed=true"])
    # 20,000, 5,000 and 100 tokens/s: 10 * 1, 10 * 0.25 (2.5 rounds up), at least 1
    assert [site_local_steps(job, i) for i in range(3)] == [10, 3, 1]


def test_the_async_example_loads() -> None:
    job, _ = load_job(REPO / "examples" / "async_fedbuff.toml")
    assert job.strategy.name == "fedbuff" and job.strategy.buffer_size == 3
    assert [s.profile.compute for s in job.sites] == [1.0, 0.25, 1.0]
    assert job.sites[2].profile.bandwidth_mbps == 50 and job.sites[2].profile.cloud == "azure"


# ---- runs ------------------------------------------------------------------------------------

def test_fedbuff_with_k_sites_and_no_staleness_is_one_synchronous_fedopt_round(
    tmp_path: Path, corpus_file: Path
) -> None:
    server = '{optimizer="adam", lr=0.01}'
    _, buffered = _run(tmp_path / "buff", corpus_file, FEDBUFF, f"strategy.server={server}",
                       rounds=1)
    _, sync = _run(tmp_path / "sync", corpus_file, "",
                   "strategy={name='fedopt', optimizer='adam', lr=0.01}", rounds=1)
    assert [a["staleness"] for a in buffered[0]["arrivals"]] == [0, 0, 0]
    assert buffered[0]["version"] == 1
    _, p_buff, _ = load_checkpoint(tmp_path / "buff" / "out" / "checkpoint.safetensors")
    _, p_sync, _ = load_checkpoint(tmp_path / "sync" / "out" / "checkpoint.safetensors")
    moved = max((p_sync[k] - p_buff[k]).abs().max().item() for k in p_sync)
    assert moved <= 1e-6
    assert buffered[0]["eval_loss"] == pytest.approx(sync[0]["eval_loss"], abs=1e-6)


def test_updates_older_than_max_staleness_are_dropped_and_counted(
    tmp_path: Path, corpus_file: Path
) -> None:
    summary, records = _run(
        tmp_path, corpus_file, '\n[strategy]\nname = "fedasync"\nmax_staleness = 1\n',
        "sites.2.profile={tokens_per_s=2500}", rounds=4)  # c trains 4x slower than a and b
    arrivals = [a for r in records for a in r["arrivals"]]
    assert len(arrivals) == 12 and len(records) == 4
    stale = [a for a in arrivals if a.get("dropped") == "stale"]
    assert stale and all(a["staleness"] > 1 for a in stale)
    assert {a["site"] for a in stale} == {"c"}
    applied = [a for a in arrivals if "dropped" not in a]
    assert all(a["staleness"] <= 1 and a["weight"] > 0 for a in applied)
    # FedAsync steps once per applied update; the dropped ones never touched the model
    assert summary["versions"] == len(applied)
    assert summary["stale_dropped"] == len(stale) == sum(r["stale_dropped"] for r in records)


def test_virtual_time_runs_repeat_exactly_whatever_the_real_timing(
    tmp_path: Path, corpus_file: Path
) -> None:
    setup = [FEDBUFF + "buffer_size = 2\n",
             "sites.0.profile={compute=4, latency_ms=5}",
             "sites.2.profile={compute=1, bandwidth_mbps=50, latency_ms=20}",
             'codec.uplink=[{name="quantize", bits=8}, {name="zstd"}]',
             'codec.downlink=[{name="quantize", bits=8}, {name="zstd"}]']
    s1, first = _run(tmp_path / "1", corpus_file, *setup, rounds=3)
    # The same job with the links emulated: every transfer really sleeps, so the real order
    # of events and all wall times change; nothing the virtual clock decides may.
    _, second = _run(tmp_path / "2", corpus_file, *setup, "transport.emulate_links=true",
                     rounds=3)
    assert [_strip_timing(r) for r in first] == [_strip_timing(r) for r in second]
    p1 = load_checkpoint(tmp_path / "1" / "out" / "checkpoint.safetensors")[1]
    p2 = load_checkpoint(tmp_path / "2" / "out" / "checkpoint.safetensors")[1]
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    clocks = [a["clock_s"] for r in first for a in r["arrivals"]]
    assert clocks == sorted(clocks) and clocks[0] > 0
    assert s1["virtual_time_s"] == pytest.approx(first[-1]["virtual_clock_s"])
    # the fast site (compute 4) delivered more updates than the slow-link one
    counts = {x: sum(a["site"] == x for a in (a for r in first for a in r["arrivals"]))
              for x in "abc"}
    assert counts["a"] > counts["c"]
    # codecs work: 8-bit codes both ways (about 4x fewer bytes than fp32)
    assert s1["compression_ratio"] > 3 and s1["compression_ratio_down"] > 3


def test_sync_rounds_record_the_slowest_sites_virtual_time(tmp_path: Path,
                                                          corpus_file: Path) -> None:
    _, records = _run(tmp_path, corpus_file, "", "sites.1.profile={compute=0.5, latency_ms=30}")
    job, _ = load_job(tmp_path / "job.toml", ["sites.1.profile={compute=0.5, latency_ms=30}"])
    profiles = {x.name: x.profile for x in job.sites}
    for rec in records:
        times = {x: task_seconds(profiles[x], rec["sites"][x]["tokens"], rec["bytes_down"][x],
                                 rec["bytes_up"][x]) for x in rec["participants"]}
        assert rec["virtual_time_s"] == pytest.approx(max(times.values()))
        assert max(times, key=times.get) == "b"


def test_async_over_grpc_goes_on_after_a_site_is_killed(tmp_path: Path,
                                                       corpus_file: Path) -> None:
    job, job_dir = load_job(
        tiny_job(tmp_path, corpus_file, "threads = 1\n" + FEDBUFF, rounds=10),
        ["coordinator.min_sites=2", "strategy.buffer_size=2"])
    p = prepare(job, job_dir)
    security = grpc_security(job)
    transport = grpc_transport(job, security)
    procs = spawn_workers(job, transport.port, security, p.out_dir)
    victim = procs[2]  # site "c"
    runlog = RunLog(p.out_dir, job.rounds, "async kill")

    class KillBeforeSecondTask(RealClock):
        """The victim dies the moment it is due its second task: after one arrival, always."""

        def send(self, site: str, tag: int, task: bytes, sent_at: float | None = None) -> bool:
            if site == "c" and tag >= 1 and victim.poll() is None:
                victim.kill()
                victim.wait()
            return super().send(site, tag, task, sent_at)

    try:
        joined = transport.start(["a", "b", "c"], make_setup(job, job_dir, p.tokenizer))
        assert joined == ["a", "b", "c"]
        strategy = make_async_strategy(job.strategy, len(joined))
        params = trainable_state(p.model)
        ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                           runlog, p.out_dir / "checkpoint.safetensors")
        run_async(job, KillBeforeSecondTask(transport), joined, params, ctx,
                  strategy.init_state(params))
    finally:
        transport.close()
        runlog.close()
        for proc in procs:
            proc.wait(timeout=60)
    records = read_metrics(p.out_dir)
    assert len(records) == job.rounds  # the others delivered the whole budget
    assert sum(len(r["arrivals"]) for r in records) == job.rounds * 3
    lost_at = next(i for i, r in enumerate(records) if r["lost"] == ["c"])
    later = [a["site"] for r in records[lost_at + 1:] for a in r["arrivals"]]
    assert later and set(later) <= {"a", "b"}
    assert "virtual_time_s" not in records[-1]  # real time over gRPC
    assert math.isfinite(records[-1]["eval_loss"]) and records[-1]["version"] > 0
    assert victim.returncode != 0 and [q.returncode for q in procs[:2]] == [0, 0]


def test_slow_sites_train_fewer_steps_and_the_budget_counts_steps(
        tmp_path: Path, corpus_file: Path) -> None:
    summary, records = _run(tmp_path, corpus_file, FEDBUFF + "buffer_size = 2\n",
                            "sites.2.profile={compute=0.25}", "training.local_steps=4",
                            "training.local_steps_by_speed=true", rounds=3)
    per_step = 4 * 32  # batch_size x seq_len tokens
    tokens = {x: [r["sites"][x]["tokens"] / r["sites"][x]["updates"] for r in records
                  if x in r["sites"]] for x in "abc"}
    assert set(tokens["a"]) == set(tokens["b"]) == {4 * per_step}
    assert set(tokens["c"]) == {1 * per_step}  # 4 x 0.25
    # the budget is 3 rounds x 3 sites x 4 steps; the short tasks make up the steps
    total = sum(i["tokens"] for r in records for i in r["sites"].values())
    assert total == 3 * 3 * 4 * per_step
    assert len(records) == 3 and summary["versions"] == records[-1]["version"]
    arrivals = [a for r in records for a in r["arrivals"]]
    assert len(arrivals) > 9 and sum(a["site"] == "c" for a in arrivals) >= 3


class Crash(RuntimeError):
    """The coordinator process dies: nothing catches this."""


def _crash_after(n_tasks: int):
    """A site factory whose sites take `n_tasks` tasks between them, then the run dies."""
    inner = site_factory()
    count = itertools.count(1)

    def factory(name: str, setup: bytes):
        handler = inner(name, setup)

        def handle(task: bytes) -> bytes:
            if next(count) > n_tasks:
                raise Crash(f"the coordinator died while {name} trained")
            return handler(task)
        return handle
    return factory


@pytest.mark.parametrize("strategy", [
    FEDBUFF + 'buffer_size = 4\nserver = { optimizer = "sgd", lr = 1.2, momentum = 0.9, '
    'nesterov = true }\n',
    FEDBUFF + 'buffer_size = 4\ndelayed_nesterov = true\nserver = { optimizer = "sgd", '
    'momentum = 0.5, nesterov = true, weighting = "uniform" }\n',
    '\n[strategy]\nname = "fedasync"\nalpha = 0.6\n',
])
def test_a_resumed_virtual_time_run_ends_with_the_uninterrupted_runs_model(
        tmp_path: Path, corpus_file: Path, strategy: str) -> None:
    setup = ["sites.0.profile={compute=2, latency_ms=5}",
             "sites.2.profile={compute=0.5, bandwidth_mbps=50, latency_ms=20}"]
    _, whole = _run(tmp_path / "whole", corpus_file, strategy, *setup, rounds=4)
    job, job_dir = load_job(tiny_job(tmp_path / "cut", corpus_file, "threads = 1\n" + strategy,
                                     rounds=4), setup)
    with pytest.raises(Crash):  # mid-window, with a buffer part-filled and tasks in flight
        run_federated(job, job_dir, "inprocess", factory=_crash_after(10))
    out = Path(job.output_dir)
    done, _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert done == 1 and len(read_metrics(out)) == 2
    assert state["loop"]["inflight"]  # there is something to send again
    assert checkpoint_info(out / "checkpoint.safetensors")["contributors"] == (
        read_metrics(out)[1]["participants"])
    strat = state["strategy"]
    if "buffer" in strat:  # 6 arrivals: one server step, 2 updates buffered
        assert len(strat["buffer"]) == 2
        assert strat["server"]["optimizer"]["state"]  # momentum to carry over
    if "count" in strat:  # delayed Nesterov: momentum once, 2 updates in the running sum
        assert strat["count"] == 2
        assert any(v.abs().sum() > 0 for v in strat["momentum"].values())
    summary = run_federated(job, job_dir, "inprocess", resume=True)
    resumed = read_metrics(out)
    # The same arrivals at the same virtual times, the same versions and losses; only the
    # bytes differ (the resumed coordinator sent the tasks in flight again).
    same = ("round", "arrivals", "version", "eval_loss", "virtual_clock_s", "bytes_up")
    assert [{k: r[k] for k in same} for r in resumed] == [{k: r[k] for k in same} for r in whole]
    p_whole = load_checkpoint(tmp_path / "whole" / "out" / "checkpoint.safetensors")[1]
    p_resumed = load_checkpoint(out / "checkpoint.safetensors")[1]
    assert all(torch.equal(p_whole[k], p_resumed[k]) for k in p_whole)
    assert summary["versions"] == whole[-1]["version"] > 0


def test_resume_refuses_a_checkpoint_of_the_other_kind_of_run(
        tmp_path: Path, corpus_file: Path) -> None:
    _run(tmp_path, corpus_file, "", rounds=1)  # synchronous FedAvg
    job, job_dir = load_job(tmp_path / "job.toml", ['strategy={name="fedbuff"}'])
    with pytest.raises(FedskyError, match="from a synchronous run; strategy 'fedbuff' cannot"):
        run_federated(job, job_dir, "inprocess", resume=True)
