"""The site's half of a secure round (the coordinator's half is `fedsky.secure_round`).

After local training the site keeps its update and answers the coordinator's phases:

    keys    -> its two fresh public keys, and the power-of-two ranges of its update
    shares  -> Shamir shares of its masking secret and self-mask seed, sealed to each peer
    masked  -> its weighted update: masked integers, CKKS ciphertexts, or plaintext by route
    unmask  -> the shares the coordinator needs to remove the masks (and, for one site a
               round, the decrypted CKKS sum)

The update is pre-scaled by the site's own weight (fedsky.strategies.log_weight), and the
weight itself is aggregated alongside, so the coordinator learns only the weighted mean.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsky import secagg
from fedsky.config import JobConfig
from fedsky.config_secure import route_of
from fedsky.errors import FedskyError
from fedsky.wire import pack

Params = dict[str, torch.Tensor]

PHASES = ("train", "shares", "masked", "unmask")
SETUP_PHASES = ("he_hello", "he_create", "he_install")  # CKKS keys, before the first round


@dataclass
class PendingRound:
    """What a site holds between the phases of one secure round."""

    round_idx: int
    delta: Params
    log_weight: float
    channel: secagg.KeyPair = field(default_factory=secagg.KeyPair.new)
    masking: secagg.KeyPair = field(default_factory=secagg.KeyPair.new)
    self_seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    peers: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # channel, masking pk
    threshold: int = 0
    cohort: list[str] = field(default_factory=list)  # who sent shares: the masked cohort
    received: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # from u: sk_u, b_u
    revealed: bool = False


def ckks_params(job: JobConfig) -> Any:
    """The job's CKKS parameters (fedsky.he loads TenSEAL: only where encryption is used)."""
    from fedsky import he

    assert job.secure is not None
    cfg = job.secure.he
    return he.CkksParams(poly_modulus_degree=cfg.poly_modulus_degree, workers=cfg.workers or 0)


def round_tag(job: JobConfig, round_idx: int) -> str:
    """Binds seeds and sealed shares to this job and round: nothing replays across them."""
    return f"{job.name}|{job.seed}|{round_idx}"


def routes(job: JobConfig, names: list[str]) -> dict[str, list[str]]:
    """Parameter names by route, in parameter order (both sides compute the same)."""
    assert job.secure is not None
    out: dict[str, list[str]] = {"mask": [], "he": [], "plain": []}
    for name in names:
        out[route_of(job.secure, name)].append(name)
    return out


def weight_route(by_route: dict[str, list[str]]) -> str:
    """The weights' sum travels masked, or inside the ciphertexts when nothing else is masked."""
    return "he" if by_route["he"] and not by_route["mask"] else "mask"


def exponent(x: float) -> int:
    """The smallest e with |x| <= 2^e (frexp: x = m * 2^e, 0.5 <= |m| < 1)."""
    return math.frexp(x)[1] if x != 0 else -126


def keys_reply(job: JobConfig, site: str, pending: PendingRound, counters: dict[str, Any]) -> bytes:
    """Phase `keys`: public keys and the ranges the shared fixed-point scale is built from."""
    by_route = routes(job, list(pending.delta))
    ranges = {n: exponent(float(pending.delta[n].abs().max())) if pending.delta[n].numel()
              else -126 for n in by_route["mask"]}
    header = {
        "round": pending.round_idx, "site": site, "phase": "keys",
        "channel_pk": pending.channel.public.hex(), "masking_pk": pending.masking.public.hex(),
        "ranges": ranges, "weight_exp": math.ceil(pending.log_weight / math.log(2)),
        **counters,
    }
    return pack({}, header)


