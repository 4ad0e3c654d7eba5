"""`fedsky run`: wire a job together and run it federated (in-process or gRPC) or centralized.

config -> corpus and tokenizer -> global model -> sites (handlers or processes) -> round loop
-> final model and summary.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsky.accounting import links
from fedsky.async_loop import RealClock, VirtualClock, run_async
from fedsky.async_strategies import make_async_strategy
from fedsky.audit_trace import AuditedTransport, AuditTrace, trace_meta
from fedsky.canaries import write_truth
from fedsky.certs import TlsFiles, throwaway_pki
from fedsky.checkpoint import load_checkpoint, save_checkpoint
from fedsky.codecs import make_codec
from fedsky.config import ASYNC_STRATEGIES, JobConfig
from fedsky.coordinator import RoundContext, run_rounds
from fedsky.data import Batch, as_hf_tokenizer, concat
from fedsky.dp_aggregation import private_strategy
from fedsky.errors import FedskyError
from fedsky.evaluation import evaluate
from fedsky.metrics import RunLog, read_metrics, summarize, write_summary
from fedsky.model import (
    build_model,
    count_parameters,
    load_trainable,
    merge_adapters,
    pick_device,
    trainable_state,
)
from fedsky.secure_site import PHASES, SETUP_PHASES
from fedsky.site import make_setup, site_factory
from fedsky.strategies import make_strategy
from fedsky.training import make_optimizer, train_steps
from fedsky.transport.base import SiteFactory, Transport
from fedsky.transport.inprocess import InProcessTransport
from fedsky.workload import (
    Tokenizer,
    eval_sequences,
    job_tokenizer,
    load_job_corpus,
    pretrained_tokenizer,
    site_sequences,
    vocab_size,
)

log = logging.getLogger("fedsky.run")


@dataclass
class Prepared:
    """What the coordinator holds before round 0: never any site's training data."""

    job: JobConfig
    job_dir: Path | None
    out_dir: Path
    tokenizer: Tokenizer
    model: torch.nn.Module
    eval_data: Batch
    device: torch.device
    corpus: Any


