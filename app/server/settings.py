"""Server settings: environment variables `OLORA_*`, overridden by `olora serve` flags."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from app.adapters.local_copies import DEFAULT_MAX_BYTES
from app.server.schemas import MAX_MERGE_SOURCES

if TYPE_CHECKING:  # the engine module imports torch; `olora serve --help` should not
    from app.engine.engine import EngineConfig

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# EngineConfig fields no setting maps to: the server always runs the engine's default for them.
ENGINE_ONLY_FIELDS = {
    "target_modules": "which Linear layers get LoRA slots; None = every Linear of the blocks (adapters say theirs)",
    "kernel": "LoRA kernel choice; auto picks per device and batch (the others exist for tests and benchmarks)",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OLORA_", extra="ignore")

    # base model
    model: str | None = Field(None, description="HF id or local directory of the base model; default: embedded model")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="compute dtype; auto: bf16 on CUDA, fp32 on CPU")
    quantize: Literal["none", "nf4", "fp4", "int8"] = Field("none", description="bitsandbytes quantization of the base")
    device: str = Field("auto", description="auto (CUDA if present), cpu, cuda, cuda:N")
    self_check: Literal["on", "off"] = Field(
        "on", description="before /ready: serve a probe (base + two random LoRAs, mixed batch) and compare it with "
                          "transformers/PEFT; a mismatch refuses the start. off: skip, for a model already checked")

    # network
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, description="port to bind")
    log_format: Literal["text", "json"] = Field("text", description="json: every log line (uvicorn, engine, "
                                                                    "access, errors) one JSON object with the "
                                                                    "request id and trace id")
    allow_public_without_keys: bool = Field(
        False, description="bind a non-loopback host even though no API keys are configured")

    # adapters
    adapter_dir: Path = Field(Path("adapters"), description="persistent adapter store (shared by replicas)")
    demo_adapters: bool = Field(True, description="register the shipped demo adapters at first start")
    max_loras: int = Field(0, ge=0, description="device slots; 0 = auto: max(max_batch_size, max_cpu_adapters) "
                                                "where they fit in a tenth of the device's memory (the choice is "
                                                "logged at start)")
    max_cpu_adapters: int = Field(64, ge=1, description="host-memory LRU size")
    max_rank: int = Field(64, ge=1, description="largest adapter rank accepted (slot size)")
    max_merge_sources: int = Field(16, ge=1, le=MAX_MERGE_SOURCES, description="adapter ids in one merge (POST "
                                   "/adapters/merge, merged_adapters); a repeated id is combined into one source")
    store_poll_s: float = Field(1.0, gt=0, description="how often other replicas' store changes are picked up")
    store_rescan_s: float = Field(600.0, gt=0, description="how often the adapter index is rebuilt from the whole "
                                                          "store (a repair; each poll reads only the changes)")
    peft_dirs: list[Path] = Field(
        [], description="read-only folders of PEFT saves (<dir>/<id>/adapter_config.json): an id not in the store "
                        "is loaded from them on first request; the only roots /v1/load_lora_adapter may name")
    peft_s3_uris: list[str] = Field(
        [], description="read-only bucket prefixes of PEFT saves (s3://bucket/prefix: <prefix>/<id>/adapter_config"
                        ".json), like peft_dirs in object storage (s3_endpoint_url, s3_timeout_s and the AWS "
                        "credential chain apply); /v1/load_lora_adapter may name s3://bucket/prefix/<id> in them")
    store: Literal["local", "s3"] = Field(
        "local", description="where adapters are stored: local (adapter_dir, shared by replicas as one volume) or s3 "
                             "(an S3-compatible bucket; adapter_dir is then this replica's local cache)")
    s3_bucket: str = Field("", description="store=s3: the bucket")
    s3_prefix: str = Field("adapters", description="store=s3: the key prefix under which adapters live")
    s3_endpoint_url: str | None = Field(None, description="store=s3: the endpoint of a non-AWS store (MinIO, Ceph, "
                                                           "R2...); credentials come from the standard AWS chain")
    s3_timeout_s: float = Field(10.0, gt=0, description="store=s3: connect and read timeout of one request (504 past "
                                                         "it for the adapter asked)")
    adapter_cache_bytes: int = Field(
        DEFAULT_MAX_BYTES, gt=0, description="local disk for adapters fetched on demand (store=s3: downloaded "
                                             "versions; store=local: adapters loaded from peft_dirs), least recently "
                                             "used evicted first (fetched again when next requested)")
    fetch_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer for an on-demand adapter load "
                                                           "gets 504 (the load goes on)")

    # batching and limits
    max_batch_size: int = Field(16, ge=1, description="sequences in the running batch")
    max_batch_tokens: int = Field(2048, ge=1, description="prompt tokens prefilled per step")
    max_input_tokens: int = Field(1024, ge=1, description="longest prompt; past it: 422")
    max_total_tokens: int = Field(1536, ge=2, description="prompt + max_new_tokens per request")
    max_waiting: int = Field(256, ge=1, description="queued requests; past it: 429")
    compile: Literal["off", "on"] = Field("off", description="on: torch.compile the decode step (each new shape "
                                                            "compiles first, ~1 min on 2 CPU cores)")
    decode_graph: Literal["auto", "off", "buckets", "cuda"] = Field(
        "auto", description="auto: cuda on a CUDA device with unquantized weights, else off; buckets: decode padded "
                            "to static shapes; cuda: buckets captured as CUDA graphs")
    cpu_threads: int = Field(0, ge=0, description="intra-op threads of the forwards on CPU; 0 = auto: one less "
                                                  "than the CPUs this process may use, at least 1 (the HTTP event "
                                                  "loop keeps one)")
    cpu_gemm: Literal["onednn", "aten"] = Field("onednn", description="fp32 Linear layers on CPU: onednn (oneDNN's "
                                                "matmul on the same weights) or aten (torch's F.linear, MKL sgemm)")
    max_new_tokens_default: int = Field(20, ge=1, description="max_new_tokens when a request gives none")
    request_timeout_s: float = Field(300.0, gt=0, description="a generation running longer is cancelled (504)")
    max_request_bytes: int = Field(1 << 20, description="JSON bodies; past it: 413")
    max_upload_bytes: int = Field(512 << 20, description="compressed adapter archive; past it: 413")
    max_unpacked_bytes: int = Field(2 << 30, description="uncompressed adapter archive; past it: 413")
    metrics_max_adapter_labels: int = Field(100, ge=0, description="per-adapter metric label cardinality bound")
    metrics_require_key: bool = Field(
        False, description="with keys set, /metrics needs an API key too (its labels name adapter ids)")
    start_threads: int = Field(4, ge=1, description="threads that start generations (tokenize, submit); store I/O "
                                                    "and merges run elsewhere and cannot hold them up")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection may take to send a request's headers "
                                                         "(from opening or the previous response); then it is closed")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request body may stall between two reads; then 408 "
                                                       "and the connection closes (a stalled upload frees its slot)")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(1024, ge=1, description="connections and requests at once; past it: 503")
    drain_timeout: float = Field(30.0, ge=0, description="on SIGTERM: seconds running generations may take to "
                                                          "finish (new ones get 503); then they end with an error event")
    max_concurrent_uploads: int = Field(2, ge=1, description="adapter uploads in progress at once; past it: 429")

    tenant_max_concurrent: int = Field(0, ge=0, description="generation requests in flight per tenant (API key name); "
                                                            "past it: 429; 0 = no limit")

    # auth (comma-separated lists in the environment; an entry `name:key` names its tenant)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="keys for generation and reading; `name:key` names the tenant")
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="keys for upload/delete/merge (API keys act as admin keys when none is set)")

    @field_validator("peft_s3_uris")
    @classmethod
    def _check_s3_uris(cls, value: list[str]) -> list[str]:
        from app.adapters.store.s3_peft_folder import parse_s3_uri

        for uri in value:
            parse_s3_uri(uri)  # ValueError: not an s3://bucket/prefix URI
        return value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    def engine_config(self) -> EngineConfig:
        """The engine's configuration: every EngineConfig field from the setting of the same name (the one
        mapping from settings to the engine), except ENGINE_ONLY_FIELDS, which keep the engine's defaults."""
        from app.engine.engine import EngineConfig

        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)
                               if f.name not in ENGINE_ONLY_FIELDS})

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def check_bind(self) -> str | None:
        """Refuse a public bind without keys unless told otherwise; return a warning line to print, if any."""
        if self.auth_enabled:
            return None
        if self.host not in LOOPBACK_HOSTS and not self.allow_public_without_keys:
            raise ValueError(
                f"no API keys configured (OLORA_API_KEYS / OLORA_ADMIN_KEYS): refusing to bind {self.host}; "
                "bind 127.0.0.1, set keys, or pass --allow-public-without-keys")
        return (f"WARNING: no API keys configured: every client can generate, upload and delete adapters "
                f"(bound to {self.host})")
