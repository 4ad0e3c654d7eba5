"""The job: one typed, validated config tree loaded from TOML.

Everything a run needs is here, validated once at load time, so that a bad field fails before
any data is read or any process is started. Errors are collected, not raised one by one.
"""

from __future__ import annotations

import tomllib
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedsky.config_audit import AuditConfig, check_audit, coerce_audit
from fedsky.config_base import Strict
from fedsky.config_secure import SecureConfig, check_secure
from fedsky.errors import FedskyError
from fedsky.profiles import with_preset


class LoraConfig(Strict):
    """LoRA adapters (Hu et al. 2021) via peft: only these are trained and federated."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names to adapt: GPT-2 calls its attention projection `c_attn`; Llama, Qwen and
    # Mistral use q_proj, k_proj, v_proj, o_proj (and gate_proj, up_proj, down_proj).
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn"], min_length=1)


class ModelConfig(Strict):
    """A causal LM built from a small config (`arch`) or loaded from a local directory."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    # A local directory with a transformers causal LM (or a Hub name, when online); overrides
    # arch and the sizes below. Its tokenizer is used unless tokenizer.pretrained says otherwise.
    pretrained: str | None = None
    # The dtype the pretrained weights are loaded in; trainable tensors (LoRA) stay fp32.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # QLoRA (Dettmers et al. 2023): the frozen base in 8 or 4 bits via bitsandbytes, on a GPU.
    quantize: Literal["8bit", "4bit"] | None = None
    # Also write the adapters merged into the base, as a plain transformers model (model-merged/).
    save_merged: bool = False
    n_layer: int = Field(2, gt=0)
    n_embd: int = Field(128, gt=0)
    n_head: int = Field(4, gt=0)
    context: int = Field(256, gt=0)  # maximum positions
    dropout: float = Field(0.0, ge=0, lt=1)
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.pretrained is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.quantize is not None and (self.pretrained is None or self.lora is None):
            raise ValueError("model.quantize (QLoRA) needs model.pretrained and model.lora: a "
                             "quantized base cannot be trained itself, only adapters on it")
        if self.save_merged and self.lora is None:
            raise ValueError("model.save_merged needs model.lora: without adapters the saved "
                             "model is already the whole model")
        return self


class TokenizerConfig(Strict):
    """Train a byte-level BPE on public text, or load a pretrained tokenizer from a directory."""

    pretrained: str | None = None
    vocab_size: int = Field(4096, ge=300)
    # Which text the BPE is trained on: "eval" (the held-out public split), "train" (the pooled
    # training corpus: fine for a simulation, not for a real federation), or a file path.
    train_on: str = "eval"


class DataConfig(Strict):
    # jsonl: instruction data, one {"prompt", "response"} or {"messages": [...]} per line;
    # the loss is taken on the responses (assistant turns) only.
    format: Literal["wikitext", "text", "csv", "hf", "jsonl"] = "wikitext"
    train: str = "wikitext-2/valid.txt"  # path (or HF dataset name with format = "hf")
    eval: str | None = None  # None: hold out the last eval_fraction of the train documents
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    text_column: int | str = 0  # csv: column index or header name
    label_column: int | str | None = None  # csv: used by the dirichlet partitioner
    csv_header: bool = True
    hf_split: str = "train"
    hf_eval_split: str = "validation"
    partition: Literal["iid", "contiguous", "dirichlet", "capacity"] = "contiguous"
    dirichlet_alpha: float = Field(0.5, gt=0)
    eval_sequences: int = Field(128, gt=0)  # cap on held-out sequences evaluated each round
    # When the corpus is nowhere to be found, use English text that ships with Python (the
    # demo sets this so it runs offline anywhere); otherwise a missing path is an error.
    fallback: bool = False


Cloud = Literal["aws", "gcp", "azure", "onprem"]


