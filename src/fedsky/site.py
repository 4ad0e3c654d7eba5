"""A site: joins with the job's setup, then answers each round's task with an encoded update.

The same handler runs inside the simulation (in-process transport) and inside a `fedsky
worker` process (gRPC), so both paths train identically. Raw data never leaves this module:
the reply carries only the encoded update and a few counters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer as BpeTokenizer

from fedsky import secure_site
from fedsky.accounting import Link, site_local_steps, tokens_per_second
from fedsky.codecs import Codecs, Params, RoundSeeds, make_codec
from fedsky.config import JobConfig, parse_job
from fedsky.data import Batch, load_pretrained_tokenizer
from fedsky.downlink import INITIAL, apply_delta, fingerprint
from fedsky.dp_training import SitePrivacy
from fedsky.errors import FedskyError
from fedsky.evaluation import evaluate
from fedsky.model import (
    build_model,
    load_trainable,
    pick_device,
    trainable_delta,
    trainable_state,
)
from fedsky.secagg import KeyPair, seal, unseal
from fedsky.secure_site import SETUP_PHASES, PendingRound, ckks_params
from fedsky.strategies import log_weight
from fedsky.training import Ranks, make_optimizer, train_steps
from fedsky.transport.base import SiteHandler
from fedsky.wire import pack, unpack
from fedsky.workload import (
    Tokenizer,
    load_job_corpus,
    pretrained_tokenizer,
    site_sequences,
    vocab_size,
)

if TYPE_CHECKING:
    from fedsky.distributed import Group

log = logging.getLogger("fedsky.site")


def round_seed(job_seed: int, round_idx: int, site_index: int) -> int:
    """A distinct, reproducible seed per (job, round, site)."""
    return (job_seed * 1_000_003 + round_idx * 10_007 + site_index) % (2**63)


def link_seeds(job_seed: int, round_idx: int, site_index: int | None) -> RoundSeeds:
    """Seeds for encoding a round's message. `shared` is the same for every sender (rand-k
    supports line up across sites); `private` is the sender's own (site_index None: the
    coordinator), salted apart from the training seed of the same round."""
    sender = -2 if site_index is None else site_index
    return RoundSeeds(shared=round_seed(job_seed, round_idx, -1),
                      private=round_seed(job_seed, round_idx, sender) ^ 0x5EED_C0DEC)


def make_setup(job: JobConfig, job_dir: Path | None, tok: Tokenizer,
               resumed_at: int = 0, virtual_clock: bool = False) -> bytes:
    """What the coordinator hands every site on join: the job and the trained tokenizer (and
    the round a resumed run starts at, which a private site counts as spent before it).
    `virtual_clock`: the run is timed by the sites' profiles (an async simulation)."""
    header = {
        "job": job.model_dump(mode="json"),
        "job_dir": str(job_dir) if job_dir else None,
        "resumed_at": resumed_at,
        # A pretrained tokenizer is loaded by path at the site; a trained BPE travels whole.
        "tokenizer": tok.to_str() if isinstance(tok, BpeTokenizer) else None,
    }
    if virtual_clock:
        header["virtual_clock"] = True
    return pack({}, header)


@dataclass
class Site:
    name: str
    index: int
    job: JobConfig
    model: torch.nn.Module
    data: Batch  # (N, seq_len) training sequences; never sent anywhere
    probe: Batch  # (P, seq_len) fixed subset of `data` for the loss reports
    codecs: Codecs  # the uplink's encoder keeps this site's error-feedback residual
    device: torch.device
    held: Params | None = None  # the global model as this site last reconstructed it
    held_round: int | None = None
    privacy: SitePrivacy | None = None  # with [privacy]: DP-SGD, client noise share, ledger
    optimizer: torch.optim.Optimizer | None = None  # kept across rounds with keep_optimizer
    pending: PendingRound | None = None  # secure aggregation: this round's update and keys
    he_ctx: Any = None  # CKKS context with the secret key (fedsky.he), after the set-up
    setup_key: KeyPair | None = None  # receives the CKKS secret from the generating site
    # A multi-process site (torchrun): this process's rank, and `model` wrapped in DDP.
    ranks: Ranks = field(default_factory=Ranks)
    trainer: torch.nn.Module | None = None
    # Report the profile's compute time (tokens / tokens-per-second), not the measured one:
    # the payload then repeats byte for byte (zstd's output size depends on every digit), and
    # a virtual clock, which times transfers by payload size, with it.
    virtual_clock: bool = False


