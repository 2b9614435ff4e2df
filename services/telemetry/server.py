"""Entry point: `python -m services.telemetry.server`.

Binds TELEMETRY_HOST:TELEMETRY_PORT (127.0.0.1:50052; port 0 picks a free one
and the "listening" log line names it), keeps its SQLite database at
DATA_DIR/telemetry.sqlite3 (or in PostgreSQL with TELEMETRY_DATABASE_URL), serves Prometheus metrics on
TELEMETRY_METRICS_PORT (9102; 0 turns them off), honours the shared service
token and TLS (ORFEAS_*), and stops cleanly on SIGTERM or SIGINT.
"""
from __future__ import annotations

import asyncio
import logging
import sys


from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common import metrics
from services.common.config import SecurityConfig, TelemetryConfig
from services.common.grpc_security import bind, server_interceptors
from services.common.grpc_server import (
    create_server,
    serve_until_signalled,
    set_serving,
)
from services.common.logging_setup import setup_logging
from services.telemetry.model import Telemetry
from services.telemetry.servicer import SERVICE_NAME, TelemetryServicer
from services.telemetry.pg_store import PgTelemetryStore
from services.telemetry.store import TelemetryStore

log = logging.getLogger("services.telemetry")

DB_NAME = "telemetry.sqlite3"


async def serve(config: TelemetryConfig) -> None:
    # PostgreSQL when TELEMETRY_DATABASE_URL names one (the history then outlives this machine), else SQLite.
    store = PgTelemetryStore(config.database_url) if config.database_url else TelemetryStore(config.data_dir / DB_NAME)
    try:
        telemetry = Telemetry(store, config.window_s, config.target_utilization)
        security = SecurityConfig.from_env()
        server, health = create_server(
            [SERVICE_NAME], [*server_interceptors(security), metrics.MetricsInterceptor("telemetry")]
        )
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(TelemetryServicer(telemetry), server)
        address = f"{config.host}:{config.port}"
        port = bind(server, address, security)
        if port == 0:
            raise RuntimeError(f"cannot bind {address}")
        metrics.start_metrics_server(config.host, config.metrics_port)
        await server.start()
        await set_serving(health, [SERVICE_NAME], True)
        log.info(
            "listening on %s:%d",
            config.host,
            port,
            extra={"event": "listening", "host": config.host, "port": port, "db": str(store.path)},
        )

        async def on_stop() -> None:
            await set_serving(health, [SERVICE_NAME], False)

        await serve_until_signalled(server, on_stop=on_stop, grace_s=5.0)
    finally:
        store.close()
    log.info("stopped", extra={"event": "stopped"})


def main() -> int:
    config = TelemetryConfig.from_env()
    setup_logging("telemetry", config.log_level)
    try:
        asyncio.run(serve(config))
    except Exception:
        log.exception("telemetry failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
