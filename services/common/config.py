"""All configuration, typed, in one place. Every value comes from the
environment (the names are the field names upper-cased, with the prefix
shown), with the default beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _from_env(cls: type[T], prefix: str = "") -> T:
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = os.environ.get(f"{prefix}{f.name}".upper())
        if raw is None:
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif kind.startswith("int"):
            values[f.name] = int(raw)
        elif kind.startswith("float"):
            values[f.name] = float(raw)
        elif kind.startswith("Path"):
            values[f.name] = Path(raw)
        else:
            values[f.name] = raw
    return cls(**values)


@dataclass(frozen=True)
class SecurityConfig:
    """Between the services. Environment: ORFEAS_<FIELD>.

    service_token: a shared secret every gRPC call between the services (and
    from grpcurl) carries as `authorization: Bearer <token>`; empty means none.
    tls_cert / tls_key: PEM files that turn the gRPC servers to TLS.
    tls_ca: the PEM bundle clients trust for the servers' certificates;
    setting it turns the clients to TLS.
    """

    service_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    @staticmethod
    def from_env() -> "SecurityConfig":
        return _from_env(SecurityConfig, "ORFEAS_")


def _data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", "data")).resolve()


@dataclass(frozen=True)
class GenerationConfig:
    """services/generation. Environment: GENERATION_<FIELD>, plus DATA_DIR."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=_data_dir)
    telemetry_address: str = "127.0.0.1:50052"
    # Dynamic batcher knobs, named as Triton names them.
    max_batch_size: int = 8
    max_queue_delay_ms: float = 15.0
    queue_limit: int = 64
    # The devices to compute on, one batch worker each, all taking from the one queue: a comma list
    # such as "cuda:0,cuda:1" or "cpu". Empty: every CUDA device torch sees, else "cpu". A device
    # may repeat ("cpu,cpu": two workers sharing the CPU; they share its memory budget and its
    # loaded weights). Checked at start-up (services/generation/devices.py).
    devices: str = ""
    # Memory budget: the share of device memory (or, on the CPU, of system
    # memory) a batch may use; workers sharing a device split it.
    target_utilization: float = 0.85
    cpu_memory_share: float = 0.5
    # An injected device capacity in MiB: a batch whose modelled footprint is
    # larger fails as if the allocator had run out of memory. It exercises the
    # out-of-memory path on the CPU, where Linux overcommits instead of
    # failing an allocation. 0 means none. One value for every worker, or a
    # comma list with one value per entry of `devices` ("300,0": the first
    # worker only).
    memory_limit_mb: str = "0"
    # Processes that run mesh_export for meshes over export_inline_max_faces
    # faces (smaller ones export on a thread; 0 processes: every export does).
    # Split among the workers, at least one each: a stuck export is replaced
    # without touching another worker's.
    export_processes: int = 2
    export_inline_max_faces: int = 250_000
    grace_period_s: float = 20.0
    max_attempts: int = 2
    # How long a write to the job database waits for another process's lock
    # (a backup, a sqlite3 shell) before the call fails UNAVAILABLE.
    store_lock_wait_s: float = 30.0
    # Free space kept under DATA_DIR: below it submissions are refused (HTTP 507) and no new job
    # starts, until space returns.
    min_free_mb: float = 512.0
    # A running job with no progress (no committed event) for this long is requeued, or failed
    # "stalled" once out of attempts. 0: automatic, several times the longest recent stage and at
    # least 120 s.
    stall_s: float = 0.0
    # Extra shape backends: comma-separated Python modules, each defining BACKEND (a ShapeBackend)
    # and PARAMETERS (its ranges). For a site's own backend, and for the tests' slow and hanging ones.
    backend_plugins: str = ""
    # Retention: finished jobs and their files expire after this long, and the
    # oldest go first whenever the result files exceed the disk budget.
    retention_s: float = 7 * 24 * 3600.0
    artifact_budget_mb: float = 10_240.0
    retention_interval_s: float = 60.0
    device_sample_interval_s: float = 5.0
    # Reports waiting for telemetry, per kind; beyond it the oldest are dropped (and counted).
    telemetry_buffer_size: int = 1000
    # Prometheus metrics over HTTP on this port (0: off).
    metrics_port: int = 9101
    log_level: str = "INFO"
    # --- Several instances (README "Many machines") ---
    # PostgreSQL shared by every instance: jobs, their events and the queue (postgresql://user:pass@host/db).
    # Empty: SQLite under DATA_DIR, for one instance.
    database_url: str = ""
    # Connections each instance keeps to it, and how long a call waits for one before failing UNAVAILABLE.
    database_pool_size: int = 10
    database_timeout_s: float = 5.0
    # A running job's claim lasts this long unless its instance renews it (every third of it); an
    # instance that died loses its jobs to the others after at most this long.
    lease_s: float = 30.0
    # On PostgreSQL, how many of the first queued jobs get a `queued` event whenever their place moves
    # (the others learn it on the way up; a status call always gives the exact place).
    queue_events_depth: int = 100
    # Where results and input pictures live; every instance must reach the same folder (a shared
    # volume). Empty: DATA_DIR/artifacts.
    artifacts_dir: str = ""
    # `make run` (services/stack.py) starts this many generation processes, on port, port + 1, ...;
    # with more than one and no database_url it starts a private PostgreSQL under DATA_DIR.
    instances: int = 1

    @property
    def artifacts_path(self) -> Path:
        return Path(self.artifacts_dir).resolve() if self.artifacts_dir else self.data_dir / "artifacts"

    @staticmethod
    def from_env() -> "GenerationConfig":
        cfg = _from_env(GenerationConfig, "GENERATION_")
        port = os.environ.get("GENERATION_PORT")
        tel = os.environ.get("TELEMETRY_PORT")
        updates: dict[str, Any] = {}
        if port:
            updates["port"] = int(port)
        if tel and "GENERATION_TELEMETRY_ADDRESS" not in os.environ:
            updates["telemetry_address"] = f"127.0.0.1:{int(tel)}"
        return _replace(cfg, updates)