class SiteProfile(Strict):
    """What a site declares about itself. `compute` is relative speed (capacity partitioning,
    the virtual clock); the link (Mbit/s, one-way ms) drives adaptive compression, link
    emulation and the virtual clock; `cloud` or `egress_usd_per_gb` price its traffic (the
    table is in `fedsky.accounting`), `usd_per_hour` its machines. A `preset` (a cloud region,
    see `fedsky.profiles`) fills in the keys the profile does not give."""

    preset: str | None = None
    compute: float = Field(1.0, gt=0)
    tokens_per_s: float | None = Field(None, gt=0)  # absolute speed; overrides `compute`
    usd_per_hour: float | None = Field(None, ge=0)  # what the site's machines cost
    bandwidth_mbps: float = Field(1000.0, gt=0)  # both directions, unless up/down are given
    up_mbps: float | None = Field(None, gt=0)  # site -> coordinator
    down_mbps: float | None = Field(None, gt=0)  # coordinator -> site
    latency_ms: float = Field(0.0, ge=0)
    cloud: Cloud | None = None  # egress price preset
    egress_usd_per_gb: float | None = Field(None, ge=0)  # overrides the preset

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return with_preset(data) if isinstance(data, dict) else data

    @property
    def up(self) -> float:
        return self.up_mbps or self.bandwidth_mbps

    @property
    def down(self) -> float:
        return self.down_mbps or self.bandwidth_mbps


class SiteConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    share: float = Field(1.0, gt=0)  # relative data share (size skew); ignored with `path`
    path: str | None = None  # the site's own data file instead of a share of the corpus
    profile: SiteProfile = SiteProfile()


