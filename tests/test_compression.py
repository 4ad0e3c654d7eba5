"""Compression: the pure functions against closed forms, codec pipelines through the wire,
error feedback, the downlink, byte and cost accounting, link emulation, config rejections."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_job
from fedsky import compression as cz
from fedsky.accounting import GB, Link, egress_price, transfer_seconds
from fedsky.codecs import Pipeline, RoundSeeds, decode_update, make_codec
from fedsky.config import CodecConfig, load_job
from fedsky.coordinator import RoundContext, run_rounds
from fedsky.downlink import Downlink, apply_delta, fingerprint
from fedsky.errors import FedskyError
from fedsky.metrics import RunLog, read_metrics, round_line, summarize
from fedsky.model import trainable_state
from fedsky.runner import prepare
from fedsky.site import Site, make_setup, receive_global, site_factory
from fedsky.strategies import make_strategy
from fedsky.transport import inprocess
from fedsky.transport.inprocess import InProcessTransport
from fedsky.wire import pack, unpack

SEEDS = RoundSeeds(shared=11, private=12)


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model-shaped update: a matrix that factors, one that doesn't, a vector."""
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(300, 16, generator=g), "fc.w": torch.randn(24, 20, generator=g),
            "ln.b": torch.randn(37, generator=g) * 0.01}


def _pipeline(*stages: dict, ef: bool = False, link: Link | None = None) -> Pipeline:
    return make_codec(CodecConfig(uplink=list(stages), error_feedback=ef), link).uplink


