"""`fedsky audit RUN_DIR`: play the honest-but-curious coordinator against a recorded run.

The attacks read only what the coordinator saw (OUTPUT_DIR/audit/, written with `audit =
true`) and the released model (the final checkpoint). The data is rebuilt from the job only to
*score* them: which tokens each site's data holds, which rows it trained on and which it held
out, and the planted canaries. Definitions are in docs/audit.md; the math in fedsky.attacks.

Data leakage rate of a site = (its site-unique tokens the attacker finds in that site's
updates and attributes to it + the canary digits greedy extraction recovers from the released
model, each part less what an attacker who learnt nothing gets by chance) / (its site-unique
tokens + its canary digits).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky import attacks
from fedsky.audit_trace import audit_dir, blob, read_trace
from fedsky.canaries import canary_text, holdout_split, read_truth, site_training
from fedsky.checkpoint import load_checkpoint
from fedsky.codecs import make_codec
from fedsky.config import JobConfig, parse_job
from fedsky.data import encode_texts
from fedsky.errors import FedskyError
from fedsky.model import build_model, load_trainable, trainable_state
from fedsky.secure_site import randk_support, routes
from fedsky.wire import unpack
from fedsky.workload import job_tokenizer, load_job_corpus, sequences, site_documents, vocab_size

EMBEDDING = ("wte.weight", "embed_tokens.weight", "lm_head.weight")  # rows are token ids
Rows = dict[str, list[torch.Tensor]]  # site -> one (V,) score vector per round


def audit_run(run_dir: Path | str, candidates: int = 1000, max_records: int = 256,
              seed: int = 0) -> dict[str, Any]:
    """Every attack on one run; also written to RUN_DIR/audit/report.json."""
    run = Path(run_dir)
    if not (audit_dir(run) / "meta.json").is_file() or not (run / "config.json").is_file():
        raise FedskyError(f"{run}: no audit trace (audit/meta.json and config.json); run the "
                          "job with `audit = true` (or an [audit] table) to record one")
    job = parse_job(json.loads((run / "config.json").read_text()), str(run / "config.json"))
    meta, lines = read_trace(run)
    truth = read_truth(run)
    job_dir = Path(truth["job_dir"]) if truth.get("job_dir") else None
    corpus = load_job_corpus(job, job_dir)
    tok = job_tokenizer(job, job_dir, corpus)
    vocab = vocab_size(tok)
    model = build_model(job.model, vocab, job.seed)
    initial = trainable_state(model)
    docs = site_documents(job, job_dir, corpus)
    names = [s.name for s in job.sites]
    raw = {s: sequences(docs[s], tok, job.training.seq_len) for s in names}
    trained = {s: site_training(job, s, raw[s], tok) for s in names}
    token_truth = {s: set(torch.unique(trained[s]).tolist()) for s in names}

    if meta["tags"] == "centralized":  # the server holds the raw text: every token is known
        tokens = {s: _all_known(token_truth, s) for s in names}
    else:
        scores = _token_scores(job, meta, lines, run, initial)
        tokens = (attacks.token_set_metrics({s: attacks.combine_rounds(scores[s])
                                            for s in names}, token_truth)
                  if all(scores.get(s) for s in names) else {})

    _, final, _ = load_checkpoint(run / "checkpoint.safetensors")
    reference = build_model(job.model, vocab, job.seed)  # the initial model, from the seed
    load_trainable(model, final)
    rng = np.random.default_rng(seed)
    canary_out = _canaries(model, tok, job, truth, candidates, rng)
    out: dict[str, Any] = {"run": str(run), "view": meta["tags"], "sites": {}}
    for s in names:
        site: dict[str, Any] = {"token_set": tokens.get(s)}
        site["membership"] = _membership(model, reference, job, s, raw[s], max_records, rng)
        if truth.get("canary_site") == s:
            site["canaries"] = canary_out
        site["leakage"] = leakage(site)
        out["sites"][s] = site
    (audit_dir(run) / "report.json").write_text(json.dumps(out, indent=2))
    return out


def leakage(site: dict[str, Any]) -> dict[str, Any]:
    """The data leakage rate and its parts (docs/audit.md): secret items recovered beyond
    what an attacker who learnt nothing recovers by chance, over all secret items."""
    tok = site.get("token_set") or {}
    canaries = site.get("canaries") or []
    unique, found = int(tok.get("unique_tokens", 0)), int(tok.get("unique_recovered", 0))
    tok_chance = float(tok.get("unique_chance", 0.0))
    digits = sum(len(c["secret"]) for c in canaries)
    got = sum(c["digits_recovered"] for c in canaries)
    items = unique + digits
    excess = max(0.0, found - tok_chance) + max(0.0, got - digits / 10)
    return {"items": items, "recovered": found + got, "excess": excess,
            "rate": excess / items if items else math.nan,
            "unique_tokens": [found, unique], "unique_chance": tok_chance,
            "canary_digits": [got, digits], "digit_chance": digits / 10}


def _all_known(truth: dict[str, set[int]], site: str) -> dict[str, float]:
    others = set().union(*(t for s, t in truth.items() if s != site))
    unique = len(truth[site] - others)
    return {"tokens": len(truth[site]), "guessed": len(truth[site]), "recall": 1.0,
            "precision": 1.0, "chance_recall": math.nan, "base_rate": math.nan,
            "auc": 1.0, "unique_tokens": unique, "unique_recovered": unique,
            "unique_chance": 0.0, "attribution": 1.0}


def _token_scores(job: JobConfig, meta: dict[str, Any], lines: list[dict[str, Any]],
                  run: Path, like: dict[str, torch.Tensor]) -> Rows:
    """Per site, per round: a score per token from the embedding rows of its update, read
    the way the coordinator received it (plaintext, masked integers or ciphertext)."""
    names = [n for n in like if n.endswith(EMBEDDING) and like[n].dim() == 2]
    out: Rows = {}
    if not names:  # e.g. LoRA: the update has no per-token rows
        return out
    codec = make_codec(job.codec).uplink
    for line in lines:
        if line["dir"] != "up":
            continue
        tag = int(line["tag"])
        if meta["tags"] == "secure":
            r, phase = divmod(tag, 8)
            if meta["phases"][phase] != "masked":
                continue
            tensors, _ = unpack(blob(run, line["sha256"]))
            rows = _secure_rows(job, tensors, like, names, r)
        else:
            tensors, header = unpack(blob(run, line["sha256"]))
            delta = codec.decode(tensors, header["codec"], like)
            rows = {n: delta[n] for n in names}
        parts = [attacks.row_scores(rows[n]) for n in names]  # each (V,)
        score = sum(p / max(float(p.median()), 1e-30) for p in parts)
        out.setdefault(line["site"], []).append(score)
    return out


def _secure_rows(job: JobConfig, tensors: dict[str, torch.Tensor],
                 like: dict[str, torch.Tensor], names: list[str],
                 round_idx: int) -> dict[str, torch.Tensor]:
    """The embedding rows as the coordinator holds them in a secure round: plaintext on the
    `plain` route; masked integers read as signed fixed point (their scale is public, and
    irrelevant to the score); ciphertext bytes laid over the values they encrypt, which is
    all the coordinator could do with them."""
    assert job.secure is not None
    by_route = routes(job, list(like))
    rows: dict[str, torch.Tensor] = {}
    for route in ("mask", "he"):
        if not set(names) & set(by_route[route]):
            continue
        if route == "mask":
            bits = job.secure.bits
            ints = tensors["masked"].numpy().view(f"<u{bits // 8}").astype(np.float64)
            ints = np.where(ints >= 2.0 ** (bits - 1), ints - 2.0 ** bits, ints)
            chosen = randk_support(job, like, by_route, round_idx)
            if chosen is not None:
                full = np.zeros(len(chosen))
                full[chosen] = ints
                ints = full
        else:
            length = sum(like[n].numel() for n in by_route["he"])
            ints = np.resize(tensors["he"].numpy().view(np.int8).astype(np.float64), length)
        at = 0
        for n in by_route[route]:
            size = like[n].numel()
            if n in names:
                rows[n] = torch.from_numpy(ints[at:at + size].reshape(like[n].shape))
            at += size
    for n in set(names) & set(by_route["plain"]):
        rows[n] = tensors[f"plain/{n}"]
    return rows


def _canaries(model: torch.nn.Module, tok: Any, job: JobConfig, truth: dict[str, Any],
              candidates: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Exposure and greedy extraction of every planted canary under the released model."""
    cfg = job.audit.canaries if job.audit is not None else None
    if cfg is None or not truth.get("canaries"):
        return []

    def score(texts: list[str]) -> np.ndarray:
        return attacks.sequence_log_likelihood(model, encode_texts(tok, texts))

    secrets = {c["secret"] for c in truth["canaries"]}
    pool = attacks.random_secrets(candidates, cfg.digits, rng, secrets)
    out = []
    for c in truth["canaries"]:
        def render(secret: str, index: int = c["index"]) -> str:
            return canary_text(cfg, index, secret)

        pool_ll = score([render(s) for s in pool])
        rank, bits = attacks.exposure(float(score([c["text"]])[0]), pool_ll)
        guess = attacks.extract_digits(score, render, len(c["secret"]))
        out.append({"repetitions": c["repetitions"], "secret": c["secret"], "rank": rank,
                    "candidates": candidates, "exposure_bits": bits,
                    "max_exposure_bits": math.log2(candidates + 1), "extracted": guess,
                    "digits_recovered": sum(a == b for a, b in zip(guess, c["secret"],
                                                                   strict=True))})
    return out


