"""The coordinator's half of a secure round: it relays keys and sealed shares, adds what it
cannot read, and learns only the weighted mean of the cohort's updates.

    train   sites get the model, train, and reply with fresh public keys and value ranges
    shares  every site Shamir-shares its masking secret and self-mask seed, sealed per peer
    masked  sites send their pre-weighted update: masked integers / CKKS ciphertexts / plain
    unmask  survivors reveal the shares needed to strip the masks; one site decrypts the
            CKKS sum (it sees only the aggregate, which the coordinator learns anyway)

A site that drops after `shares` is tolerated while at least `threshold` remain: its pairwise
masks are removed with its reconstructed masking secret. Each phase is one `exchange`, tagged
`round * 8 + phase` so a late reply of one phase is never read as the next one's.
The site's half is `fedsky.secure_site`; the crypto is `fedsky.secagg` and `fedsky.he`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky import secagg
from fedsky.config import JobConfig
from fedsky.dp_aggregation import read_report
from fedsky.errors import FedskyError
from fedsky.secure_site import (
    PHASES,
    SETUP_PHASES,
    randk_support,
    round_tag,
    routes,
    split_blocks,
    weight_route,
)
from fedsky.strategies import Params, SiteUpdate
from fedsky.streaming import Streamed
from fedsky.streaming_masked import MaskedSum
from fedsky.transport.base import PayloadSink, Transport
from fedsky.wire import pack, unpack

log = logging.getLogger("fedsky.secure")


def tag(round_idx: int, phase: str) -> int:
    return round_idx * 8 + (PHASES + ("", *SETUP_PHASES)).index(phase)


@dataclass
class SecureOutcome:
    mean: Params | None  # the weighted mean delta; None when the round could not finish
    updates: list[SiteUpdate]  # one per contributor: counters and privacy report, no delta
    trained: dict[str, bytes]  # phase-0 replies (who now holds this round's model)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # site -> the phase it was lost in
    info: dict[str, Any] = field(default_factory=dict)  # for the round record
    failed: str | None = None


class Phase:
    """One exchange of a secure round, with its bytes counted into the outcome."""

    def __init__(self, transport: Transport, deadline_s: float, out: SecureOutcome) -> None:
        self.transport, self.deadline_s, self.out = transport, deadline_s, out

    def run(self, round_idx: int, phase: str, tasks: dict[str, bytes]) -> dict[str, tuple]:
        """The well-formed replies of this phase, by site, as (tensors, header)."""
        replies = self.transport.exchange(tag(round_idx, phase), tasks, self.deadline_s)
        if phase == "train":  # the sites that now hold this round's model (the downlink)
            self.out.trained = replies
        self._sent(tasks)
        got: dict[str, tuple] = {}
        for s in tasks:  # config order
            if s not in replies:
                self.out.dropped.setdefault(s, f"no {phase} reply")
                continue
            self.out.bytes_up[s] = self.out.bytes_up.get(s, 0) + len(replies[s])
            try:
                tensors, header = unpack(replies[s])
                if (header.get("round"), header.get("site")) != (round_idx, s) or \
                        header.get("phase") != ("keys" if phase == "train" else phase):
                    raise FedskyError(f"reply is for round {header.get('round')}, site "
                                      f"{header.get('site')}, phase {header.get('phase')}")
                for key in ("channel_pk", "masking_pk") if phase == "train" else ():
                    if len(bytes.fromhex(header[key])) != 32:
                        raise FedskyError(f"{key} is not an X25519 public key")
            except (FedskyError, KeyError, ValueError, TypeError) as err:
                log.warning("round %d: %s reply from %s rejected: %s", round_idx, phase, s, err)
                self.out.dropped.setdefault(s, f"bad {phase} reply: {err}")
                continue
            got[s] = (tensors, header)
        return got

    def stream(self, round_idx: int, phase: str, tasks: dict[str, bytes],
               sink: Callable[[str], PayloadSink]) -> dict[str, Streamed]:
        """`run` for a phase whose replies go into `sink` chunk by chunk as they arrive
        (`fedsky.streaming_masked`): what the well-formed replies' sinks returned, by site."""
        replies = self.transport.exchange(tag(round_idx, phase), tasks, self.deadline_s,
                                          sink=sink)
        self._sent(tasks)
        got: dict[str, Streamed] = {}
        for s in tasks:  # config order
            res = replies.get(s)
            if res is None:
                self.out.dropped.setdefault(s, f"no {phase} reply")
                continue
            self.out.bytes_up[s] = self.out.bytes_up.get(s, 0) + res.size
            if res.error is not None:
                log.warning("round %d: %s reply from %s rejected: %s", round_idx, phase, s,
                            res.error)
                self.out.dropped.setdefault(s, f"bad {phase} reply: {res.error}")
                continue
            got[s] = res
        return got

    def _sent(self, tasks: dict[str, bytes]) -> None:
        for s, t in tasks.items():
            self.out.bytes_down[s] = self.out.bytes_down.get(s, 0) + len(t)