# ---- pure functions ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_within_one_step_stochastic_half_step_nearest(bits: int) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(bits))
    chunk = 512
    scales = cz.chunk_absmax(x, chunk)
    step = (2 * scales / cz.levels(bits)).repeat_interleave(chunk)[: x.numel()]
    gen = torch.Generator().manual_seed(0)
    stoch = cz.dequantize(cz.quantize(x, bits, scales, chunk, gen), bits, scales, chunk)
    near = cz.dequantize(cz.quantize(x, bits, scales, chunk, None), bits, scales, chunk)
    assert ((stoch - x).abs() <= step * (1 + 1e-5)).all()
    assert ((near - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert ((stoch - x).abs() > step / 2).any()  # stochastic really is the looser one


def test_stochastic_quantization_is_unbiased_and_nearest_is_not() -> None:
    bits, draws = 2, 4000
    x = torch.linspace(-0.9, 0.9, 37)
    one = torch.tensor([1.0])  # shared scale: every draw on the same grid
    many = x.repeat(draws)
    codes = cz.quantize(many, bits, one, many.numel(), torch.Generator().manual_seed(3))
    mean = cz.dequantize(codes, bits, one, many.numel()).view(draws, -1).mean(dim=0)
    step = 2 / cz.levels(bits)
    # one draw's error has std <= step / 2; the mean of `draws` has std <= step / (2 sqrt(n))
    assert (mean - x).abs().max() < 5 * step / (2 * math.sqrt(draws))
    nearest = cz.dequantize(cz.quantize(x, bits, one, x.numel(), None), bits, one, x.numel())
    assert (nearest - x).abs().max() > 10 * step / (2 * math.sqrt(draws))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_round_trips_and_has_the_closed_form_size(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(bits))
    packed = cz.pack_bits(codes, bits)
    assert packed.numel() == cz.packed_len(1001, bits) == math.ceil(1001 * bits / 8)
    assert torch.equal(cz.unpack_bits(packed, bits, 1001), codes)


def test_topk_keeps_the_k_largest_of_each_chunk() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    chunk, k = 128, 5
    sp = cz.topk_chunks(x, k, chunk)
    dense = cz.scatter_chunks(sp.offsets, sp.values, x.numel(), chunk)
    for start in range(0, 1000, chunk):
        part, kept = x[start : start + chunk], dense[start : start + chunk]
        want = part.abs().topk(min(k, part.numel())).indices
        assert set(kept.nonzero().flatten().tolist()) == set(want.tolist())
        assert torch.equal(kept[want], part[want])
    # what is dropped is exactly the rest: ||x - x_hat||^2 = sum of the dropped squares
    assert torch.isclose((x - dense).pow(2).sum(), x.pow(2).sum() - dense.pow(2).sum())
    assert sp.offsets.dtype == torch.int16


def test_randk_support_is_a_function_of_the_seed_only() -> None:
    a, b, c = (cz.randk_indices(1000, 50, s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 50 and (a >= 0).all() and (a < 1000).all()


def test_powersgd_recovers_a_rank_r_matrix_in_one_step() -> None:
    g = torch.Generator().manual_seed(2)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # rank 3
    p, q = cz.powersgd(m, torch.randn(30, 4, generator=g))
    assert torch.allclose(p @ q.T, m, atol=1e-4)
    assert torch.allclose(p.T @ p, torch.eye(4), atol=1e-5)


# ---- pipelines through the wire ---------------------------------------------------------------

PIPELINES = {
    "fp32": ([], 0.0),
    "fp16": ([{"name": "cast"}], 1e-3),
    "bf16": ([{"name": "cast", "dtype": "bf16"}], 1e-2),
    "q8": ([{"name": "quantize", "bits": 8, "chunk": 256}], None),
    "q2-shared": ([{"name": "quantize", "bits": 2, "scale": 4.0}], None),
    "topk-q4-zstd": ([{"name": "topk", "density": 0.1, "chunk": 64},
                      {"name": "quantize", "bits": 4}, {"name": "zstd"}], None),
    "randk": ([{"name": "randk", "density": 0.2}], None),
    "lowrank": ([{"name": "lowrank", "rank": 2}, {"name": "zstd", "level": 9}], None),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_round_trip_through_the_wire(name: str) -> None:
    stages, rel_tol = PIPELINES[name]
    delta = _update()
    enc = _pipeline(*stages).encode(delta, SEEDS)
    blob = pack(enc.tensors, {"codec": enc.header}, enc.zstd_level)
    tensors, header = unpack(blob)
    got = decode_update(tensors, header["codec"], delta)
    for k in delta:
        assert got[k].shape == delta[k].shape and got[k].dtype == torch.float32
        assert torch.equal(got[k], enc.decoded[k]), "the sender's mirror is what arrives"
    flat, want = cz.flatten(got, sorted(delta)), cz.flatten(delta, sorted(delta))
    if rel_tol is not None:  # lossless or a cast: relative error of the cast
        assert torch.allclose(flat, want, rtol=rel_tol, atol=0)
    if name.startswith("q"):  # quantization alone: within one grid step per value
        bits, scale = (8, None) if name == "q8" else (2, 4.0)
        s = cz.chunk_absmax(want, 256) if scale is None else torch.full((1,), scale)
        per = (2 * s / cz.levels(bits)).repeat_interleave(256 if scale is None else want.numel())
        assert ((flat - want).abs() <= per[: want.numel()] * (1 + 1e-5)).all()
    if name == "randk":  # the kept values are exact, the others zero
        kept = flat != 0
        assert kept.sum() == int(0.2 * want.numel()) and torch.equal(flat[kept], want[kept])
    if name == "lowrank":  # vectors as they are; "fc.w" (24x20) at rank 2 is factored
        assert torch.equal(got["ln.b"], delta["ln.b"])
        assert not torch.equal(got["fc.w"], delta["fc.w"])


def test_compressed_payloads_are_much_smaller() -> None:
    delta = _update()
    fp32 = 4 * sum(t.numel() for t in delta.values())

    def size(*stages: dict) -> int:
        enc = _pipeline(*stages).encode(delta, SEEDS)
        return len(pack(enc.tensors, {"codec": enc.header}, enc.zstd_level))

    assert size({"name": "cast"}) < 0.55 * fp32
    assert size({"name": "quantize", "bits": 4}) < 0.2 * fp32
    assert size({"name": "topk", "density": 0.01, "chunk": 4096},
                {"name": "quantize", "bits": 4}, {"name": "zstd"}) < 0.05 * fp32


def test_error_feedback_conserves_mass() -> None:
    """Over rounds, everything sent plus what is still held back equals everything given."""
    codec = _pipeline({"name": "topk", "density": 0.05, "chunk": 128},
                      {"name": "quantize", "bits": 2}, ef=True)
    names = sorted(_update())
    n = sum(t.numel() for t in _update().values())
    given, sent = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for r in range(6):
        delta = _update(r)
        enc = codec.encode(delta, RoundSeeds(r, 100 + r))
        given += cz.flatten(delta, names).double()
        sent += cz.flatten(enc.decoded, names).double()
        assert torch.allclose(sent + codec.residual.double(), given, atol=1e-5)
    assert codec.residual.abs().sum() > 0  # something really was held back
    # without error feedback the dropped mass is simply lost
    plain = _pipeline({"name": "topk", "density": 0.05, "chunk": 128})
    plain.encode(_update(0), SEEDS)
    assert plain.residual is None


def test_malformed_encodings_are_refused() -> None:
    delta = _update()
    enc = _pipeline({"name": "topk", "density": 0.1, "chunk": 64}).encode(delta, SEEDS)
    bad = dict(enc.tensors, i=torch.full_like(enc.tensors["i"], 64))
    with pytest.raises(FedskyError, match="out of range"):
        decode_update(bad, enc.header, delta)
    with pytest.raises(FedskyError, match="wire tensor 'v'"):
        decode_update(dict(enc.tensors, v=enc.tensors["v"][:-1]), enc.header, delta)
    with pytest.raises(FedskyError, match="unknown shape kind"):
        decode_update(enc.tensors, {"shape": {"kind": "magic"}}, delta)
    with pytest.raises(FedskyError, match="malformed payload"):
        unpack(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)


def test_adaptive_fits_each_site_upload_in_the_budget() -> None:
    delta = {"w": torch.randn(200_000, generator=torch.Generator().manual_seed(0))}
    stages = [{"name": "topk", "density": 0.5, "chunk": 4096}, {"name": "quantize", "bits": 8},
              {"name": "adaptive", "budget_s": 0.5, "min_density": 0.003, "max_density": 0.2}]
    chosen = {}
    for mbps in (0.064, 0.4, 100.0):
        link = Link(up_mbps=mbps, down_mbps=mbps, latency_ms=50)
        codec = _pipeline(*stages, link=link)
        enc = codec.encode(delta, SEEDS)
        blob = pack(enc.tensors, {"codec": enc.header, "site": "x", "train_loss": 1.0})
        assert transfer_seconds(len(blob), mbps, 50) <= 0.5
        chosen[mbps] = (enc.header["shape"]["k"], enc.header["values"]["bits"])
    assert chosen[0.064][1] < 8  # below min_density at 8 bits, a slow link gives up bits
    assert chosen[0.4][1] == 8 and chosen[0.064][0] <= chosen[0.4][0] < chosen[100.0][0]
    assert chosen[100.0][0] == cz.per_chunk_k(0.2, 4096)  # a fast one stops at max_density


# ---- downlink --------------------------------------------------------------------------------

def test_downlink_sends_deltas_to_sites_that_hold_the_last_model_and_full_to_others() -> None:
    codec = make_codec(CodecConfig(downlink=[{"name": "quantize", "bits": 4}])).downlink
    dl = Downlink(codec)
    g0, g1, g2 = _update(0), _update(1), _update(2)
    t0 = dl.tasks(0, ["a", "b"], g0, SEEDS)
    assert unpack(t0["a"])[1]["base"] is None and t0["a"] == t0["b"]
    dl.confirm(["a"])  # b's reply was lost
    t1 = dl.tasks(1, ["a", "b"], g1, SEEDS)
    assert unpack(t1["a"])[1]["base"] == 0 and unpack(t1["b"])[1]["base"] is None
    assert len(t1["a"]) < len(t1["b"]) / 4
    dl.confirm(["a", "b"])
    # a site applies the delta to what it holds: the coordinator's mirror does the same
    held_a = apply_delta(g0, decode_update(*_codec_part(t1["a"]), g0))
    t2 = dl.tasks(2, ["a"], g2, SEEDS)
    got = apply_delta(held_a, decode_update(*_codec_part(t2["a"]), held_a))
    err1 = max((held_a[k] - g1[k]).abs().max() for k in g1)
    err2 = max((got[k] - g2[k]).abs().max() for k in g2)
    assert 0 < err2 and err1 < 1.0  # lossy, yet tracking: deltas are against what a holds
    assert unpack(t2["a"])[1]["base"] == 1


def _codec_part(blob: bytes) -> tuple[dict, dict]:
    tensors, header = unpack(blob)
    return tensors, header["codec"]


def test_round_0_is_a_delta_from_the_initial_model_the_site_must_hold() -> None:
    codecs = make_codec(CodecConfig(downlink=[{"name": "quantize", "bits": 8}]))
    initial, g0 = _update(0), _update(1)
    task = Downlink(codecs.downlink, initial).tasks(0, ["a"], g0, SEEDS)["a"]
    header = unpack(task)[1]
    assert header["base"] == -1 and header["base_sha256"] == fingerprint(initial)

    def site(held: dict) -> Site:
        return Site("a", 0, None, None, None, None, codecs, None, held, -1)

    same = site(dict(initial))
    assert receive_global(same, *unpack(task))[0] == 0 and same.held_round == 0
    with pytest.raises(FedskyError, match="initial model differs"):
        receive_global(site({k: v + 1e-3 for k, v in initial.items()}), *unpack(task))


def test_a_lossless_downlink_sends_the_whole_model_every_round() -> None:
    dl = Downlink(make_codec(CodecConfig(downlink=[{"name": "zstd"}])).downlink)
    dl.tasks(0, ["a"], _update(0), SEEDS)
    dl.confirm(["a"])
    tensors, header = unpack(dl.tasks(1, ["a"], _update(1), SEEDS)["a"])
    assert header["base"] is None and torch.equal(tensors["emb"], _update(1)["emb"])


# ---- accounting and links --------------------------------------------------------------------

def test_egress_prices_and_transfer_time_closed_forms() -> None:
    assert egress_price("aws", "gcp", None) == 0.09
    assert egress_price("gcp", "gcp", None) == 0.02  # another region of the same cloud
    assert egress_price("azure", None, 0.05) == 0.05  # an override wins
    assert egress_price("onprem", "aws", None) == 0.0
    assert transfer_seconds(1_000_000, 8.0, 30.0) == pytest.approx(0.03 + 1.0)


def test_emulated_links_delay_each_transfer_by_latency_plus_size(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(inprocess.time, "sleep", slept.append)
    links = {"a": Link(up_mbps=8.0, down_mbps=80.0, latency_ms=10.0)}
    transport = InProcessTransport(lambda name, setup: lambda task: b"y" * 2000, links)
    transport.start(["a", "b"], b"")
    transport.exchange(0, {"a": b"x" * 10_000, "b": b"x"}, 60.0)
    assert slept == [pytest.approx(0.01 + 10_000 * 8 / 80e6), pytest.approx(0.01 + 2000 * 8 / 8e6)]


class _Recording(InProcessTransport):
    """The in-process transport, keeping every payload it carried."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.carried: list[tuple[dict[str, bytes], dict[str, bytes]]] = []

    def exchange(self, round_idx, tasks, deadline_s):
        replies = super().exchange(round_idx, tasks, deadline_s)
        self.carried.append((dict(tasks), dict(replies)))
        return replies


def test_compressed_run_counts_exact_bytes_ratio_and_cost(tmp_path: Path,
                                                          corpus_file: Path) -> None:
    codec = '''
[codec]
uplink = [{name = "topk", density = 0.05, chunk = 1024}, {name = "quantize", bits = 4},
          {name = "zstd"}]
downlink = [{name = "topk", density = 0.1}, {name = "quantize", bits = 8}, {name = "zstd"}]
'''
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file, codec, rounds=3),
                            ['sites.0.profile={cloud="gcp"}', 'coordinator.cloud="gcp"',
                             'sites.1.profile={cloud="aws", egress_usd_per_gb=0.5}'])
    p = prepare(job, job_dir)
    transport = _Recording(site_factory())
    runlog = RunLog(p.out_dir, job.rounds, "bytes")
    strategy = make_strategy(job.strategy)
    params = trainable_state(p.model)
    try:
        joined = transport.start(["a", "b", "c"], make_setup(job, job_dir, p.tokenizer))
        ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                           runlog, p.out_dir / "checkpoint.safetensors")
        run_rounds(job, transport, joined, params, ctx, strategy.init_state(params))
    finally:
        transport.close()
        runlog.close()
    records = read_metrics(p.out_dir)
    fp32 = 4 * sum(t.numel() for t in params.values())
    for rec, (tasks, replies) in zip(records, transport.carried, strict=True):
        assert rec["bytes_down"] == {s: len(b) for s, b in tasks.items()}
        assert rec["bytes_up"] == {s: len(b) for s, b in replies.items()}
        assert rec["fp32_bytes"] == fp32
        for s, n in rec["bytes_up"].items():
            assert rec["compression_ratio"][s] == fp32 / n > 10
        a_cost = (rec["bytes_up"]["a"] * 0.02 + rec["bytes_down"]["a"] * 0.02) / GB
        b_cost = (rec["bytes_up"]["b"] * 0.5 + rec["bytes_down"]["b"] * 0.12) / GB
        assert rec["cost_usd"]["a"] == pytest.approx(a_cost)
        assert rec["cost_usd"]["b"] == pytest.approx(b_cost)
        assert "x)" in round_line(rec, job.rounds)
    # every site built the initial model itself: round 0 sends a delta from it too
    assert unpack(transport.carried[0][0]["a"])[1]["base"] == -1
    assert unpack(transport.carried[1][0]["a"])[1]["base"] == 0
    assert records[0]["compression_ratio_down"]["a"] > 5
    assert records[1]["compression_ratio_down"]["a"] > 5
    summary = summarize(records, {})
    assert summary["bytes_up"] == sum(len(b) for _, up in transport.carried for b in up.values())
    assert summary["bytes_by_site"]["b"]["down"] == sum(r["bytes_down"]["b"] for r in records)
    assert summary["cost_usd"] == pytest.approx(sum(sum(r["cost_usd"].values()) for r in records))
    assert summary["compression_ratio"] == pytest.approx(3 * 3 * fp32 / summary["bytes_up"])
    assert all(math.isfinite(r["eval_loss"]) for r in records)


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("codec", "expected"), [
    ('uplink = [{name = "quantize"}, {name = "topk"}]', "stages run in the order"),
    ('uplink = [{name = "topk"}, {name = "randk"}]', "at most one of each group"),
    ('uplink = [{name = "zstd"}, {name = "cast"}]', "stages run in the order"),
    ('uplink = [{name = "quantize"}, {name = "adaptive", budget_s = 1}]', "needs a topk"),
    ('downlink = [{name = "topk"}, {name = "adaptive", budget_s = 1}]', "per site"),
    ('uplink = [{name = "quantize", bits = 3}]', "bits"),
    ('uplink = [{name = "topk", chunk = 100000}]', "chunk"),
    ('uplink = [{name = "gzip"}]', "does not match any of the expected tags"),
    ('uplink = [{name = "cast", bits = 8}]', "unknown key"),
])
def test_bad_codec_configs_are_rejected_at_load(tmp_path: Path, corpus_file: Path, codec: str,
                                                expected: str) -> None:
    with pytest.raises(FedskyError, match=expected):
        load_job(tiny_job(tmp_path, corpus_file, f"\n[codec]\n{codec}\n"))


def test_link_emulation_is_for_the_in_process_transport(tmp_path: Path,
                                                        corpus_file: Path) -> None:
    with pytest.raises(FedskyError, match="emulate_links"):
        load_job(tiny_job(tmp_path, corpus_file),
                 ["transport.emulate_links=true", 'transport.kind="grpc"'])