def _membership(model: torch.nn.Module, reference: torch.nn.Module, job: JobConfig,
                site: str, raw: torch.Tensor, max_records: int,
                rng: np.random.Generator) -> dict[str, float] | None:
    """Loss-threshold membership inference: the site's trained rows vs its held-out rows."""
    train_idx, held_idx = holdout_split(job, site, len(raw))
    if len(held_idx) == 0:
        return None
    n = min(max_records, len(held_idx), len(train_idx))
    members = raw[train_idx[rng.permutation(len(train_idx))[:n]]]
    others = raw[held_idx[rng.permutation(len(held_idx))[:n]]]
    loss_in, loss_out = attacks.sequence_losses(model, members), attacks.sequence_losses(
        model, others)
    ref_in, ref_out = attacks.sequence_losses(reference, members), attacks.sequence_losses(
        reference, others)
    return {"records": n,
            "auc": attacks.auc(-loss_in, -loss_out),  # lower loss: "was trained on"
            "auc_calibrated": attacks.auc(ref_in - loss_in, ref_out - loss_out),
            "loss_members": float(loss_in.mean()), "loss_held_out": float(loss_out.mean())}


def format_table(result: dict[str, Any]) -> str:
    """A markdown table, one row per site."""
    head = ("| site | token recall | precision | chance recall | token AUC | attribution | "
            "unique found | canary exposure bits (reps) | digits | MIA AUC | MIA AUC (cal.) "
            "| leakage rate |")
    lines = [head, "|" + "---|" * 12]
    for site, r in result["sites"].items():
        t = r.get("token_set") or {}
        m = r.get("membership") or {}
        can = r.get("canaries") or []
        exp = ", ".join(f"{c['exposure_bits']:.1f} ({c['repetitions']})" for c in can) or "-"
        digits = (f"{sum(c['digits_recovered'] for c in can)}/"
                  f"{sum(len(c['secret']) for c in can)}") if can else "-"
        lk = r["leakage"]
        lines.append(
            f"| {site} | {_f(t.get('recall'))} | {_f(t.get('precision'))} | "
            f"{_f(t.get('chance_recall'))} | {_f(t.get('auc'))} | {_f(t.get('attribution'))} | "
            f"{t.get('unique_recovered', '-')}/{t.get('unique_tokens', '-')} | {exp} | "
            f"{digits} | {_f(m.get('auc'))} | {_f(m.get('auc_calibrated'))} | "
            f"{_f(lk['rate'])} |")
    return "\n".join(lines) + "\n"


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