@dataclass(frozen=True)
class HunyuanConfig:
    """The `hunyuan3d` shape backend (services/generation/backends/hunyuan3d.py). Environment: HUNYUAN3D_<FIELD>.

    model_path: a local folder laid out like the `hunyuan3d-dit-v2-0` folder of
    the `tencent/Hunyuan3D-2` model repository: `config.yaml` and
    `model.fp16.safetensors`. Empty: the backend is off (inflate still serves).
    The service never downloads; it loads this folder once per device at
    start-up (fp16 on CUDA, fp32 on the CPU) and keeps it warm.
    decode_chunk_points: query points per call of the volume decoder; each
    call is one progress report and one chance to stop. Memory per batch item
    grows with it.
    box_bound: the decoded volume spans [-box_bound, box_bound]^3 (the model's
    training box, 1.01 in hy3dgen).
    flashvdm: decode the volume with FlashVDM's "lightning" decoder (hy3dgen's
    FlashVDMVolumeDecoding: a coarse grid first, then finer ones only near the
    surface, each query attending to the latents it needs most) instead of
    the dense one that queries every point of the grid.
    vae_path: a separate VAE folder that replaces the model folder's own, laid
    out like `hunyuan3d-vae-v2-0-turbo` (`config.yaml` with `target` and
    `params`, `model.fp16.safetensors`); empty: the model folder's VAE. It
    is loaded through the same offline code, and its latents must match the
    model's.
    """

    model_path: str = ""
    decode_chunk_points: int = 65_536
    box_bound: float = 1.01
    flashvdm: bool = False
    vae_path: str = ""

    @staticmethod
    def from_env() -> "HunyuanConfig":
        return _from_env(HunyuanConfig, "HUNYUAN3D_")


