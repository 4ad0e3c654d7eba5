"""Secure aggregation: the masks cancel, dropouts are survived, tampering is caught, and the
coordinator's view of one site's update carries nothing it could read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_job

from fedsky import secagg
from fedsky.checkpoint import load_checkpoint
from fedsky.codecs import make_codec
from fedsky.config import load_job
from fedsky.errors import FedskyError
from fedsky.metrics import read_metrics
from fedsky.model import trainable_state
from fedsky.runner import prepare, run_federated
from fedsky.site import make_setup, open_site, round_seed, site_factory
from fedsky.training import sample_batch
from fedsky.wire import unpack

SITES5 = ("a", "b", "c", "d", "e")


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("dropped", [(), ("b",), ("b", "d")])
def test_masked_sum_is_the_exact_integer_sum_with_dropouts(bits: int, dropped: tuple) -> None:
    keys = {s: secagg.KeyPair.new() for s in SITES5}
    seeds = {s: bytes([i]) * 32 for i, s in enumerate(SITES5)}
    pubs = {s: k.public for s, k in keys.items()}
    rng = np.random.default_rng(0)
    dtype = secagg.DTYPES[bits]
    values = {s: rng.integers(0, 2**bits, 1000, dtype=dtype) for s in SITES5}
    masked = {s: secagg.mask(values[s], s, keys[s], pubs, seeds[s], bits, "t") for s in SITES5}
    survivors = [s for s in SITES5 if s not in dropped]
    total = np.zeros(1000, dtype=dtype)
    for s in survivors:
        total += masked[s]
        assert not np.array_equal(masked[s], values[s])
    out = secagg.unmask(total, [seeds[s] for s in survivors],
                        {s: keys[s].secret_bytes for s in dropped},
                        {s: pubs[s] for s in survivors}, bits, "t")
    expected = np.zeros(1000, dtype=dtype)
    for s in survivors:
        expected += values[s]
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_prg_blocks_are_the_whole_sequence_and_streams_share_no_keystream(bits: int) -> None:
    seed = bytes(range(32))
    whole = secagg.prg(seed, 1000, bits)
    for offset in (0, 1, 15, 16, 17, 64, 999):  # a block costs only that block
        assert np.array_equal(secagg.prg(seed, min(50, 1000 - offset), bits, offset=offset),
                              whole[offset : offset + 50])
    # The masked weight (stream 1) once reused the masked vector's keystream 64 bytes on
    # (ChaCha20's block counter was the stream), so its mask was element 16's (32 bits).
    other = secagg.prg(seed, 16, bits, stream=1).view(np.uint8)
    raw = whole.view(np.uint8)
    assert not any(np.array_equal(raw[i : i + 16], other) for i in range(len(raw) - 15))


def test_unmasking_block_by_block_equals_the_whole_vector() -> None:
    from fedsky.secure_round import _decode_masked

    like = {"a": torch.zeros(5, 3), "b": torch.zeros(7), "c": torch.zeros(2, 2)}
    ranges, seeds = {"a": -3, "b": 1, "c": -7}, [bytes([i]) * 32 for i in range(3)]
    rng = np.random.default_rng(0)
    for chosen in (None, rng.random(26) < 0.4):  # dense, and a randk support
        total = rng.integers(0, 2**16, 26 if chosen is None else int(chosen.sum()),
                             dtype=np.uint16)

        def strip(block: np.ndarray, at: int) -> np.ndarray:
            return secagg.unmask(block, seeds, {}, {}, 16, "t", offset=at)

        whole = _decode_masked(total, strip, list(like), like, ranges, 1000, 16, 2.5, chosen,
                               block_values=len(total))
        for size in (1, 7):
            blocks = _decode_masked(total, strip, list(like), like, ranges, 1000, 16, 2.5,
                                    chosen, block_values=size)
            assert all(torch.equal(whole[n], blocks[n]) for n in like)
        assert not all(torch.equal(whole[n], torch.zeros_like(whole[n])) for n in like)


def test_fixed_point_sum_is_within_the_quantization_bound() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 0.3, 5000) for _ in range(3)]
    clip, bits = 2.0, 16
    levels = secagg.levels_for(bits, 3)
    total = np.zeros(5000, dtype=np.uint16)
    for x in xs:
        total += secagg.encode_fixed(x, clip, levels, bits, rng)
    err = np.abs(secagg.decode_fixed(total, clip, levels, bits) - sum(xs))
    assert err.max() <= 3 * clip / levels
    assert 0 < err.mean() < clip / levels


def test_shamir_needs_threshold_shares() -> None:
    secret = bytes(range(32))
    shares = secagg.share_secret(secret, [1, 2, 3, 4, 5], 3)
    assert secagg.recover_secret({k: shares[k] for k in (5, 2, 4)}, 3) == secret
    with pytest.raises(FedskyError, match="cannot rebuild"):
        secagg.recover_secret({k: shares[k] for k in (1, 2)}, 3)


def test_sealed_share_refuses_another_context() -> None:
    a, b = secagg.KeyPair.new(), secagg.KeyPair.new()
    sealed = secagg.seal(a, b.public, b"share", "job|0|a->b")
    assert secagg.unseal(b, a.public, sealed, "job|0|a->b") == b"share"
    with pytest.raises(FedskyError, match="authentication"):
        secagg.unseal(b, a.public, sealed, "job|1|a->b")  # replayed into another round


# ---- whole rounds, in process -----------------------------------------------------------------

def _phase(task: bytes) -> tuple[str, int]:
    header = unpack(task)[1]
    return header.get("phase", "train"), header.get("round", -1)


def faulty(fail: dict[str, str], mangle: dict[str, str] | None = None, seen: list | None = None):
    """The real site factory, with faults injected: `fail` makes a site crash when it gets
    a task of that phase in round 0; `mangle` corrupts its reply of that phase; `seen` records
    every reply the coordinator receives."""
    inner = site_factory()

    def factory(name: str, setup: bytes):
        handler = inner(name, setup)

        def handle(task: bytes) -> bytes:
            phase, r = _phase(task)
            if r == 0 and fail.get(name) == phase:
                raise FedskyError(f"site {name} crashed (injected)")
            reply = handler(task)
            how = (mangle or {}).get(name)
            if r == 0 and how and phase == "masked":
                reply = reply[:-7] if how == "truncate" else \
                    reply[:-5] + bytes([reply[-5] ^ 1]) + reply[-4:]
            if seen is not None:
                seen.append((name, phase, reply))
            return reply

        return handle

    return factory


def _run(tmp: Path, corpus: Path, *overrides: str, sites=("a", "b", "c"), factory=None,
         rounds: int = 1):
    job, job_dir = load_job(tiny_job(tmp, corpus, sites=sites, rounds=rounds),
                            ["training.threads=1", *overrides])
    summary = run_federated(job, job_dir, "inprocess", factory=factory)
    out = Path(summary["output_dir"])
    return load_checkpoint(out / "checkpoint.safetensors")[1], read_metrics(out)


def _max_diff(p: dict, q: dict) -> float:
    return max(float((p[k] - q[k]).abs().max()) for k in p)


def test_secure_round_equals_plain_fedavg_within_the_fixed_point_bound(
        tmp_path: Path, corpus_file: Path) -> None:
    plain, plain_recs = _run(tmp_path / "plain", corpus_file, rounds=2)
    masked, recs = _run(tmp_path / "mask", corpus_file, "secure={}", rounds=2)
    assert _max_diff(plain, masked) < 1e-5
    assert recs[-1]["participants"] == ["a", "b", "c"]
    # the coordinator learned no site's weight, loss or sample count
    assert all(set(info) == {"tokens", "compute_s"} for info in recs[-1]["sites"].values())
    # 32-bit masking costs at most 1.2x the plaintext bytes
    assert sum(recs[-1]["bytes_up"].values()) <= 1.2 * sum(plain_recs[-1]["bytes_up"].values())


def test_dynamic_weights_under_masking_match_the_plaintext_rule(tmp_path: Path,
                                                                corpus_file: Path) -> None:
    rule = "strategy={name='dynamic', rule='paper_b', alpha=0.5}"
    plain, _ = _run(tmp_path / "plain", corpus_file, rule)
    masked, _ = _run(tmp_path / "mask", corpus_file, rule, "secure={}")
    assert _max_diff(plain, masked) < 1e-5


@pytest.mark.parametrize("gone", [("d",), ("d", "e")])
def test_secure_round_survives_sites_dropping_after_key_exchange(
        tmp_path: Path, corpus_file: Path, gone: tuple) -> None:
    # the plain run loses the same sites before they send anything
    plain, _ = _run(tmp_path / "plain", corpus_file, sites=SITES5,
                    factory=faulty(dict.fromkeys(gone, "train")))
    masked, recs = _run(tmp_path / "mask", corpus_file, "secure={threshold=3}", sites=SITES5,
                        factory=faulty(dict.fromkeys(gone, "masked")))
    assert recs[0]["participants"] == [s for s in SITES5 if s not in gone]
    assert recs[0]["secure"]["dropped_after_keys"] == list(gone)
    assert _max_diff(plain, masked) < 1e-5


def test_below_the_threshold_the_round_is_skipped_not_wrong(tmp_path: Path,
                                                            corpus_file: Path) -> None:
    _, recs = _run(tmp_path, corpus_file, "secure={threshold=4}", sites=SITES5,
                   factory=faulty({"d": "masked", "e": "masked"}), rounds=2)
    assert "threshold is 4" in recs[0]["skipped"] and "eval_loss" not in recs[0]
    assert recs[1]["participants"] == list(SITES5)  # the next round has everyone again


@pytest.mark.parametrize(("how", "secure"), [
    ("flip", "secure={threshold=3}"), ("truncate", "secure={threshold=3}"),
    ("flip", 'secure={default="he", sensitive="he", threshold=3}')])
def test_tampered_masked_vector_or_ciphertext_is_detected_and_left_out(
        tmp_path: Path, corpus_file: Path, how: str, secure: str) -> None:
    plain, _ = _run(tmp_path / "plain", corpus_file, sites=SITES5,
                    factory=faulty({"c": "train"}))
    masked, recs = _run(tmp_path / "mask", corpus_file, secure, sites=SITES5,
                        factory=faulty({}, {"c": how}))
    assert "c" not in recs[0]["participants"]
    reason = recs[0]["secure"]["dropped"]["c"]
    assert ("corrupted payload" if how == "flip" else "malformed payload") in reason
    assert _max_diff(plain, masked) < 1e-5


def test_incompatible_combinations_are_refused_at_load(tmp_path: Path,
                                                       corpus_file: Path) -> None:
    cases = {
        "strategy={name='median'}": "sorts each site's values",
        "codec.uplink=[{name='topk', density=0.1}]": "would not line up; use randk",
        "secure={default='plain', sensitive='plain'}": "every route is 'plain'",
        "secure={threshold=9}": "exceeds the sites per round",
    }
    for override, message in cases.items():
        extra = [] if override.startswith("secure") else ["secure={}"]
        with pytest.raises(FedskyError, match=message):
            load_job(tiny_job(tmp_path, corpus_file), [*extra, override])


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative)."""
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_coordinator_cannot_tell_which_tokens_a_site_used(tmp_path: Path,
                                                          corpus_file: Path) -> None:
    """Leakage: rank embedding rows by the size of site a's update. In plaintext the rows of
    the tokens in a's training batches stand out; masked, the ranking is a coin toss."""
    views: dict[str, list] = {"plain": [], "mask": []}
    for mode, extra in (("plain", []), ("mask", ["secure={}"])):
        _run(tmp_path / mode, corpus_file, "training.local_steps=1", *extra,
             factory=faulty({}, seen=views[mode]))
    job, job_dir = load_job(tiny_job(tmp_path / "plain", corpus_file), [])
    p = prepare(job, job_dir)
    like = trainable_state(p.model)
    # the tokens site a trained on in round 0: its one batch, drawn as it drew it
    site = open_site("a", make_setup(job, job_dir, p.tokenizer))
    gen = torch.Generator().manual_seed(round_seed(job.seed, 0, 0))
    batch = site.data[sample_batch(len(site.data), job.training, gen)]
    name = next(n for n in like if "wte" in n)
    rows, cols = like[name].shape
    used = np.zeros(rows, dtype=bool)
    used[batch.unique().numpy()] = True
    assert 0 < used.sum() < rows

    reply = next(r for s, ph, r in views["plain"] if s == "a" and ph == "train")
    tensors, header = unpack(reply)
    delta = make_codec(job.codec).uplink.decode(tensors, header["codec"], like)
    plain_auc = _auc(delta[name].norm(dim=1).numpy(), used)

    reply = next(r for s, ph, r in views["mask"] if s == "a" and ph == "masked")
    masked = unpack(reply)[0]["masked"].numpy().view(np.uint32)
    offset = sum(like[n].numel() for n in list(like)[: list(like).index(name)])
    view = masked[offset: offset + rows * cols].reshape(rows, cols).astype(np.int64)
    signed = view - (view >= 2**31) * 2**32
    masked_auc = _auc(np.abs(signed).sum(axis=1).astype(np.float64), used)
    assert plain_auc > 0.9
    assert 0.35 < masked_auc < 0.65