def open_site(name: str, setup: bytes, data_path: str | None = None,
              group: Group | None = None) -> Site:
    """Build a site from the setup payload: its data, its model, its codec. With `group`,
    this process is one rank of a multi-process site: every rank opens the same site."""
    _, header = unpack(setup)
    job = parse_job(header["job"], "setup from coordinator")
    names = [s.name for s in job.sites]
    if name not in names:
        raise FedskyError(f"site {name!r} is not in this job; its sites are {names}")
    job_dir = Path(header["job_dir"]) if header.get("job_dir") else None
    if data_path is not None:  # the site's own data, given on its command line
        sites = [s.model_copy(update={"path": data_path}) if s.name == name else s
                 for s in job.sites]
        job = job.model_copy(update={"sites": sites})
    if header.get("tokenizer") is not None:
        tok: Tokenizer = BpeTokenizer.from_str(header["tokenizer"])
    else:
        tok = load_pretrained_tokenizer(pretrained_tokenizer(job) or "")
    own = next(s for s in job.sites if s.name == name)
    corpus = None if own.path is not None else load_job_corpus(job, job_dir)
    data = site_sequences(job, job_dir, corpus, tok, names=[name])[name]
    device = pick_device(job.training.device) if group is None else group_device(job, group)
    if job.training.threads is not None:
        torch.set_num_threads(job.training.threads)
    model = build_model(job.model, vocab_size(tok), job.seed, device)
    trainer = None
    if group is not None:
        from fedsky.distributed import wrap

        trainer = wrap(model, group)
    log.info("site %s ready: %d sequences of %d tokens on %s%s", name, len(data),
             job.training.seq_len, device,
             "" if group is None else f" (rank {group.ranks.rank} of {group.ranks.world})")
    index = names.index(name)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(job.seed + index))
    probe = data[order[: job.training.probe_sequences]]
    codecs = make_codec(job.codec, Link.of(own.profile))
    privacy = (SitePrivacy.open(job, len(data), int(header.get("resumed_at", 0)))
               if job.privacy is not None else None)
    initial = trainable_state(model) if codecs.downlink.lossy else None  # round 0's base
    return Site(name, index, job, model, data, probe, codecs, device, initial, INITIAL,
                privacy=privacy, ranks=group.ranks if group else Ranks(), trainer=trainer,
                virtual_clock=bool(header.get("virtual_clock")))


def group_device(job: JobConfig, group: Group) -> torch.device:
    """A multi-process site trains where its process group lives; DP-SGD is single-process."""
    if job.privacy is not None and job.privacy.dp_sgd is not None:
        raise FedskyError("privacy.dp_sgd runs in one process per site; start this site "
                          "without torchrun")
    if job.training.device not in ("auto", group.device.type):
        raise FedskyError(f"training.device = {job.training.device!r}, but this torchrun site "
                          f"runs on {group.device} (NCCL on GPUs, gloo on CPUs); set "
                          "training.device = 'auto'")
    return group.device


def receive_global(site: Site, tensors: Params, header: dict[str, Any]) -> tuple[int, Params]:
    """The round and the global model from a task: whole, or a delta to the model held."""
    round_idx, base = int(header["round"]), header.get("base")
    if base is None:
        model = tensors
    elif base != site.held_round or site.held is None:
        raise FedskyError(f"site {site.name}: the task for round {round_idx} is a delta from "
                          f"round {base}'s model, but this site holds round {site.held_round}'s")
    elif base == INITIAL and header.get("base_sha256") != fingerprint(site.held):
        raise FedskyError(f"site {site.name}: its initial model differs from the coordinator's "
                          "(same job and seed, but another torch build or model files?)")
    else:
        model = apply_delta(site.held, site.codecs.downlink.decode(tensors, header["codec"],
                                                                   site.held))
    site.held, site.held_round = model, round_idx
    return round_idx, model


def probe_loss(site: Site) -> float:
    """The current model's loss on the site's fixed probe sequences."""
    return evaluate(site.model, site.probe, site.job.training.batch_size, site.device).loss


def handle_task(site: Site, task: bytes) -> bytes:
    """A task: train (every round), or one of the secure phases that follow training."""
    tensors, header = unpack(task)
    phase = header.get("phase", "train")
    if phase == "train":
        return train_round(site, tensors, header)
    if site.job.secure is None:
        raise FedskyError(f"site {site.name}: a {phase!r} task, but this job has no [secure]")
    if phase in SETUP_PHASES:
        return he_setup_reply(site, phase, tensors, header)
    pending = site.pending
    if pending is None or header.get("round") != pending.round_idx:
        raise FedskyError(f"site {site.name}: a {phase!r} task for round {header.get('round')}, "
                          "but it trained no update for that round")
    if phase == "shares":
        return secure_site.shares_reply(site.job, site.name, pending, header)
    if phase == "masked":
        seed = link_seeds(site.job.seed, pending.round_idx, site.index).private
        return secure_site.masked_reply(site.job, site.name, pending, header, site.he_ctx, seed)
    if phase == "unmask":
        reply = secure_site.unmask_reply(site.job, site.name, pending, header, tensors,
                                         site.he_ctx)
        site.pending = None  # the round is over for this site
        return reply
    raise FedskyError(f"site {site.name}: unknown task phase {phase!r}")