@dataclass(frozen=True)
class TelemetryConfig:
    """services/telemetry. Environment: TELEMETRY_<FIELD>, plus DATA_DIR."""

    host: str = "127.0.0.1"
    port: int = 50052
    data_dir: Path = field(default_factory=_data_dir)
    window_s: float = 900.0  # the sliding window the windowed aggregates cover
    target_utilization: float = 0.85
    # Prometheus metrics over HTTP on this port (0: off).
    metrics_port: int = 9102
    log_level: str = "INFO"
    # PostgreSQL for the history (profiles, samples, the optimizer's observations and decisions), so the
    # service can move between machines and keeps what it learned. Empty: SQLite under DATA_DIR.
    database_url: str = ""

    @staticmethod
    def from_env() -> "TelemetryConfig":
        return _from_env(TelemetryConfig, "TELEMETRY_")


@dataclass(frozen=True)
class GatewayConfig:
    """gateway. Environment: GATEWAY_<FIELD>."""

    host: str = "127.0.0.1"
    port: int = 5000
    generation_address: str = "127.0.0.1:50051"
    telemetry_address: str = "127.0.0.1:50052"
    max_upload_bytes: int = 20 * 1024 * 1024
    # When set, every /api/ call must carry `Authorization: Bearer <auth_token>`.
    auth_token: str = ""
    # Comma-separated origins allowed by CORS; empty (the default) means CORS is off.
    cors_origins: str = ""
    # Seconds between keep-alive comments on a quiet SSE stream (proxies drop idle connections).
    sse_keepalive_s: float = 15.0
    # An SSE or WebSocket stream whose generation instance went away is resumed (on another instance, or
    # on the same one once it is back) from the last event it delivered, for up to this long.
    stream_resume_s: float = 30.0
    log_level: str = "INFO"

    @staticmethod
    def from_env() -> "GatewayConfig":
        cfg = _from_env(GatewayConfig, "GATEWAY_")
        updates: dict[str, Any] = {}
        gen = os.environ.get("GENERATION_PORT")
        tel = os.environ.get("TELEMETRY_PORT")
        # GENERATION_ADDRESS: a gRPC target, one instance or several ("ipv4:127.0.0.1:50061,127.0.0.1:50062",
        # "dns:///generation-headless:50051"); the gateway balances calls over them (round_robin).
        if "GATEWAY_GENERATION_ADDRESS" not in os.environ and os.environ.get("GENERATION_ADDRESS"):
            updates["generation_address"] = os.environ["GENERATION_ADDRESS"]
        elif gen and "GATEWAY_GENERATION_ADDRESS" not in os.environ:
            updates["generation_address"] = f"127.0.0.1:{int(gen)}"
        if tel and "GATEWAY_TELEMETRY_ADDRESS" not in os.environ:
            updates["telemetry_address"] = f"127.0.0.1:{int(tel)}"
        return _replace(cfg, updates)


@dataclass(frozen=True)
class SupervisorConfig:
    """`make run`'s launcher (services/stack.py). Environment: SUPERVISOR_<FIELD>."""

    # A part that exits on its own is started again after a back-off that
    # doubles from backoff_initial_s up to backoff_max_s; once it has stayed
    # up reset_after_s, its next crash waits backoff_initial_s again.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    reset_after_s: float = 60.0
    # More than max_restarts exits within restart_window_s is a crash loop:
    # the launcher gives up on that part only and keeps the others running.
    max_restarts: int = 5
    restart_window_s: float = 60.0
    # After SIGTERM a part gets this long to stop (generation: its grace period
    # plus this) before it is killed.
    stop_timeout_s: float = 15.0
    # How often the launcher looks at its children.
    poll_interval_s: float = 0.2
    # The private PostgreSQL of GENERATION_INSTANCES > 1 without GENERATION_DATABASE_URL listens on
    # 127.0.0.1 at this port (0: a free one, chosen at each start).
    postgres_port: int = 0

    @staticmethod
    def from_env() -> "SupervisorConfig":
        return _from_env(SupervisorConfig, "SUPERVISOR_")


def _replace(cfg: T, updates: dict[str, Any]) -> T:
    from dataclasses import replace

    return replace(cfg, **updates) if updates else cfg  # type: ignore[type-var]