def run_secure_round(job: JobConfig, transport: Transport, round_idx: int,
                     train_tasks: dict[str, bytes], global_params: Params,
                     he_public: Any = None, streamed: bool = False,
                     spill_dir: Path | None = None) -> SecureOutcome:
    """One secure round over `train_tasks`' sites; see the module docstring. `streamed`: the
    masked replies are summed as they arrive (`fedsky.streaming_masked`; undo logs in
    `spill_dir`), not each held whole until all are in."""
    sec = job.secure
    assert sec is not None
    r = round_idx
    out = SecureOutcome(None, [], {})
    phase = Phase(transport, job.coordinator.round_deadline_s, out)
    by_route = routes(job, list(global_params))

    # train: the model out, public keys and ranges back
    keyed = phase.run(r, "train", train_tasks)
    u1 = list(keyed)
    need = max(2, job.coordinator.min_sites)
    threshold = sec.threshold or len(u1) // 2 + 1
    if len(u1) < max(need, threshold):
        return _fail(out, f"{len(u1)} site(s) trained; secure aggregation needs "
                          f"{max(need, threshold)}")
    ranges = {n: max(int(h["ranges"][n]) for _, h in keyed.values()) for n in by_route["mask"]}
    weight_exp = max(int(h["weight_exp"]) for _, h in keyed.values())

    # shares: each site's sealed shares, one envelope per peer
    peers = {s: [h["channel_pk"], h["masking_pk"]] for s, (_, h) in keyed.items()}
    got = phase.run(r, "shares", {s: pack({}, {"round": r, "phase": "shares", "peers": peers,
                                                "threshold": threshold}) for s in u1})
    sealed = {s: h["sealed"] for s, (_, h) in got.items()
              if set(h["sealed"]) == set(u1) - {s}}
    u2 = [s for s in u1 if s in sealed]
    if len(u2) < threshold:
        return _fail(out, f"{len(u2)} site(s) shared keys; the threshold is {threshold}")

    # masked: relay each site the envelopes addressed to it; get the weighted updates back
    tasks = {s: pack({}, {"round": r, "phase": "masked", "cohort": u2, "ranges": ranges,
                          "weight_exp": weight_exp,
                          "sealed": {u: sealed[u][s] for u in u2 if u != s}}) for s in u2}
    chosen = randk_support(job, global_params, by_route, r)
    length = sum(global_params[n].numel() for n in by_route["mask"]) if chosen is None \
        else int(chosen.sum())
    if streamed:
        acc = MaskedSum(job, global_params, r, length, spill_dir)
        counted = set(acc.settle(phase.stream(r, "masked", tasks, acc.open)))
        for s, why in acc.uploads.undone.items():
            log.info("round %d: the part of %s's masked reply already summed was taken back "
                     "out (%s)", r, s, why)
        u3 = [s for s in u2 if s in counted]
        sums = acc.sums
    else:
        got = phase.run(r, "masked", tasks)
        inputs = {}
        for s, (tensors, header) in got.items():
            try:
                inputs[s] = _check_masked(job, by_route, length, global_params, tensors, header)
            except FedskyError as err:
                log.warning("round %d: masked update from %s rejected: %s", r, s, err)
                out.dropped.setdefault(s, f"bad masked reply: {err}")
        u3 = [s for s in u2 if s in inputs]
    if len(u3) < threshold:
        return _fail(out, f"{len(u3)} masked update(s); the threshold is {threshold}")
    if not streamed:
        sums = _add(job, by_route, {s: inputs[s] for s in u3}, he_public, global_params)

    # unmask: survivors' self-mask seeds, dropped sites' masking secrets; one site decrypts
    dropped = [s for s in u2 if s not in u3]
    decryptor = u3[r % len(u3)] if by_route["he"] else None
    tasks = {}
    for s in u3:
        head = {"round": r, "phase": "unmask", "survivors": u3, "dropped": dropped}
        tensors: dict[str, torch.Tensor] = {}
        if s == decryptor:
            head.update(he_sizes=[len(b) for b in sums["he"]],
                        he_length=he_length(by_route, global_params))
            tensors["he_sum"] = torch.frombuffer(bytearray(b"".join(sums["he"])),
                                                 dtype=torch.uint8)
        tasks[s] = pack(tensors, head)
    got = phase.run(r, "unmask", tasks)
    if decryptor is not None and decryptor not in got:
        return _fail(out, f"site {decryptor}, this round's decryptor, did not answer")
    if len(got) < threshold:
        return _fail(out, f"{len(got)} site(s) revealed shares; the threshold is {threshold}")
    mean, weight_sum = _unmask(job, by_route, global_params, sums, got, u3, dropped,
                               {s: bytes.fromhex(keyed[s][1]["masking_pk"]) for s in u3},
                               ranges, r, decryptor, threshold)
    out.mean = mean
    out.updates = [_counters(s, keyed[s][1]) for s in u3]
    out.info = {"cohort": u2, "threshold": threshold, "weight_sum": weight_sum,
                "decryptor": decryptor,
                "routes": {k: len(v) for k, v in by_route.items()},
                "dropped_after_keys": dropped}
    return out