# ---- CKKS and the hybrid policy -------------------------------------------------------------

HYBRID = 'secure={default="plain", sensitive="he"}'


def test_hybrid_and_full_ckks_equal_plain_fedavg(tmp_path: Path, corpus_file: Path) -> None:
    plain, _ = _run(tmp_path / "plain", corpus_file)
    for name, secure in (("he", 'secure={default="he", sensitive="he"}'), ("hybrid", HYBRID),
                         ("three", 'secure={default="mask", sensitive="he"}')):
        params, recs = _run(tmp_path / name, corpus_file, secure)
        assert _max_diff(plain, params) < 1e-5, name
        routes = recs[0]["secure"]["routes"]
        assert routes["he"] >= 1 and recs[0]["secure"]["decryptor"] in ("a", "b", "c")
    assert routes == {"he": 1, "mask": 15, "plain": 0}  # the tied embedding is the sensitive one


def test_the_coordinator_never_holds_the_ckks_secret_key(tmp_path: Path,
                                                         corpus_file: Path) -> None:
    from fedsky import he

    seen: list = []
    _run(tmp_path, corpus_file, HYBRID, factory=faulty({}, seen=seen))
    received = 0
    for _, phase, reply in seen:  # every payload a site sent to the coordinator
        for name, t in unpack(reply)[0].items():
            raw = t.numpy().tobytes()
            try:
                ctx = he.load_context(raw, workers=1)
            except FedskyError:
                continue  # sealed secrets and ciphertexts are no context it can load
            assert name == "public" and phase == "he_create"
            assert not he.has_secret_key(ctx)
            received += 1
    assert received == 1
    # what the coordinator got of the token-revealing embedding: ciphertext blocks only
    masked = [unpack(r)[0] for _, ph, r in seen if ph == "masked"]
    assert masked and all("he" in m and not any("wte" in k for k in m) for m in masked)
    # the secret reached the other sites sealed to their keys: opaque to the coordinator
    sealed = [unpack(r)[0] for _, ph, r in seen if ph == "he_create"][0]
    assert sorted(k for k in sealed if k.startswith("sealed/")) == ["sealed/b", "sealed/c"]


