"""What the leakage audit is scored against: canaries planted in one site's data, and each
site's held-out records (the non-members of membership inference).

Every site derives its own training data through `site_training`, so planting and holding out
happen where the data lives. The truth (which canaries, in which site, how often; which
records were held out) is written once by the runner into OUTPUT_DIR/audit/truth.json for the
audit to score with. Sites never send it anywhere, and the attacks in `fedsky.audit` read it
only to score their guesses. In a simulation the canary digits come from the job seed (or
`audit.canaries.seed`) so that runs are reproducible.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsky.config import JobConfig
from fedsky.config_audit import CanaryConfig
from fedsky.data import Batch, encode_texts, eos_id
from fedsky.errors import FedskyError

TRUTH = "truth.json"
# One per canary (config allows 16): distinct contexts, so canaries do not compete for one.
NAMES = ("Alvarez", "Brennan", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Kowalski",
         "Haddad", "Nguyen", "Fitzgerald", "Rossi", "Mbeki", "Larsen", "Petrov", "Quinn", "Duarte")


@dataclass(frozen=True)
class Canary:
    index: int  # its place in audit.canaries.repetitions: picks its {name}
    secret: str  # the digits, e.g. "40718345"
    text: str  # the planted string, e.g. "patient Okafor MRN is 4 0 7 1 8 3 4 5"
    repetitions: int


def canary_text(cfg: CanaryConfig, index: int, secret: str) -> str:
    """The planted string of canary `index` with these digits."""
    return cfg.template.format(name=NAMES[index], secret=cfg.separator.join(secret))


def make_canaries(job: JobConfig) -> list[Canary]:
    """One canary per entry of `audit.canaries.repetitions`, with distinct random digits."""
    cfg = job.audit.canaries if job.audit is not None else None
    if cfg is None:
        return []
    rng = np.random.default_rng([job.seed if cfg.seed is None else cfg.seed, 0xCA7A])
    out: list[Canary] = []
    for i, reps in enumerate(cfg.repetitions):
        secret = "".join(str(d) for d in rng.integers(0, 10, cfg.digits))
        out.append(Canary(i, secret, canary_text(cfg, i, secret), reps))
    return out


def holdout_split(job: JobConfig, site: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a site's sequences that it trains on, and those it holds out (seeded)."""
    frac = job.audit.holdout if job.audit is not None else 0.0
    index = [s.name for s in job.sites].index(site)
    order = torch.from_numpy(np.random.default_rng([job.seed, index, 0x401D]).permutation(n))
    held = round(frac * n)
    if held and n - held < 1:
        raise FedskyError(f"audit.holdout = {frac} leaves site {site} no training sequence")
    return order[held:].sort().values, order[:held].sort().values


def plant(seqs: torch.Tensor, canaries: list[Canary], tok: Any, seed: int) -> torch.Tensor:
    """Append one row per repetition: the canary, EOS, then a random row of the site's own
    text filling the rest (each repetition is its own record, as DP-SGD counts records)."""
    seq_len = seqs.shape[1]
    rng = np.random.default_rng([seed, 0x9147])
    rows = []
    for c in canaries:
        ids = encode_texts(tok, [c.text])[0] + [eos_id(tok)]
        if len(ids) >= seq_len:
            raise FedskyError(f"canary {c.text!r} is {len(ids)} tokens; training.seq_len "
                              f"({seq_len}) must be longer")
        for _ in range(c.repetitions):
            host = seqs[int(rng.integers(len(seqs)))]
            rows.append(torch.cat([torch.tensor(ids, dtype=seqs.dtype), host])[:seq_len])
    return torch.cat([seqs, torch.stack(rows)]) if rows else seqs


def site_training(job: JobConfig, site: str, seqs: Batch, tok: Any) -> Batch:
    """A site's training rows under [audit]: minus its held-out rows, plus its canaries."""
    if job.audit is None:
        return seqs
    train, _ = holdout_split(job, site, len(seqs))
    seqs = seqs[train]
    cfg = job.audit.canaries
    if cfg is not None and cfg.site == site:
        if not isinstance(seqs, torch.Tensor):
            raise FedskyError("audit.canaries needs plain-text sequences")
        seqs = plant(seqs, make_canaries(job), tok, job.seed)
    return seqs


def write_truth(out_dir: Path, job: JobConfig, job_dir: Path | None = None) -> Path:
    """OUTPUT_DIR/audit/truth.json: the canaries and where they are, and the job's folder
    (relative data paths resolve against it); no site data."""
    cfg = job.audit.canaries if job.audit is not None else None
    truth = {
        "canary_site": cfg.site if cfg is not None else None,
        "canaries": [asdict(c) for c in make_canaries(job)],
        "holdout": job.audit.holdout if job.audit is not None else 0.0,
        "job_dir": str(job_dir) if job_dir is not None else None,
    }
    path = Path(out_dir) / "audit" / TRUTH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth, indent=2))
    return path


def read_truth(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "audit" / TRUTH
    return json.loads(path.read_text()) if path.is_file() else {"canaries": [], "holdout": 0.0}