def he_length(by_route: dict[str, list[str]], global_params: Params) -> int:
    """Values in a site's CKKS vector: its `he` tensors, plus the weight if it travels there."""
    return sum(global_params[n].numel() for n in by_route["he"]) + int(
        weight_route(by_route) == "he")


def _fail(out: SecureOutcome, reason: str) -> SecureOutcome:
    out.failed = reason
    return out


def _check_masked(job: JobConfig, by_route: dict[str, list[str]], length: int,
                  global_params: Params, tensors: Params,
                  header: dict[str, Any]) -> dict[str, Any]:
    """A site's masked reply, checked for size and type before anything is added."""
    assert job.secure is not None
    dtype = secagg.DTYPES[job.secure.bits]
    out: dict[str, Any] = {}
    if by_route["mask"]:
        raw = tensors.get("masked")
        want = length * np.dtype(dtype).itemsize
        if raw is None or raw.dtype != torch.uint8 or raw.numel() != want:
            raise FedskyError(f"masked vector has {0 if raw is None else raw.numel()} bytes, "
                              f"expected {want}")
        out["masked"] = raw.numpy().view(dtype)
    if weight_route(by_route) == "mask":
        raw = tensors.get("masked_weight")
        if raw is None or raw.dtype != torch.uint8 or raw.numel() != 4:
            raise FedskyError("masked weight missing or not 4 bytes")
        out["masked_weight"] = raw.numpy().view(np.uint32)
    if by_route["he"]:
        if "he" not in tensors or not isinstance(header.get("he_sizes"), list):
            raise FedskyError("ciphertexts missing")
        out["he"] = split_blocks(tensors["he"], [int(n) for n in header["he_sizes"]])
    for n in by_route["plain"]:
        t = tensors.get(f"plain/{n}")
        if t is None or t.shape != global_params[n].shape or not torch.isfinite(t).all():
            raise FedskyError(f"plaintext tensor {n} missing, misshapen or not finite")
        out[f"plain/{n}"] = t
    return out