def test_secure_hybrid_over_grpc_processes_gives_the_in_process_result(
        tmp_path: Path, corpus_file: Path) -> None:
    import subprocess

    from conftest import fedsky_cmd

    secure = 'secure={default="mask", sensitive="he", he={workers=1}}'
    job_path = tiny_job(tmp_path, corpus_file)
    proc = subprocess.run(fedsky_cmd("run", str(job_path), "--transport", "grpc", "--set",
                                     secure, "--set", "training.threads=1", "--set",
                                     f'output_dir="{tmp_path / "grpc"}"'),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    in_process, _ = _run(tmp_path / "inproc", corpus_file, secure, rounds=2)
    over_grpc = load_checkpoint(tmp_path / "grpc" / "checkpoint.safetensors")[1]
    assert _max_diff(over_grpc, in_process) < 1e-5  # CKKS noise differs per encryption
    assert read_metrics(tmp_path / "grpc")[-1]["participants"] == ["a", "b", "c"]


def test_distributed_dp_noise_composes_with_masking(tmp_path: Path, corpus_file: Path) -> None:
    dp = ["strategy={name='fedavg', weighting='uniform'}",
          "privacy={client={clip=0.5, noise_multiplier=0.8, placement='distributed'}, "
          "secure_mode=false}"]
    plain, plain_recs = _run(tmp_path / "plain", corpus_file, *dp)
    masked, recs = _run(tmp_path / "mask", corpus_file, *dp, "secure={}")
    assert recs[0]["epsilon"] == plain_recs[0]["epsilon"] > 0
    assert _max_diff(plain, masked) < 1e-5  # the sites noised before masking: same model


def test_randk_with_a_shared_seed_composes_with_masking(tmp_path: Path,
                                                        corpus_file: Path) -> None:
    randk = "codec.uplink=[{name='randk', density=0.25}]"
    plain, plain_recs = _run(tmp_path / "plain", corpus_file, randk, rounds=2)
    masked, recs = _run(tmp_path / "mask", corpus_file, randk, "secure={}", rounds=2)
    assert _max_diff(plain, masked) < 1e-5  # same support, same residuals, same model
    assert sum(recs[-1]["bytes_up"].values()) < 0.4 * sum(
        _run(tmp_path / "dense", corpus_file, "secure={}", rounds=2)[1][-1]["bytes_up"].values())


# ---- streamed masked rounds (coordinator.streaming) -------------------------------------------

STREAM = "coordinator.streaming=true"


def _same(p: dict, q: dict) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


@pytest.mark.parametrize("gone", [(), ("c",)])
def test_a_streamed_masked_round_is_bit_identical_to_the_buffered_one(
        tmp_path: Path, corpus_file: Path, caplog, gone: tuple) -> None:
    # n_embd 160: 1.5 MB masked vectors, so each arrives in two 1 MiB pieces
    args = ("secure={threshold=2}", "model.n_embd=160")
    buffered, brecs = _run(tmp_path / "buffered", corpus_file, *args,
                           factory=faulty(dict.fromkeys(gone, "masked")))
    with caplog.at_level("WARNING"):
        streamed, recs = _run(tmp_path / "streamed", corpus_file, *args, STREAM,
                              factory=faulty(dict.fromkeys(gone, "masked")))
    assert "every update is buffered instead" not in caplog.text
    assert _same(streamed, buffered)  # integer sums mod 2^32 are exact
    assert recs[0]["participants"] == brecs[0]["participants"] == [
        s for s in ("a", "b", "c") if s not in gone]
    assert recs[0]["secure"]["dropped_after_keys"] == list(gone)
    assert recs[0]["bytes_up"] == brecs[0]["bytes_up"]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_refused_streamed_masked_reply_is_taken_back_out(tmp_path: Path, corpus_file: Path,
                                                           caplog, how: str) -> None:
    """c's masked reply is damaged after it was packed (its digest no longer matches, or its
    last bytes are missing): found at its end, after all of it was summed."""
    args = ("secure={threshold=2}", "model.n_embd=160")
    buffered, brecs = _run(tmp_path / "buffered", corpus_file, *args,
                           factory=faulty({}, {"c": how}))
    with caplog.at_level("INFO", logger="fedsky.secure"):
        streamed, recs = _run(tmp_path / "streamed", corpus_file, *args, STREAM,
                              factory=faulty({}, {"c": how}))
    assert _same(streamed, buffered)
    assert recs[0]["participants"] == brecs[0]["participants"] == ["a", "b"]
    assert recs[0]["secure"]["dropped_after_keys"] == ["c"]
    reason = recs[0]["secure"]["dropped"]["c"]
    assert ("corrupted payload" if how == "flip" else "is truncated") in reason
    assert "the part of c's masked reply already summed was taken back out" in caplog.text


def _masked_payloads(length: int, sites: tuple[str, ...]) -> dict[str, bytes]:
    """Masked replies as `secure_site.masked_reply` packs them (16-bit values, a masked
    weight, one plain tensor "b" of shape (3, 2)): random, since only their sums matter."""
    from fedsky.wire import pack

    rng = np.random.default_rng(0)
    return {s: pack({"masked": torch.from_numpy(rng.integers(0, 2**16, length, dtype=np.uint16)
                                                .view(np.uint8)),
                     "masked_weight": torch.from_numpy(rng.integers(0, 256, 4, np.uint8)),
                     "plain/b": torch.randn(3, 2)}, {"round": 3, "site": s, "phase": "masked"})
            for s in sites}


def test_a_masked_reply_of_the_wrong_size_is_refused_before_any_of_it_is_summed(
        tmp_path: Path, corpus_file: Path) -> None:
    from fedsky.streaming_masked import MaskedSum

    job, _ = load_job(tiny_job(tmp_path, corpus_file),
                      ["secure={bits=16, rules=[{pattern='^b$', route='plain'}]}"])
    like = {"a": torch.zeros(5), "b": torch.zeros(3, 2), "c": torch.zeros(7)}
    acc = MaskedSum(job, like, 3, 12, tmp_path)
    payload = _masked_payloads(11, ("a",))["a"]  # one value short
    stream = acc.open("a")
    stream.write(0, memoryview(payload))
    result = stream.close()
    assert "tensor masked is" in result.error and "expected U8 [24]" in result.error
    assert result.folded == 0 and acc.settle(set()) == [] and acc.uploads.undone == {}


def test_masked_sums_taken_in_7_byte_pieces_equal_the_buffered_sums(tmp_path: Path,
                                                                    corpus_file: Path) -> None:
    """Elements split across pieces, a `plain` tensor that arrives before the masked vector
    (safetensors puts fp32 first) but is hashed after it, and one reply corrupted in its
    plain part: it is refused at its end, and the sums are exactly the other two's."""
    from fedsky.secure_round import _add, _check_masked
    from fedsky.streaming_masked import MaskedSum

    job, _ = load_job(tiny_job(tmp_path, corpus_file),
                      ["secure={bits=16, rules=[{pattern='^b$', route='plain'}]}"])
    like = {"a": torch.zeros(5), "b": torch.zeros(3, 2), "c": torch.zeros(7)}
    by_route = {"mask": ["a", "c"], "he": [], "plain": ["b"]}
    payloads = _masked_payloads(12, ("a", "b", "c"))
    bad = bytearray(payloads["c"])
    bad[-30] ^= 1  # in plain/b, which arrives first: the digest finds it at the very end
    payloads["c"] = bytes(bad)
    acc = MaskedSum(job, like, 3, 12, tmp_path)
    streams = {s: acc.open(s) for s in payloads}
    for at in range(0, len(payloads["a"]), 7):
        for s, p in payloads.items():
            streams[s].write(at, memoryview(p)[at : at + 7])
    results = {s: st.close() for s, st in streams.items()}
    assert results["a"].error is None and results["b"].error is None
    assert "corrupted payload from c" in results["c"].error and results["c"].folded > 0
    assert sorted(acc.settle({"a", "b"})) == ["a", "b"] and list(acc.uploads.undone) == ["c"]
    inputs = {s: _check_masked(job, by_route, 12, like, *unpack(payloads[s])) for s in "ab"}
    expected = _add(job, by_route, inputs, None, like)
    assert expected.keys() == acc.sums.keys()
    for key, value in expected.items():
        assert (torch.equal(value, acc.sums[key]) if key.startswith("plain/")
                else np.array_equal(value, acc.sums[key])), key


def test_only_rounds_with_a_ckks_route_buffer_when_streaming(tmp_path: Path,
                                                            corpus_file: Path) -> None:
    from fedsky.streaming import why_not_streamed

    like = {"transformer.wte.weight": torch.zeros(2), "transformer.h.0.mlp.c_fc.weight":
            torch.zeros(2)}
    for secure, why in ((HYBRID, "CKKS ciphertexts"), ("secure={sensitive='plain'}", None),
                        ("secure={}", None)):
        job, _ = load_job(tiny_job(tmp_path, corpus_file), [secure, STREAM])
        reason = why_not_streamed(job, like)
        assert reason is None if why is None else why in reason, (secure, reason)


def test_a_masked_round_streamed_over_grpc_equals_the_buffered_one(tmp_path: Path) -> None:
    """The real transport's sink path: one secure round (keys, shares, masked, unmask) with
    three mutual-TLS sites that mask a known update with the real site code, one of them
    dropping after the key exchange; streamed and buffered give the same bits."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    from fedsky import certs, secure_site
    from fedsky.config import parse_job
    from fedsky.secure_round import run_secure_round
    from fedsky.transport.grpc_coordinator import GrpcTransport
    from fedsky.transport.grpc_worker import serve_site
    from fedsky.wire import pack

    sites = ("s0", "s1", "s2")
    job = parse_job({"name": "g", "seed": 1, "data": {"format": "text", "train": "x.txt"},
                     "sites": [{"name": s} for s in sites], "secure": {"threshold": 2}})
    n = 300_000  # 1.2 MB masked vectors: two 1 MiB chunks each
    like = {"v": torch.zeros(n)}
    server, tls = certs.throwaway_pki(tmp_path / "pki", sites, "127.0.0.1")

    def factory(name: str, setup: bytes):
        k, state = sites.index(name), {}

        def handle(task: bytes) -> bytes:
            tensors, header = unpack(task)
            phase = header.get("phase", "train")
            if phase == "train":
                delta = {"v": torch.linspace(-1, 1, n) * (k + 1)}
                state["p"] = secure_site.PendingRound(header["round"], delta, math.log(k + 1))
                return secure_site.keys_reply(job, name, state["p"],
                                              {"tokens": 1, "compute_s": "0"})
            if phase == "shares":
                return secure_site.shares_reply(job, name, state["p"], header)
            if phase == "masked":
                if name == "s2" and header["round"] % 2:
                    raise FedskyError("s2 dropped after the key exchange (injected)")
                return secure_site.masked_reply(job, name, state["p"], header, None, k)
            return secure_site.unmask_reply(job, name, state["p"], header, tensors, None)

        return handle

    transport = GrpcTransport("127.0.0.1", 0, sites, tls=server)
    means, outs = {}, {}
    with ThreadPoolExecutor(3) as pool:
        for s in sites:
            pool.submit(serve_site, f"127.0.0.1:{transport.port}", s, factory, tls=tls[s])
        try:
            assert sorted(transport.start(list(sites), b"")) == list(sites)
            for r, streamed in ((0, False), (2, True), (1, False), (3, True)):
                # rounds 0 and 2: everyone; 1 and 3 (odd): s2 drops after the key exchange
                out = run_secure_round(job, transport, r, {s: pack({}, {"round": r})
                                                           for s in sites},
                                       like, streamed=streamed, spill_dir=tmp_path)
                assert out.failed is None, out.failed
                means[r], outs[r] = out.mean["v"], out
        finally:
            transport.close()
    assert torch.equal(means[0], means[2]) and torch.equal(means[1], means[3])
    assert not torch.equal(means[0], means[1])
    for r in (1, 3):
        assert outs[r].info["dropped_after_keys"] == ["s2"] and len(outs[r].updates) == 2
    # sum_k w_k (k + 1) / sum_k w_k with w = 1, 2, 3 (then 1, 2): 14/6 and 5/3, times linspace
    torch.testing.assert_close(means[2], torch.linspace(-1, 1, n) * 14 / 6, atol=1e-6, rtol=0)
    torch.testing.assert_close(means[3], torch.linspace(-1, 1, n) * 5 / 3, atol=1e-6, rtol=0)