def he_setup_reply(site: Site, phase: str, tensors: Params, header: dict[str, Any]) -> bytes:
    """CKKS key set-up: one site makes the context; its secret reaches the others sealed to
    their X25519 keys, relayed by the coordinator, which keeps only the public part."""
    from fedsky import he  # TenSEAL loads only where encryption is used
    assert site.job.secure is not None
    out: dict[str, torch.Tensor] = {}
    reply: dict[str, Any] = {"round": header["round"], "site": site.name, "phase": phase}
    context = f"{site.job.name}|{site.job.seed}|ckks-secret"
    if phase == "he_hello":
        site.setup_key = KeyPair.new()
        reply["setup_pk"] = site.setup_key.public.hex()
    elif phase == "he_create":
        assert site.setup_key is not None
        site.he_ctx = he.new_secret_context(ckks_params(site.job))
        secret = he.secret_context_bytes(site.he_ctx)
        out["public"] = _as_bytes_tensor(he.public_context_bytes(site.he_ctx))
        for peer, pk in header["peers"].items():
            if peer != site.name:
                out[f"sealed/{peer}"] = _as_bytes_tensor(
                    seal(site.setup_key, bytes.fromhex(pk), secret, f"{context}|{peer}"))
    else:  # he_install
        assert site.setup_key is not None
        secret = unseal(site.setup_key, bytes.fromhex(header["from_pk"]),
                        tensors["sealed"].numpy().tobytes(), f"{context}|{site.name}")
        site.he_ctx = he.load_context(secret, ckks_params(site.job).workers)
    return pack(out, reply)


def _as_bytes_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def train_round(site: Site, tensors: Params, header: dict[str, Any]) -> bytes:
    """One round at the site: load the global tensors, train locally, encode new - old."""
    round_idx, global_params = receive_global(site, tensors, header)
    load_trainable(site.model, global_params)
    # The probe losses cost two forward passes; only dynamic weighting reads them. Their time
    # is site computation and is counted in compute_s.
    probing = site.job.strategy.name == "dynamic"
    started = time.perf_counter()
    loss_before = probe_loss(site) if probing else None
    probe_s = time.perf_counter() - started
    seed = round_seed(site.job.seed, round_idx, site.index)
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # batch sampling
    if site.privacy is not None:
        result = site.privacy.train(site.model, site.data, site.job.training, seed, site.device)
    else:
        if site.job.training.keep_optimizer and site.optimizer is None:
            params = [p for p in site.model.parameters() if p.requires_grad]
            site.optimizer = make_optimizer(params, site.job.training)
        result = train_steps(site.trainer or site.model, site.data, site.job.training,
                             site_local_steps(site.job, site.index), gen, site.device,
                             site.optimizer, site.ranks)
    started = time.perf_counter()
    loss_after = probe_loss(site) if probing else None
    probe_s += time.perf_counter() - started
    if site.ranks.rank != 0:  # the other ranks hold the same model; rank 0 reports it
        return b""
    delta = trainable_delta(site.model, global_params)
    if site.privacy is not None:
        delta = site.privacy.privatize_update(delta, seed)
    if site.job.secure is not None:  # keys now; the update leaves only masked or encrypted
        if site.codecs.uplink.lossy:  # randk: keep the shared support, the rest is residual
            sent = site.codecs.uplink.encode(delta, link_seeds(
                site.job.seed, round_idx, site.index)).decoded
            delta = {k: sent[k] for k in delta}  # parameter order, as the coordinator has it
        own = site.job.sites[site.index].profile
        site.pending = PendingRound(round_idx, delta, log_weight(
            site.job.strategy, len(site.data), _nan(loss_before), _nan(loss_after),
            own.bandwidth_mbps))
        counters = {"tokens": result.tokens, "steps": result.steps,
                    "compute_s": f"{result.compute_s + probe_s:015.6f}"}
        if site.privacy is not None:
            counters.update(site.privacy.header())
        return secure_site.keys_reply(site.job, site.name, site.pending, counters)
    enc = site.codecs.uplink.encode(delta, link_seeds(site.job.seed, round_idx, site.index))
    header = {
        "round": round_idx,
        "site": site.name,
        "codec": enc.header,
        "num_samples": len(site.data),
        "tokens": result.tokens,
        "steps": result.steps,
        "train_loss": result.mean_loss,
        "loss_before": loss_before,  # L_k: the global model on this site's data
        "loss_after": loss_after,
        # Fixed width, so that payload sizes (and the byte metrics) do not depend on timing.
        "compute_s": f"{result.compute_s + probe_s:015.6f}",
    }
    if site.virtual_clock:
        own = site.job.sites[site.index].profile
        header["compute_s"] = f"{result.tokens / tokens_per_second(own):015.6f}"
    if site.privacy is not None:  # epsilon spent; losses on the site's data withheld
        header.update(site.privacy.header())
    return pack(enc.tensors, header, enc.zstd_level)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def site_factory(data_path: str | None = None):
    """A SiteFactory for the transports: opens the site, returns its round handler."""

    def factory(name: str, setup: bytes) -> SiteHandler:
        site = open_site(name, setup, data_path)
        return lambda task: handle_task(site, task)

    return factory