def shares_reply(job: JobConfig, site: str, pending: PendingRound,
                 header: dict[str, Any]) -> bytes:
    """Phase `shares`: t-of-n shares of the masking secret and self-mask seed, one sealed
    envelope per peer (the coordinator relays them but cannot open them)."""
    peers = {s: (bytes.fromhex(c), bytes.fromhex(m)) for s, (c, m) in header["peers"].items()}
    if peers.get(site) != (pending.channel.public, pending.masking.public):
        raise FedskyError(f"site {site}: the coordinator relayed other keys for this site")
    threshold = int(header["threshold"])
    if not 2 <= threshold <= len(peers):
        raise FedskyError(f"site {site}: threshold {threshold} for {len(peers)} sites refused")
    pending.peers, pending.threshold = peers, threshold
    index = _indices(job)
    xs = [index[s] for s in peers]
    sk_shares = secagg.share_secret(pending.masking.secret_bytes, xs, threshold)
    b_shares = secagg.share_secret(pending.self_seed, xs, threshold)
    tag = round_tag(job, pending.round_idx)
    sealed = {}
    for peer, (channel_pk, _) in peers.items():
        x = index[peer]
        plain = sk_shares[x] + b_shares[x]
        if peer == site:
            pending.received[site] = (sk_shares[x], b_shares[x])
        else:
            sealed[peer] = secagg.seal(pending.channel, channel_pk, plain,
                                       f"{tag}|{site}->{peer}").hex()
    return pack({}, {"round": pending.round_idx, "site": site, "phase": "shares",
                     "sealed": sealed})


def masked_reply(job: JobConfig, site: str, pending: PendingRound, header: dict[str, Any],
                 he_ctx: Any, seed: int) -> bytes:
    """Phase `masked`: open the peers' shares, then send the pre-weighted update by route."""
    assert job.secure is not None
    tag = round_tag(job, pending.round_idx)
    cohort = list(header["cohort"])
    if site not in cohort or not set(cohort) <= set(pending.peers):
        raise FedskyError(f"site {site}: masked cohort {cohort} is not within the key exchange")
    if len(cohort) < pending.threshold:
        raise FedskyError(f"site {site}: cohort of {len(cohort)} is below the threshold "
                          f"{pending.threshold}; refusing to send a maskable update")
    for peer, hexed in header["sealed"].items():
        if peer not in cohort:
            continue
        plain = secagg.unseal(pending.channel, pending.peers[peer][0], bytes.fromhex(hexed),
                              f"{tag}|{peer}->{site}")
        n = secagg.SHARE_BYTES
        pending.received[peer] = (plain[:n], plain[n:])
    pending.cohort = cohort
    scale = math.exp(pending.log_weight - int(header["weight_exp"]) * math.log(2))  # <= 1
    by_route = routes(job, list(pending.delta))
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    out_header: dict[str, Any] = {"round": pending.round_idx, "site": site, "phase": "masked"}
    mask_peers = {s: pending.peers[s][1] for s in cohort}
    if by_route["mask"]:
        bits = job.secure.bits
        levels = secagg.levels_for(bits, len(cohort))
        values = np.concatenate([pending.delta[n].double().numpy().ravel() * scale
                                 for n in by_route["mask"]])
        clip = mask_ranges(by_route["mask"], pending.delta, header["ranges"])
        chosen = randk_support(job, pending.delta, by_route, pending.round_idx)
        if chosen is not None:  # the round's shared random support: aligned at every site
            values, clip = values[chosen], clip[chosen]
        values = secagg.encode_fixed(values, clip, levels, bits, rng)
        masked = secagg.mask(values, site, pending.masking, mask_peers, pending.self_seed,
                             bits, tag, stream=0)
        tensors["masked"] = torch.from_numpy(masked.view(np.uint8))
    if weight_route(by_route) == "mask":
        levels = secagg.levels_for(32, len(cohort))
        w = secagg.encode_fixed(np.array([scale]), 1.0, levels, 32, rng)
        masked_w = secagg.mask(w, site, pending.masking, mask_peers, pending.self_seed, 32,
                               tag, stream=1)
        tensors["masked_weight"] = torch.from_numpy(masked_w.view(np.uint8))
    if by_route["he"]:
        from fedsky import he  # TenSEAL loads only where encryption is used
        flat = [pending.delta[n].double().ravel() * scale for n in by_route["he"]]
        if weight_route(by_route) == "he":
            flat.append(torch.tensor([scale], dtype=torch.float64))
        blocks = he.encrypt(he_ctx, torch.cat(flat).numpy())
        tensors["he"] = torch.frombuffer(bytearray(b"".join(blocks)), dtype=torch.uint8)
        out_header["he_sizes"] = [len(b) for b in blocks]
    for n in by_route["plain"]:
        tensors[f"plain/{n}"] = (pending.delta[n].double() * scale).float()
    return pack(tensors, out_header)