def _add(job: JobConfig, by_route: dict[str, list[str]], inputs: dict[str, dict[str, Any]],
         he_public: Any, global_params: Params) -> dict[str, Any]:
    """What the coordinator can do without any key: add."""
    sums: dict[str, Any] = {}
    first = next(iter(inputs.values()))
    for key in ("masked", "masked_weight"):
        if key in first:
            acc = np.zeros_like(first[key])
            for inp in inputs.values():
                acc += inp[key]  # wraps mod 2^bits
            sums[key] = acc
    if by_route["he"]:
        from fedsky import he
        sums["he"] = he.sum_all(he_public, [inp["he"] for inp in inputs.values()],
                                he_length(by_route, global_params))
    for n in by_route["plain"]:
        sums[f"plain/{n}"] = torch.stack([inp[f"plain/{n}"].double()
                                          for inp in inputs.values()]).sum(0)
    return sums


def _unmask(job: JobConfig, by_route: dict[str, list[str]], global_params: Params,
            sums: dict[str, Any], got: dict[str, tuple], survivors: list[str],
            dropped: list[str], survivor_pks: dict[str, bytes], ranges: dict[str, int],
            round_idx: int, decryptor: str | None, threshold: int) -> tuple[Params, float]:
    """Rebuild the secrets from the revealed shares, strip the masks, divide by the weights."""
    assert job.secure is not None
    tag_text = round_tag(job, round_idx)
    index = {s.name: i + 1 for i, s in enumerate(job.sites)}

    def rebuild(owner: str, key: str) -> bytes:
        try:
            shares = {index[s]: bytes.fromhex(h[key][owner]) for s, (_, h) in got.items()
                      if owner in h.get(key, {})}
        except (ValueError, TypeError, AttributeError):
            raise FedskyError(f"malformed shares revealed for {owner}") from None
        return secagg.recover_secret(shares, threshold)

    self_seeds = [rebuild(u, "self_seed_shares") for u in survivors]
    secrets_of_dropped = {v: rebuild(v, "masking_shares") for v in dropped}
    mean: Params = {}
    bits = job.secure.bits
    cohort = len(survivors) + len(dropped)
    weight_sum = None
    if "masked_weight" in sums:
        w = secagg.unmask(sums["masked_weight"], self_seeds, secrets_of_dropped, survivor_pks,
                          32, tag_text, stream=1)
        weight_sum = float(secagg.decode_fixed(w, 1.0, secagg.levels_for(32, cohort), 32)[0])
    he_values = None
    if decryptor is not None:
        he_values = got[decryptor][0]["he_plain"].double()
        if weight_route(by_route) == "he":
            weight_sum = float(he_values[-1])
    if weight_sum is None or not weight_sum > 0:
        raise FedskyError(f"the aggregated weight {weight_sum} is not positive")
    if "masked" in sums:
        def strip(block: np.ndarray, at: int) -> np.ndarray:
            return secagg.unmask(block, self_seeds, secrets_of_dropped, survivor_pks, bits,
                                 tag_text, stream=0, offset=at)

        mean.update(_decode_masked(sums["masked"], strip, by_route["mask"], global_params,
                                   ranges, secagg.levels_for(bits, cohort), bits, weight_sum,
                                   randk_support(job, global_params, by_route, round_idx)))
    if he_values is not None:
        at = 0
        for n in by_route["he"]:
            size = global_params[n].numel()
            mean[n] = (he_values[at:at + size] / weight_sum).reshape(global_params[n].shape)
            at += size
    for n in by_route["plain"]:
        mean[n] = sums[f"plain/{n}"] / weight_sum
    return {n: mean[n].to(global_params[n].dtype) for n in global_params}, weight_sum


UNMASK_BLOCK = 1 << 20  # masked values unmasked and decoded at a time: bounds the memory