def prepare(job: JobConfig, job_dir: Path | None) -> Prepared:
    if job.training.threads is not None:
        torch.set_num_threads(job.training.threads)
    corpus = load_job_corpus(job, job_dir)
    log.info("corpus: %s", corpus.source)
    tok = job_tokenizer(job, job_dir, corpus)
    device = pick_device(job.training.device)
    model = build_model(job.model, vocab_size(tok), job.seed, device)
    trainable, total = count_parameters(model)
    log.info("model: %s, %d trainable of %d parameters, on %s",
             job.model.pretrained or job.model.arch, trainable, total, device)
    out_dir = Path(job.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Prepared(job, job_dir, out_dir, tok, model, eval_sequences(job, corpus, tok),
                    device, corpus)


def _finish(p: Prepared, global_params: dict[str, torch.Tensor], mode: str,
            started: float) -> dict[str, Any]:
    """Save the final model where transformers (or peft: the adapters alone) can load it,
    with `model.save_merged` also the adapters merged into the base; write the summary."""
    load_trainable(p.model, global_params)
    model_dir = p.out_dir / "model"
    p.model.save_pretrained(model_dir)
    tok = p.tokenizer if pretrained_tokenizer(p.job) else as_hf_tokenizer(p.tokenizer)
    tok.save_pretrained(model_dir)
    extra = {}
    if p.job.model.save_merged:
        merged = merge_adapters(p.job.model, model_dir, p.out_dir / "model-merged",
                                vocab_size(p.tokenizer), p.job.seed)
        tok.save_pretrained(merged)
        extra["merged_model_dir"] = str(merged)
    summary = summarize(read_metrics(p.out_dir), {
        "job": p.job.name,
        "mode": mode,
        "seed": p.job.seed,
        "sites": [s.name for s in p.job.sites],
        "output_dir": str(p.out_dir),
        "model_dir": str(model_dir),
        "checkpoint": str(p.out_dir / "checkpoint.safetensors"),
        "metrics": str(p.out_dir / "metrics.jsonl"),
        "elapsed_s": time.perf_counter() - started,
        **extra,
    })
    write_summary(p.out_dir, summary)
    return summary


def run_federated(
    job: JobConfig,
    job_dir: Path | None,
    transport_kind: str,
    tokens: dict[str, str] | None = None,
    resume: bool = False,
    external: bool = False,
    factory: SiteFactory | None = None,
) -> dict[str, Any]:
    """Federated training. With gRPC, one worker process per site is started on loopback,
    unless `external` (`fedsky coordinator`: the sites are started by their owners); `tokens`
    are the sites' secrets, if any. With `resume`, continue after the last checkpointed round
    of `output_dir`. In process, `factory` builds the sites (default:
    `fedsky.site.site_factory`; fault-injection tests wrap it)."""
    started = time.perf_counter()
    sites = [s.name for s in job.sites]
    asynchronous = job.strategy.name in ASYNC_STRATEGIES
    # Bind first: a port in use fails in a second, not after the data is ready.
    if transport_kind == "grpc" and job.transport.emulate_links:
        raise FedskyError("transport.emulate_links is for the in-process transport; over gRPC "
                          "the links are real")
    emulated = links(job) if job.transport.emulate_links else None
    security = grpc_security(job, tokens, external) if transport_kind == "grpc" else None
    transport: Transport = (grpc_transport(job, security) if security is not None
                            else InProcessTransport(factory or site_factory(), emulated))
    if job.audit is not None:  # the coordinator's view, as it receives it
        transport = audited(job, job_dir, transport, resume)
    procs: list[subprocess.Popen] = []
    runlog: RunLog | None = None
    try:
        p = prepare(job, job_dir)
        (p.out_dir / "config.json").write_text(job.model_dump_json(indent=2))
        if security is not None and not external:
            procs = spawn_workers(job, transport.port, security, p.out_dir)
        elif security is not None:
            log.info("coordinator listening on %s:%d; waiting for %d sites",
                     job.transport.host, transport.port, len(sites))
        strategy = (make_async_strategy(job.strategy, len(sites)) if asynchronous
                    else private_strategy(job, make_strategy(job.strategy)))
        global_params = trainable_state(p.model)
        state = strategy.init_state(global_params)
        last_done, resumed = None, None
        if resume:
            if not (p.out_dir / "checkpoint.safetensors").is_file():
                raise FedskyError(f"nothing to resume in {p.out_dir}: no round was checkpointed "
                                  "there; start the run again without --resume")
            last_done, global_params, state = load_checkpoint(p.out_dir / "checkpoint.safetensors")
            if asynchronous != ("loop" in state):
                raise FedskyError(f"the checkpoint in {p.out_dir} is from a "
                                  f"{'synchronous' if asynchronous else 'asynchronous'} run; "
                                  f"strategy {job.strategy.name!r} cannot resume it")
            if asynchronous:  # the async loop's bookkeeping beside the strategy's state
                state, resumed = state["strategy"], state["loop"]
            load_trainable(p.model, global_params)
        runlog = RunLog(p.out_dir, job.rounds, f"{job.name} ({transport_kind})", last_done)
        resumed_at = 0 if last_done is None else last_done + 1
        virtual_clock = asynchronous and transport_kind != "grpc"
        joined = transport.start(sites, make_setup(job, job_dir, p.tokenizer, resumed_at,
                                                   virtual_clock))
        if len(joined) < job.coordinator.min_sites:
            raise FedskyError(f"only {len(joined)} of {len(sites)} sites joined "
                              f"({', '.join(joined) or 'none'}); quorum is "
                              f"{job.coordinator.min_sites}; see {p.out_dir / 'logs'}")
        ev = evaluate(p.model, p.eval_data, job.training.batch_size, p.device)
        start = resumed_at
        runlog.info(f"{'resuming at round ' + str(start + 1) + ': ' if start else 'initial '}"
                    f"eval loss {ev.loss:.4f} (ppl {ev.perplexity:.1f}); "
                    f"{len(joined)} sites: {', '.join(joined)}")
        ctx = RoundContext(p.model, p.eval_data, p.device, strategy, make_codec(job.codec),
                           runlog, p.out_dir / "checkpoint.safetensors")
        if asynchronous:  # simulated: a virtual clock; over gRPC: real time
            clock = (VirtualClock(transport, {s.name: s.profile for s in job.sites})
                     if virtual_clock else RealClock(transport))
            global_params = run_async(job, clock, joined, global_params, ctx, state, resumed)
        else:
            global_params = run_rounds(job, transport, joined, global_params, ctx, state, start)
    finally:
        transport.close()
        if runlog is not None:
            runlog.close()
        _reap(procs)
    return _finish(p, global_params, f"federated-{transport_kind}", started)


def audited(job: JobConfig, job_dir: Path | None, transport: Transport,
            resume: bool) -> Transport:
    """Wrap the coordinator's transport in the audit recorder; write the audit's truth."""
    out_dir = Path(job.output_dir)
    phases = (*PHASES, "", *SETUP_PHASES)
    meta = trace_meta(job.secure is not None, job.strategy.name in ASYNC_STRATEGIES, phases)
    trace = AuditTrace(out_dir, meta, job.audit.downlink if job.audit else True,
                       start_fresh=not resume)
    write_truth(out_dir, job, job_dir)
    return AuditedTransport(transport, trace)


def new_tokens(job: JobConfig) -> dict[str, str]:
    """One random secret per site: how the coordinator knows who is on the other end."""
    return {s.name: secrets.token_urlsafe(24) for s in job.sites}


@dataclass
class GrpcSecurity:
    """How the coordinator and the workers it spawns (if any) know each other."""

    server: TlsFiles | None  # None: plaintext (transport.insecure)
    sites: dict[str, TlsFiles]  # each spawned worker's files
    tokens: dict[str, str] | None


def grpc_security(job: JobConfig, tokens: dict[str, str] | None = None,
                  external: bool = False) -> GrpcSecurity:
    """Mutual TLS from the job's files; for a loopback run without them, a throwaway CA in
    OUTPUT_DIR/pki; plaintext with per-site tokens only if `transport.insecure` says so."""
    t = job.transport
    names = [s.name for s in job.sites]
    if t.insecure:
        log.warning("transport.insecure: plaintext gRPC; updates cross the network unencrypted "
                    "and sites prove who they are by token only")
        return GrpcSecurity(None, {}, tokens or new_tokens(job))
    if t.tls_cert is not None and t.tls_key is not None and t.tls_ca is not None:
        server = TlsFiles(t.tls_ca, t.tls_cert, t.tls_key, t.revocation_list)
        # Spawned workers use the `fedsky certs` layout: sites/NAME.pem beside the CA.
        issued = Path(t.tls_ca).parent / "sites"
        sites = {n: TlsFiles(t.tls_ca, str(issued / f"{n}.pem"), str(issued / f"{n}.key"))
                 for n in names}
        return GrpcSecurity(server, sites, tokens)
    if external:
        raise FedskyError("the coordinator needs mutual TLS: set transport.tls_cert, tls_key "
                          "and tls_ca (make them with `fedsky certs init` and `fedsky certs "
                          "coordinator`), or transport.insecure = true on a trusted network")
    pki = Path(job.output_dir) / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    server, sites = throwaway_pki(pki, names, t.host)
    log.info("mutual TLS with a throwaway CA in %s", pki)
    return GrpcSecurity(server, sites, tokens)


def grpc_transport(job: JobConfig, security: GrpcSecurity) -> Any:
    from fedsky.transport.grpc_coordinator import GrpcTransport

    t, c = job.transport, job.coordinator
    return GrpcTransport(t.host, t.port, [s.name for s in job.sites], tls=security.server,
                         tokens=security.tokens, chunk_bytes=t.chunk_bytes,
                         join_timeout_s=c.join_timeout_s, keepalive_s=t.keepalive_s,
                         rejoin_wait_s=c.rejoin_wait_s)


def worker_cmd(address: str, site: str, tls: TlsFiles | None) -> list[str]:
    """The `fedsky worker` command line for one site (its secret, if any, goes in the env)."""
    cmd = [sys.executable, "-m", "fedsky", "worker", "--coordinator", address, "--site", site]
    if tls is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key]


