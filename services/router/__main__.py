"""``python -m services.router``: run the router as a faust worker."""

from __future__ import annotations

import asyncio

from faust.worker import Worker

from services.router.app import create_app
from shared.kafka import ensure_topics
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings(service_name="router")
    setup_logging("router", settings.log_level, settings.log_json)
    # Topics exist before faust subscribes, whatever service starts first.
    asyncio.run(ensure_topics(settings))
    app = create_app(settings)
    app.finalize()
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