def _decode_masked(total: np.ndarray, strip: Callable[[np.ndarray, int], np.ndarray],
                   names: list[str], like: Params, ranges: dict[str, int], levels: int,
                   bits: int, weight_sum: float, chosen: np.ndarray | None,
                   block_values: int = UNMASK_BLOCK) -> Params:
    """The masked tensors' mean from the masked sum, `block_values` values at a time:
    `strip(block, offset)` removes the masks of the sum's values offset.. (`secagg.unmask`),
    then they are decoded from fixed point and divided by the weights' sum. Whole-vector
    temporaries (int64, fp64: 16 bytes per value) would be several models' worth."""
    sizes = [like[n].numel() for n in names]
    ends = np.cumsum(sizes)  # where each tensor's values end in the concatenated vector
    scales = np.array([2.0 ** int(ranges[n]) for n in names])  # each tensor's clip
    dtypes = {like[n].dtype for n in names}
    flat = torch.zeros(int(ends[-1]), dtype=dtypes.pop() if len(dtypes) == 1 else torch.float64)
    # with randk, only the round's shared support was sent; the rest of the mean is zero
    where = None if chosen is None else np.flatnonzero(chosen)
    for at in range(0, len(total), block_values):
        block = strip(total[at : at + block_values], at)
        pos = np.arange(at, at + len(block)) if where is None else where[at : at + len(block)]
        clip = scales[np.searchsorted(ends, pos, side="right")]
        values = torch.from_numpy(secagg.decode_fixed(block, clip, levels, bits) / weight_sum)
        if where is None:
            flat[at : at + len(block)] = values
        else:
            flat[torch.from_numpy(pos)] = values.to(flat.dtype)
    out, start = {}, 0
    for n, end in zip(names, ends, strict=True):
        out[n] = flat[start:end].view(like[n].shape)
        start = int(end)
    return out


def _counters(site: str, header: dict[str, Any]) -> SiteUpdate:
    return SiteUpdate(site=site, delta={}, num_samples=0, tokens=int(header["tokens"]),
                      train_loss=float("nan"), compute_s=float(header["compute_s"]),
                      privacy=read_report(header.get("privacy"), site))


def he_setup(job: JobConfig, transport: Transport, sites: list[str],
             round_idx: int) -> tuple[Any, list[str]]:
    """CKKS keys before the first round (and after a restart): every site sends an X25519
    key; the first site makes the context and seals its secret to each other site; the
    coordinator relays the envelopes and keeps only the public context. Returns that context
    and the sites that hold the secret (the others cannot take part in encrypted rounds)."""
    from fedsky import he

    out = SecureOutcome(None, [], {})
    phase = Phase(transport, job.coordinator.round_deadline_s, out)
    got = phase.run(round_idx, "he_hello",
                    {s: pack({}, {"round": round_idx, "phase": "he_hello"}) for s in sites})
    pks = {s: h["setup_pk"] for s, (_, h) in got.items()}
    if not pks:
        raise FedskyError("CKKS set-up: no site answered")
    leader = next(iter(pks))
    got = phase.run(round_idx, "he_create",
                    {leader: pack({}, {"round": round_idx, "phase": "he_create", "peers": pks})})
    if leader not in got:
        raise FedskyError(f"CKKS set-up: site {leader} did not create the keys: "
                          f"{out.dropped.get(leader)}")
    tensors, _ = got[leader]
    public = he.load_context(tensors["public"].numpy().tobytes(),
                             job.secure.he.workers if job.secure else None)
    if he.has_secret_key(public):
        raise FedskyError(f"CKKS set-up: site {leader} sent a context with its secret key; "
                          "the coordinator must never hold it")
    tasks = {s: pack({"sealed": tensors[f"sealed/{s}"]},
                     {"round": round_idx, "phase": "he_install", "from_pk": pks[leader]})
             for s in pks if s != leader and f"sealed/{s}" in tensors}
    got = phase.run(round_idx, "he_install", tasks)
    holders = [leader, *got]
    if len(holders) < len(sites):
        log.warning("CKKS set-up: %s hold no key and sit out the encrypted rounds",
                    sorted(set(sites) - set(holders)))
    return public, holders