def spawn_workers(job: JobConfig, port: int, security: GrpcSecurity,
                  out_dir: Path) -> list[subprocess.Popen]:
    """One `fedsky worker` process per site, dialing the coordinator on loopback."""
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for site in job.sites:
        cmd = worker_cmd(f"{job.transport.host}:{port}", site.name,
                         security.sites.get(site.name))
        env = dict(os.environ)
        if security.tokens is not None:  # not on argv: ps shows argv
            env["FEDSKY_TOKEN"] = security.tokens[site.name]
        with open(logs / f"site-{site.name}.log", "w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _reap(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_centralized(job: JobConfig, job_dir: Path | None) -> dict[str, Any]:
    """The quality ceiling: the sites' pooled data in one process, the same optimizer steps.

    One federated round is (sites per round) x local_steps optimizer steps at the sites; here
    each "round" is that many steps on the pooled data with one persistent optimizer.
    """
    started = time.perf_counter()
    p = prepare(job, job_dir)
    (p.out_dir / "config.json").write_text(job.model_dump_json(indent=2))
    pooled = concat(list(site_sequences(job, job_dir, p.corpus, p.tokenizer).values()))
    per_round = (job.coordinator.sites_per_round or len(job.sites)) * job.training.local_steps
    if job.audit is not None:  # no coordinator: the trace is empty, the model is audited
        AuditTrace(p.out_dir, {"tags": "centralized"}).close()
        write_truth(p.out_dir, job, job_dir)
    runlog = RunLog(p.out_dir, job.rounds, f"{job.name} (centralized)")
    runlog.info(f"centralized: {len(pooled)} pooled sequences, {per_round} steps per round")
    if job.privacy is not None:
        log.warning("centralized: [privacy] is ignored; the pooled-data ceiling trains without DP")
    params = [q for q in p.model.parameters() if q.requires_grad]
    opt = make_optimizer(params, job.training)
    torch.manual_seed(job.seed)
    gen = torch.Generator().manual_seed(job.seed)
    try:
        for r in range(job.rounds):
            res = train_steps(p.model, pooled, job.training, per_round, gen, p.device, opt)
            t_eval = time.perf_counter()
            ev = evaluate(p.model, p.eval_data, job.training.batch_size, p.device)
            save_checkpoint(p.out_dir / "checkpoint.safetensors", r, trainable_state(p.model), {})
            eval_s = time.perf_counter() - t_eval
            runlog.round({
                "round": r, "selected": [], "participants": ["centralized"], "dropped": [],
                "bytes_up": {}, "bytes_down": {}, "eval_loss": ev.loss,
                "perplexity": ev.perplexity, "accuracy": ev.accuracy,
                "round_s": res.compute_s, "eval_s": eval_s, "wall_s": res.compute_s + eval_s,
                "sites": {"centralized": {"train_loss": res.mean_loss, "tokens": res.tokens,
                                          "compute_s": res.compute_s,
                                          "num_samples": len(pooled), "weight": 1.0}},
            })
    finally:
        runlog.close()
    return _finish(p, trainable_state(p.model), "centralized", started)
