"""Entry point: `python -m gateway.server` (uvicorn on GATEWAY_HOST:GATEWAY_PORT, 127.0.0.1:5000)."""
from __future__ import annotations

import uvicorn

from gateway.app import create_app
from services.common.config import GatewayConfig
from services.common.logging_setup import setup_logging


def main() -> None:
    config = GatewayConfig.from_env()
    setup_logging("gateway", config.log_level)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
