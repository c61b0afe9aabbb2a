"""``python -m services.ingest``: serve the ingest API with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from services.ingest.app import create_app
from shared.crypto import EncryptionKeyError
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings(service_name="ingest")
    setup_logging("ingest", settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except (EncryptionKeyError, ValueError) as exc:
        sys.exit(f"herald ingest: {exc}")
    uvicorn.run(
        app,
        host=settings.ingest_host,
        port=settings.ingest_port,
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
        # X-Forwarded-For is believed only from the proxies named (client IPs feed rate limits).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )


if __name__ == "__main__":
    main()