def unmask_reply(job: JobConfig, site: str, pending: PendingRound, header: dict[str, Any],
                 tensors: Params, he_ctx: Any) -> bytes:
    """Phase `unmask`: reveal b_u for survivors and the masking secret for dropped sites —
    never both for one site (that would unmask its update), and only once a round."""
    survivors, dropped = list(header["survivors"]), list(header["dropped"])
    if pending.revealed:
        raise FedskyError(f"site {site}: round {pending.round_idx}'s shares were already revealed")
    if set(survivors) & set(dropped) or not set(survivors) | set(dropped) <= set(pending.cohort):
        raise FedskyError(f"site {site}: survivors {survivors} and dropped {dropped} are not a "
                          f"split of the cohort {pending.cohort}")
    if len(survivors) < pending.threshold:
        raise FedskyError(f"site {site}: {len(survivors)} survivors are below the threshold")
    pending.revealed = True
    out_header: dict[str, Any] = {
        "round": pending.round_idx, "site": site, "phase": "unmask",
        "self_seed_shares": {u: pending.received[u][1].hex() for u in survivors
                             if u in pending.received},
        "masking_shares": {v: pending.received[v][0].hex() for v in dropped
                           if v in pending.received},
    }
    out: dict[str, torch.Tensor] = {}
    if "he_sum" in tensors:  # this site decrypts the round's CKKS sum for the coordinator
        from fedsky import he
        blocks = split_blocks(tensors["he_sum"], header["he_sizes"])
        out["he_plain"] = torch.from_numpy(he.decrypt(he_ctx, blocks, int(header["he_length"])))
    return pack(out, out_header)


def mask_ranges(names: list[str], like: Params, ranges: dict[str, int]) -> np.ndarray:
    """Each masked value's clip: 2^(its tensor's shared range exponent)."""
    return np.concatenate([np.full(like[n].numel(), 2.0 ** int(ranges[n])) for n in names])


def randk_support(job: JobConfig, like: Params, by_route: dict[str, list[str]],
                  round_idx: int) -> np.ndarray | None:
    """With a `randk` uplink stage: which values of the masked vector are sent this round.

    The site's uplink pipeline picked a random support over its whole flattened update
    (a function of the round's shared seed only, and kept what it dropped as its error-
    feedback residual); these are that support's positions inside the masked tensors."""
    stage = next((st for st in job.codec.uplink if st.name == "randk"), None)
    if stage is None:
        return None
    from fedsky.compression import randk_indices
    from fedsky.site import link_seeds

    total = sum(t.numel() for t in like.values())
    k = max(1, min(total, int(stage.density * total)))
    chosen = np.zeros(total, dtype=bool)
    chosen[randk_indices(total, k, link_seeds(job.seed, round_idx, None).shared).numpy()] = True
    offsets, at = {}, 0
    for name in sorted(like):  # the order the codec pipeline flattens an update in
        offsets[name] = (at, at + like[name].numel())
        at += like[name].numel()
    return np.concatenate([chosen[slice(*offsets[n])] for n in by_route["mask"]])


def split_blocks(buf: torch.Tensor, sizes: list[int]) -> list[bytes]:
    raw = buf.numpy().tobytes()
    if sum(sizes) != len(raw):
        raise FedskyError(f"ciphertext buffer of {len(raw)} bytes does not match its "
                          f"{len(sizes)} block sizes ({sum(sizes)} bytes)")
    out, at = [], 0
    for n in sizes:
        out.append(raw[at:at + n])
        at += n
    return out


def _indices(job: JobConfig) -> dict[str, int]:
    """Shamir evaluation points: a site's position in the job, from 1 (public, stable)."""
    return {s.name: i + 1 for i, s in enumerate(job.sites)}
