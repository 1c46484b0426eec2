"""Server settings: one pydantic object fed by CLI flags and ``CODEDSMOOTH_*`` env vars."""

from __future__ import annotations

import math
import os
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from codedsmooth.core.spec import DEFAULT_DECODE_TOLERANCE, DEFAULT_SCOPE, Scope


class ServeSettings(BaseSettings):
    """Everything ``codedsmooth serve`` can be told. Flags win over env vars, env vars over defaults."""

    model_config = SettingsConfigDict(env_prefix="CODEDSMOOTH_", extra="ignore")

    checkpoint: str | None = Field(None, description="checkpoint directory (default: the embedded default checkpoint)")
    model_repository: str | None = Field(
        None,
        description="serve every checkpoint directory under this directory, each by its directory name, with its own queue and batcher (docs/serving.md, Model repository); instead of --checkpoint (default: none)",
    )
    default_model: str | None = Field(
        None,
        description="with --model-repository: the model or alias /v1/predict uses (default: the only model, when there is one)",
    )
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description="with --model-repository: explicit also allows POST /v2/repository/models/NAME/load and .../unload (default: none, the models loaded at start stay)",
    )
    model_threads: Literal["shared", "per-model"] = Field(
        "shared",
        description="with --model-repository: shared: every model's device batches take turns on the one model thread; per-model: each model runs its batches on a thread of its own, so a flood on one model does not hold another's batches (on CPU give --threads 1: each model's torch work then stays on its own thread and core) (default: shared)",
    )
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in the container)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    device: str | None = Field(None, description="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="most items in one device batch")
    max_delay_ms: float = Field(5.0, ge=0, description="longest wait for batch-mates, from the first request's arrival")
    max_queue_size: int = Field(256, ge=1, description="requests waiting for the model; beyond this, 503 + Retry-After")
    timeout_ms: float = Field(
        10000.0, gt=0, description="deadline per request, from when the server read its first byte; 504 when passed"
    )
    rci: bool = Field(True, description="randomized coded inference on/off")
    rci_scope: Scope | None = Field(
        None,
        description=f"code each request with trusted filler (request) or the whole micro-batch together (batch) (default: {DEFAULT_SCOPE})",
    )
    rci_group_size: int | None = Field(None, ge=2, description="K at inference (default: the checkpoint's K)")
    coded_points: int | None = Field(
        None, ge=2, description="N at inference (default: the N the checkpoint was trained to end at, scaled to K)"
    )
    rci_decode_tolerance: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=f"request scope: skip coded samples whose decoder weight for the group's items is below this; 0 = full decode (default: {DEFAULT_DECODE_TOLERANCE:g})",
    )
    rci_seed: int | None = Field(
        None,
        description="replace the OS CSPRNG with a seed, restarted for each request (batch scope: each batch) (tests and reproduction only: clients could predict the code)",
    )
    rci_check_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of batches also run without RCI to count label flips and the decode residual",
    )
    input_noise_sigma: float = Field(
        0.0,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="a noise baseline: add fresh Gaussian noise of this standard deviation (OS randomness, not clipped) to every input pixel before the model, with or without RCI (0: off)",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body; bigger gets 413 before it is read"
    )
    max_items_per_request: int | None = Field(
        None,
        ge=1,
        description="most items (tensors or images) in one request; more gets 413. At most --max-batch-size, so one request is one device batch (default: --max-batch-size)",
    )
    max_image_pixels: int = Field(
        4_194_304,
        ge=1,
        description="most pixels (width x height) of one uploaded image, read from its header before decoding; more gets 413",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="most open client connections; a request on a connection beyond it gets 503 + Retry-After and the connection closes",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="time from a request's arrival to the last byte of its body (at most --timeout-ms); slower gets 408 and the connection closes",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="time from a connection's first byte (or its opening) to the end of a request's headers; slower connections are closed",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="largest request head (request line and header fields, as nginx's 4 x 8 KiB); larger gets 431 and the connection closes",
    )
    max_headers: int = Field(
        100, ge=8, description="most header fields in one request; more gets 431 and the connection closes"
    )
    keep_alive_s: float = Field(
        15.0,
        gt=0,
        description="idle keep-alive connections are closed after this long (uvicorn timeout_keep_alive); above the 5 s idle expiry of common clients (httpx, requests), so a client never reuses a connection the server is closing",
    )
    api_keys_file: str | None = Field(
        None,
        description="clients and the SHA-256 of their keys, one a line (codedsmooth keys add NAME --file PATH); every route but health then needs Authorization: Bearer KEY, else 401. Re-read when it changes (default: none, the server answers anyone)",
    )
    rate_limit: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="items per second per API key (a token bucket of --max-batch-size items); over it 429 + Retry-After (needs --api-keys-file; default: none)",
    )
    quota: int | None = Field(
        None,
        ge=0,
        description="items per API key per --quota-window-s; over it 429 + Retry-After (needs --api-keys-file; default: none)",
    )
    quota_window_s: float = Field(
        86400.0, gt=0, allow_inf_nan=False, description="the quota's window in seconds, from a key's first item in it"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address of the Prometheus /metrics listener (0.0.0.0 only where the operator's network needs it)",
    )
    metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="port of the Prometheus /metrics listener, separate from the public port (0: any free port, logged at start)",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the CPU quota)")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long to finish in-flight requests before exiting"
    )
    log_level: str = Field("info", description="uvicorn log level")
    # Ray Serve (codedsmooth.service.ray.serve); only used with --replicas
    replicas: int | None = Field(
        None,
        ge=1,
        description="serve on Ray Serve with this many replicas, one engine each (default: none, one process as without Ray); with --min/--max-replicas, the initial count",
    )
    min_replicas: int | None = Field(
        None, ge=0, description="Ray Serve autoscaling: fewest replicas (needs --replicas; default: no autoscaling)"
    )
    max_replicas: int | None = Field(
        None, ge=1, description="Ray Serve autoscaling: most replicas (needs --replicas; default: no autoscaling)"
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Ray Serve autoscaling: ongoing requests per replica to aim for (default: --max-batch-size, one device batch)",
    )
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="Ray Serve: CPUs reserved per replica; also its torch threads when --threads is not given",
    )
    num_gpus: float = Field(
        0.0,
        ge=0,
        description="Ray Serve: GPUs reserved per replica (Ray sets CUDA_VISIBLE_DEVICES; --device cuda then means that GPU)",
    )
    ray_address: str | None = Field(
        None,
        description="Ray Serve: address of an existing Ray cluster to join, e.g. 10.0.0.5:6379 or auto (default: start a local one)",
    )
    expose_model_details: bool = Field(
        False,
        description="GET /v1/models also shows how the model was made (training method, data set, test accuracy, target block); off: name, input shape, classes and the RCI spec only",
    )
    output: Literal["scores", "labels"] = Field(
        "scores",
        description="what answers carry: scores (v1 probabilities, v2 probabilities and index) or labels (only the top-1 label: v1 label and index, v2 label and index tensors; no probabilities or logits), the usual first mitigation against score-based attacks (docs/serving.md, Label-only answers)",
    )

    load_timeout_s: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=False,
        description="with --model-control explicit: a load (or reload) of a model not done in this many seconds is reported failed (504) and the model stays unloaded; loads run on a thread of their own, so serving never waits for one",
    )
    allow_external_symlinks: bool = Field(
        False,
        description="with --model-repository: follow symlinks in the repository that lead outside it (default: refused with 400 naming the file)",
    )
    quota_state: str | None = Field(
        None,
        description="SQLite file keeping the quota counters across restarts, or none to keep them in memory only (default: the keys file's name plus .quota.sqlite, beside it)",
    )
    quota_flush_ms: float = Field(
        200.0,
        gt=0,
        le=60000,
        allow_inf_nan=False,
        description="how often the quota counters are written to --quota-state; a crash loses at most the items charged in this interval",
    )

    @model_validator(mode="after")
    def _items_fit_a_batch(self):
        if self.max_items_per_request is None:
            self.max_items_per_request = self.max_batch_size
        elif self.max_items_per_request > self.max_batch_size:
            raise ValueError(
                f"max_items_per_request ({self.max_items_per_request}) must not exceed max_batch_size ({self.max_batch_size}): one request runs as one device batch"
            )
        if self.api_keys_file is None and (self.rate_limit is not None or self.quota is not None):
            raise ValueError("rate_limit and quota need api_keys_file: limits are per API key")
        if self.model_repository is None:
            repo_only = (
                [n for n in ("default_model",) if getattr(self, n) is not None]
                + (["model_control"] if self.model_control != "none" else [])
                + (["model_threads"] if self.model_threads != "shared" else [])
            )
            if repo_only:
                raise ValueError(f"{' and '.join(repo_only)} only apply with model_repository")
        elif self.checkpoint is not None:
            raise ValueError("give either checkpoint or model_repository, not both")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("metrics_port must differ from port: /metrics is not served on the public port")
        if self.replicas is None:
            ray_only = [
                n
                for n in ("min_replicas", "max_replicas", "target_ongoing_requests", "ray_address")
                if getattr(self, n) is not None
            ]
            if ray_only:
                raise ValueError(f"{', '.join(ray_only)} need replicas: Ray Serve runs only with --replicas N")
        elif (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        elif self.min_replicas is not None and not (self.min_replicas <= self.replicas <= self.max_replicas):
            raise ValueError(
                f"replicas ({self.replicas}) must lie within min_replicas..max_replicas ({self.min_replicas}..{self.max_replicas})"
            )
        return self

    @property
    def autoscaling(self) -> bool:
        return self.replicas is not None and self.max_replicas is not None

    @field_validator("checkpoint", "ray_address", "api_keys_file", "model_repository", "default_model", "quota_state")
    @classmethod
    def _checkpoint(cls, value):
        return value or None  # an empty env var (as compose passes through) means the default

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value in (None, "", "auto"):
            return None
        if not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup quota if one is set, else the affinity mask."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