class TrainingConfig(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    local_steps: int = Field(10, gt=0)
    # Asynchronous strategies: local steps proportional to compute speed (DyLU, Liu et al.
    # 2024). The fastest site (tokens/s) runs `local_steps` steps per task, another
    # local_steps * its speed / the fastest's, rounded, at least 1; slow sites' updates then
    # take about as long to compute as fast sites' and arrive less stale.
    local_steps_by_speed: bool = False
    batch_size: int = Field(16, gt=0)  # sequences per optimizer step, over all of a site's ranks
    # Micro-batches per optimizer step: batch_size / (grad_accum x ranks) sequences each, their
    # gradients summed before the step (the same step as one full batch, in less memory).
    grad_accum: int = Field(1, gt=0)
    # auto: bf16 autocast on a CUDA device that supports it, fp32 elsewhere; bf16 needs CUDA.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seq_len: int = Field(64, gt=1)
    # How a step's batch is drawn: `uniform`, batch_size sequences with replacement; `poisson`,
    # each sequence independently with probability batch_size / N (the batch size is then the
    # expected one; DP-SGD's accounting assumes it).
    sampling: Literal["uniform", "poisson"] = "uniform"
    grad_clip: float | None = Field(1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads per process (None: torch's default). Float sums depend on the thread count,
    # so runs compare bit for bit only at equal counts; 1 suits several sites on one machine.
    threads: int | None = Field(None, gt=0)
    # Keep each site's optimizer state (AdamW moments) from round to round, as DiLoCo's workers
    # do; false: a fresh optimizer every round, so a site carries no state at all.
    keep_optimizer: bool = False
    # FedProx (Li et al. 2020): mu/2 ||w - w_global||^2 added to the local loss; 0 is off.
    prox_mu: float = Field(0.0, ge=0)
    # Sequences of its own data on which a site measures the global model's loss before
    # training and its local model's after (dynamic weighting reads them).
    probe_sequences: int = Field(32, gt=0)


class FedAvgConfig(Strict):
    """McMahan et al. 2017: the sample-weighted (or uniform) mean of the site models."""

    name: Literal["fedavg"] = "fedavg"
    weighting: Literal["sequences", "uniform"] = "sequences"


class DynamicConfig(Strict):
    """Weights from each site's loss, data size and bandwidth, recomputed every round.

    `paper_b`: w_k = L_k / (|D_k| * B_k^alpha), L_k the global model's loss on the site's data
    before training, B_k its bandwidth in Mbit/s (Yang et al. 2025). `inverse_loss` and
    `softmax` weight better local models (lower loss after training) more (2410.19130).
    """

    name: Literal["dynamic"] = "dynamic"
    rule: Literal["paper_b", "inverse_loss", "softmax"] = "paper_b"
    alpha: float = Field(1.0, ge=0)  # bandwidth exponent (paper_b)
    temperature: float = Field(1.0, gt=0)  # softmax(-loss / temperature)


class FedOptConfig(Strict):
    """Pseudo-gradient aggregation with a server optimizer (Reddi et al. 2021; DiLoCo).

    The weighted mean of (old - new) goes into `.grad` of the global tensors and a torch
    optimizer steps. sgd with lr 1 and no momentum is FedAvg; sgd with nesterov momentum
    (lr 0.7, momentum 0.9) is DiLoCo's outer step.
    """

    name: Literal["fedopt"] = "fedopt"
    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd
    nesterov: bool = False  # sgd
    beta1: float = Field(0.9, ge=0, lt=1)  # adam, yogi
    beta2: float = Field(0.99, ge=0, lt=1)  # adam, yogi
    tau: float = Field(1e-3, gt=0)  # adaptivity (the eps of adam/yogi/adagrad)
    weighting: Literal["sequences", "uniform"] = "sequences"

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> FedOptConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer = 'sgd' and momentum > 0")
        return self


class RobustConfig(Strict):
    """Coordinate-wise median or trimmed mean: robust to a faulty site; needs plaintext updates."""

    name: Literal["median", "trimmed_mean"]
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmed from each end (trimmed_mean)


class StalenessConfig(Strict):
    """How much an update counts that started from a model `t` versions old (Xie et al. 2019):
    `constant` s(t) = 1; `polynomial` s(t) = (t + 1)^-a; `hinge` s(t) = 1 for t <= b, else
    1 / (a (t - b) + 1)."""

    fn: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, gt=0)
    b: int = Field(4, ge=0)


class FedAsyncConfig(Strict):
    """FedAsync (Xie et al. 2019): each site model is mixed in as it arrives,
    x <- (1 - a_t) x + a_t x_site, a_t = alpha * s(staleness). Asynchronous."""

    name: Literal["fedasync"] = "fedasync"
    alpha: float = Field(0.5, gt=0, le=1)
    staleness: StalenessConfig = StalenessConfig()
    max_staleness: int | None = Field(None, ge=0)  # older updates are dropped (and counted)


class FedBuffConfig(Strict):
    """FedBuff (Nguyen et al. 2022): s(staleness) * delta goes into a buffer; every
    `buffer_size` arrivals the server optimizer steps on the buffer's weighted mean.
    Asynchronous."""

    name: Literal["fedbuff"] = "fedbuff"
    buffer_size: int | None = Field(None, gt=0)  # K; None: the number of sites
    staleness: StalenessConfig = StalenessConfig()
    max_staleness: int | None = Field(None, ge=0)
    server: FedOptConfig = FedOptConfig()  # sgd, lr 1: the buffered FedAvg
    # Delayed Nesterov (Liu et al. 2024, with c = 0): each update is applied at once,
    # lr / K times its scaled delta, and the server's Nesterov momentum every K arrivals; after
    # K arrivals from one model that is the buffered step. Needs server sgd with nesterov
    # momentum and uniform weighting (an update's weight must be known when it arrives).
    delayed_nesterov: bool = False
    # Weigh each buffered update also by its task's duration (clock seconds from sending to
    # arrival): a site that delivers 4x as often then counts 4x less per update, so over time
    # each site weighs as `server.weighting` says, as in a synchronous round, not in
    # proportion to its speed. On the virtual clock the durations come from the profiles.
    time_weighted: bool = False

    @model_validator(mode="after")
    def _delayed_nesterov_needs_sgd_nesterov(self) -> FedBuffConfig:
        srv = self.server
        if self.delayed_nesterov and self.time_weighted:
            raise ValueError("delayed_nesterov applies each update as it arrives, with weight "
                             "1 / K; time_weighted needs the buffered mean: choose one")
        if self.delayed_nesterov and not (srv.optimizer == "sgd" and srv.nesterov
                                          and srv.weighting == "uniform"):
            raise ValueError("delayed_nesterov needs server = { optimizer = 'sgd', momentum > 0, "
                             "nesterov = true, weighting = 'uniform' }")
        return self


StrategyConfig = Annotated[
    FedAvgConfig | DynamicConfig | FedOptConfig | RobustConfig | FedAsyncConfig | FedBuffConfig,
    Field(discriminator="name"),
]
ASYNC_STRATEGIES = ("fedasync", "fedbuff")  # run by `fedsky.async_loop`, not the round loop


class CastStage(Strict):
    """Values as 16-bit floats: 2x fewer bytes; local-SGD deltas survive it (DiLoCo)."""

    name: Literal["cast"]
    dtype: Literal["fp16", "bf16"] = "fp16"


class QuantizeStage(Strict):
    """b-bit codes on a uniform grid over [-s, s] (QSGD-style, Alistarh et al. 2017).

    s is each chunk's max |value|, or `scale` for every chunk of every site: a shared grid
    agreed in advance, so integer codes can be summed (what secure aggregation will need);
    values beyond it are clipped, and error feedback carries the clipped part to later rounds.
    """

    name: Literal["quantize"]
    bits: Literal[2, 4, 8] = 8
    chunk: int = Field(4096, ge=1)  # values per scale
    stochastic: bool = True  # unbiased rounding; false: round to nearest (biased, half the error)
    scale: float | None = Field(None, gt=0)


class TopKStage(Strict):
    """The largest |values| of every chunk (Stich et al. 2018), with error feedback."""

    name: Literal["topk"]
    density: float = Field(0.01, gt=0, le=1)  # fraction kept
    chunk: int = Field(4096, ge=1, le=1 << 15)  # offsets within a chunk travel as int16


class RandKStage(Strict):
    """A random subset, the same at every site in a round (seeded from the job and round)."""

    name: Literal["randk"]
    density: float = Field(0.01, gt=0, le=1)


class LowRankStage(Strict):
    """PowerSGD (Vogels et al. 2019): rank-r factors of each 2-D tensor; the rest as is."""

    name: Literal["lowrank"]
    rank: int = Field(4, gt=0)


class ZstdStage(Strict):
    """Lossless zstd over the whole serialized payload."""

    name: Literal["zstd"]
    level: int = Field(3, ge=1, le=22)


class AdaptiveStage(Strict):
    """Each site, each round, keeps the density (and, below `min_density`, the quantize
    bit-width) at which its upload fits `budget_s` on its declared uplink."""

    name: Literal["adaptive"]
    budget_s: float = Field(gt=0)  # per-round upload time: latency + bytes / bandwidth
    min_density: float = Field(1e-4, gt=0, le=1)
    max_density: float = Field(0.1, gt=0, le=1)


StageConfig = Annotated[
    CastStage | QuantizeStage | TopKStage | RandKStage | LowRankStage | ZstdStage | AdaptiveStage,
    Field(discriminator="name"),
]

# The order stages run in: reshape the update, then code its values, then the bytes.
STAGE_STEP = {"topk": 0, "randk": 0, "lowrank": 0, "cast": 1, "quantize": 1, "zstd": 2}


def _check_pipeline(direction: str, stages: list[Any]) -> None:
    names = [st.name for st in stages]
    steps = [STAGE_STEP[n] for n in names if n != "adaptive"]
    if len(set(steps)) != len(steps) or steps != sorted(steps) or names.count("adaptive") > 1:
        raise ValueError(
            f"codec.{direction} = {names}: stages run in the order [topk | randk | lowrank] -> "
            "[cast | quantize] -> [zstd], at most one of each group (plus one adaptive)")
    if "adaptive" in names:
        if direction == "downlink":
            raise ValueError("codec.downlink: adaptive is per site and per upload; the downlink "
                             "sends one payload to many sites, so it has no adaptive stage")
        if not {"topk", "randk"} & set(names):
            raise ValueError("codec.uplink: adaptive chooses a density, so it needs a topk or "
                             "randk stage in the same pipeline")
        ad = next(st for st in stages if st.name == "adaptive")
        if ad.min_density > ad.max_density:
            raise ValueError("codec.uplink: adaptive min_density exceeds max_density")


class CodecConfig(Strict):
    """How updates are encoded on the wire, each way: a pipeline of stages per direction.

    The uplink carries each site's update; the downlink the change of the global model since
    the one the site holds (the whole model when it holds none). Empty pipelines send fp32.
    """

    uplink: list[StageConfig] = Field(default_factory=list)
    downlink: list[StageConfig] = Field(default_factory=list)
    # The site keeps what compression dropped and adds it to its next update (Karimireddy et
    # al. 2019). The downlink needs no switch: each delta is taken against what the site holds.
    error_feedback: bool = True

    @model_validator(mode="after")
    def _stage_order(self) -> CodecConfig:
        _check_pipeline("uplink", self.uplink)
        _check_pipeline("downlink", self.downlink)
        return self


class CoordinatorConfig(Strict):
    min_sites: int = Field(1, gt=0)  # quorum: fewer updates than this and the round is skipped
    sites_per_round: int | None = Field(None, gt=0)  # None: every site, every round
    round_deadline_s: float = Field(600.0, gt=0)
    join_timeout_s: float = Field(120.0, gt=0)  # gRPC: how long to wait for sites to connect
    # gRPC: how long a round waits for a site that dropped after getting its task to rejoin
    rejoin_wait_s: float = Field(30.0, ge=0)
    # Reject an update whose L2 norm (over all its tensors) is above this; None: no bound
    max_update_norm: float | None = Field(None, gt=0)
    # Fold each update into one running sum as its chunks arrive (memory: one model, not one
    # per site); FedAvg/FedOpt with plain fp32 uplinks, and masked secure rounds; others
    # buffer (fedsky.streaming)
    streaming: bool = False
    # Streaming: keep each upload's folded values in an unlinked file in output_dir (page
    # cache, not memory) so an update refused after part of it was summed is subtracted
    # again and the round goes on; false saves that write, and such an update voids the round
    streaming_undo: bool = True
    cloud: Cloud | None = None  # where the coordinator runs: prices the downlink's egress
    egress_usd_per_gb: float | None = Field(None, ge=0)  # overrides the preset


class TransportConfig(Strict):
    kind: Literal["inprocess", "grpc"] = "inprocess"
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port
    chunk_bytes: int = Field(1 << 20, ge=1024, le=1 << 22)
    # Mutual TLS (see `fedsky certs`): the coordinator's certificate and key, and the project
    # CA that issued them and every site's certificate. None of them with `fedsky run`: a
    # throwaway CA in OUTPUT_DIR/pki.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    revocation_list: str | None = None  # revoked serial numbers (fedsky certs revoke)
    insecure: bool = False  # plaintext gRPC, sites known by token only: trusted networks only
    keepalive_s: float = Field(30.0, ge=1)  # gRPC keepalive pings that detect dead peers
    # In-process only: delay each transfer by latency + bytes / bandwidth of the site's link.
    emulate_links: bool = False

    @model_validator(mode="after")
    def _tls_files(self) -> TransportConfig:
        given = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(self, k) is not None]
        if given and len(given) < 3:
            raise ValueError("mutual TLS needs tls_cert, tls_key and tls_ca together; "
                             f"only {', '.join(given)} set (make them with `fedsky certs`)")
        if given and self.insecure:
            raise ValueError("insecure = true turns TLS off; remove it or the tls_* files")
        if self.revocation_list is not None and not given:
            raise ValueError("revocation_list needs mutual TLS (tls_cert, tls_key, tls_ca)")
        return self


class TrackingConfig(Strict):
    """Experiment trackers that also receive each round's numbers (optional installs).

    Whether they are installed is checked in `load_job`, not here: a site receives the job too
    and need not have them.
    """

    tensorboard: bool = False  # event files in OUTPUT_DIR/tensorboard (pip install tensorboard)
    mlflow: bool = False  # to MLflow's tracking URI, e.g. $MLFLOW_TRACKING_URI (pip install mlflow)
    mlflow_experiment: str | None = None  # None: MLflow's default experiment

    @model_validator(mode="after")
    def _experiment_needs_mlflow(self) -> TrackingConfig:
        if self.mlflow_experiment is not None and not self.mlflow:
            raise ValueError("mlflow_experiment is set but mlflow is false")
        return self


class DpSgdConfig(Strict):
    """Record-level DP-SGD at every site (Abadi et al. 2016): per-sequence gradients clipped to
    `max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm on their sum."""

    noise_multiplier: float | None = Field(None, ge=0)
    # Or: each site plans the smallest multiplier that keeps rounds * local_steps steps at its
    # own sample rate within (target_epsilon, delta).
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "pld"  # for planning and the budget; both are reported

    @model_validator(mode="after")
    def _one_noise_source(self) -> DpSgdConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self


class AdaptiveClipConfig(Strict):
    """Clip at a noised quantile of the update norms, learned online (Andrew et al. 2021)."""

    quantile: float = Field(0.5, gt=0, lt=1)  # target fraction of updates left unclipped
    initial: float = Field(0.1, gt=0)  # C in the first round
    lr: float = Field(0.2, gt=0)  # geometric step size
    count_noise: float | None = Field(None, gt=0)  # std on the unclipped count; None: sites/20


class ClientDpConfig(Strict):
    """Client-level DP on each site's update (DP-FedAvg, McMahan et al. 2018): clip the update
    to L2 norm C, add Gaussian noise of std noise_multiplier * C to the sum of updates."""

    clip: float | AdaptiveClipConfig = Field(union_mode="left_to_right")
    noise_multiplier: float = Field(ge=0)
    # central: the coordinator clips and noises; distributed: each site clips and adds its
    # share N(0, (z C)^2 / sites per round), so no one sees an un-noised update.
    placement: Literal["central", "distributed"] = "central"
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "pld"

    @field_validator("clip")
    @classmethod
    def _positive(cls, clip: float | AdaptiveClipConfig) -> float | AdaptiveClipConfig:
        if isinstance(clip, float) and clip <= 0:
            raise ValueError("clip must be > 0 (a norm), or a table {quantile, initial, lr}")
        return clip


class PrivacyConfig(Strict):
    dp_sgd: DpSgdConfig | None = None
    client: ClientDpConfig | None = None
    # Stop training (checkpoint written) before any epsilon the run accounts would exceed it.
    budget_epsilon: float | None = Field(None, gt=0)
    # Noise and Poisson sampling from the OS CSPRNG; false: seeded, reproducible, not private.
    secure_mode: bool = True

    @model_validator(mode="after")
    def _something_on(self) -> PrivacyConfig:
        if self.dp_sgd is None and self.client is None:
            raise ValueError("[privacy] needs a dp_sgd or a client table (budget_epsilon "
                             "needs an accountant, and an accountant needs a mechanism)")
        return self


class JobConfig(Strict):
    name: str = "job"
    seed: int = 0
    rounds: int = Field(10, gt=0)
    output_dir: str = "runs/job"
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    sites: list[SiteConfig] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = FedAvgConfig()
    codec: CodecConfig = CodecConfig()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    transport: TransportConfig = TransportConfig()
    tracking: TrackingConfig | None = None
    privacy: PrivacyConfig | None = None
    secure: SecureConfig | None = None  # secure aggregation / encryption (fedsky.secure_round)
    audit: AuditConfig | None = None  # record the coordinator's view (fedsky.audit_trace)

    @field_validator("audit", mode="before")
    @classmethod
    def _audit_flag(cls, value: Any) -> Any:
        return coerce_audit(value)

    @field_validator("sites")
    @classmethod
    def _unique_names(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        names = [s.name for s in sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dupes)}")
        return sites

    @model_validator(mode="after")
    def _cross_field(self) -> JobConfig:
        if self.training.batch_size % self.training.grad_accum:
            raise ValueError(f"training.batch_size ({self.training.batch_size}) must be a "
                             f"multiple of training.grad_accum ({self.training.grad_accum})")
        if self.coordinator.min_sites > len(self.sites):
            raise ValueError(
                f"coordinator.min_sites ({self.coordinator.min_sites}) exceeds the number of "
                f"sites ({len(self.sites)})"
            )
        per_round = self.coordinator.sites_per_round
        if per_round is not None and per_round < self.coordinator.min_sites:
            raise ValueError("coordinator.sites_per_round is below coordinator.min_sites")
        if self.training.seq_len > self.model.context and self.model.pretrained is None:
            raise ValueError(
                f"training.seq_len ({self.training.seq_len}) exceeds model.context "
                f"({self.model.context})"
            )
        if self.data.partition == "dirichlet" and self.data.label_column is None:
            raise ValueError("data.partition = 'dirichlet' needs data.label_column")
        if self.transport.emulate_links and self.transport.kind != "inprocess":
            raise ValueError("transport.emulate_links applies to the in-process transport; over "
                             "gRPC the links are real (shape them with tc, or drop the flag)")
        if self.privacy is not None:
            _check_privacy(self)
        if self.secure is not None:
            check_secure(self)
            if self.coordinator.max_update_norm is not None:
                raise ValueError("coordinator.max_update_norm needs plaintext updates; with "
                                 "[secure] the coordinator never sees one site's update")
        if self.strategy.name in ASYNC_STRATEGIES:
            _check_async(self)
        elif self.training.local_steps_by_speed:
            raise ValueError("training.local_steps_by_speed applies to asynchronous strategies "
                             f"({', '.join(ASYNC_STRATEGIES)}); a synchronous round trains "
                             "every site for local_steps")
        if self.audit is not None:
            check_audit(self)
        return self


def _check_async(job: JobConfig) -> None:
    """What an asynchronous strategy cannot be combined with (JobConfig._cross_field)."""
    name = job.strategy.name
    if job.privacy is not None:
        raise ValueError(f"strategy {name!r} is asynchronous and [privacy] is not supported "
                         "with it yet: its accounting assumes each site trains once per "
                         "round, but in an async run a fast site trains more often")
    if job.secure is not None:  # fedbuff's K buffered updates could be the cohort: not built
        raise ValueError(f"strategy {name!r} is asynchronous and [secure] is not supported "
                         "with it yet: masks and encryption need a fixed cohort of updates")
    if job.coordinator.sites_per_round is not None:
        raise ValueError(f"strategy {name!r} is asynchronous: every site trains all the time, "
                         "so coordinator.sites_per_round does not apply; remove it")


def _check_privacy(job: JobConfig) -> None:
    """Cross-field rules of [privacy] (called from JobConfig._cross_field)."""
    priv = job.privacy
    assert priv is not None
    if priv.dp_sgd is not None and job.training.sampling != "poisson":
        raise ValueError("privacy.dp_sgd needs training.sampling = 'poisson': its accounting "
                         "assumes each sequence joins a batch independently, with probability "
                         "batch_size / N")
    if priv.dp_sgd is not None and job.data.format == "jsonl":
        raise ValueError("privacy.dp_sgd with data.format = 'jsonl' is not supported yet: its "
                         "per-sequence losses cover every token, not the responses only")
    if priv.dp_sgd is not None and job.training.grad_accum > 1:
        raise ValueError("privacy.dp_sgd takes one Poisson sample per step; set "
                         "training.grad_accum = 1")
    if priv.dp_sgd is not None and job.training.keep_optimizer:
        raise ValueError("privacy.dp_sgd builds its own optimizer each round; "
                         "training.keep_optimizer is not supported with it")
    if job.strategy.name == "dynamic":
        raise ValueError("privacy: strategy 'dynamic' weighs sites by losses on their data, "
                         "which private sites do not report (they are not covered by epsilon)")
    client = priv.client
    if client is None:
        return
    if job.strategy.name not in ("fedavg", "fedopt") or job.strategy.weighting != "uniform":
        raise ValueError("privacy.client needs strategy fedavg or fedopt with weighting = "
                         "'uniform': the noise is calibrated to one clipped update in a plain sum")
    if client.placement == "distributed" and not isinstance(client.clip, float):
        raise ValueError("privacy.client: adaptive clipping needs placement = 'central' (the "
                         "coordinator learns the clip from the updates' norms); give a fixed "
                         "clip for distributed noise")


_HINTS = {
    "extra_forbidden": "unknown key: check the spelling against docs/config.md",
    "missing": "this field is required",
    "literal_error": "use one of the allowed values",
}


def format_validation_error(err: ValidationError, source: str) -> str:
    """Every problem on its own line: `source: path.to.field: message (hint)`."""
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(e["type"])
        lines.append(f"  {path}: {msg}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals when they parse as such, else plain strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; `sites.0.share=2` indexes into lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedskyError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rounds=5")
        node: Any = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise FedskyError(f"--set {key}: {part!r} is not an index of that list")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise FedskyError(f"--set {key}: {part!r} is a value, not a table")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise FedskyError(f"--set {key}: {last!r} is not an index of that list")
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return raw


def parse_job(raw: dict[str, Any], source: str = "job") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise FedskyError(format_validation_error(err, source)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (values, lists such as `sites`) is replaced, and
    so is a table that names a different kind (`[strategy] name = ...`): its keys differ."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if (isinstance(value, dict) and isinstance(old, dict)
                and value.get("name", old.get("name")) == old.get("name")):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_job_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A job file as a dict; `extends = "base.toml"` (relative to the file) inherits a base,
    so experiment arms state only what differs."""
    if not path.is_file():
        raise FedskyError(f"job file not found: {path}")
    if path.resolve() in seen:
        raise FedskyError(f"{path}: `extends` loops back to itself")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FedskyError(f"{path}: not valid TOML: {err}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise FedskyError(f"{path}: `extends` must be a path string")
    base = read_job_toml(path.parent / parent, (*seen, path.resolve()))
    return _merge(base, raw)


def load_job(path: str | Path, overrides: list[str] | None = None) -> tuple[JobConfig, Path]:
    """Read, override and validate a job file; returns the config and the job file's folder."""
    path = Path(path)
    raw = apply_overrides(read_job_toml(path), overrides or [])
    job = parse_job(raw, str(path))
    check_trackers_installed(job, str(path))
    return job, path.resolve().parent


def check_trackers_installed(job: JobConfig, source: str) -> None:
    """Fail before the run, not at round 0, when an enabled tracker cannot be imported."""
    t = job.tracking
    if t is None:
        return
    missing = [pkg for on, pkg in ((t.tensorboard, "tensorboard"), (t.mlflow, "mlflow"))
               if on and find_spec(pkg) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        off = " and ".join(f"tracking.{m} = false" for m in missing)
        raise FedskyError(f"{source}: tracking enables {' and '.join(missing)}, which {verb} "
                          f"not installed: pip install {' '.join(missing)} (or set {off})")
