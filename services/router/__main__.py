"""``python -m services.router``: run the router as a faust worker."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from faust.worker import Worker

from services.router.app import create_app
from shared.kafka import ensure_topics
from shared.logging import setup_logging
from shared.settings import Settings

# faust's shutdown can hang for good while the broker is down: aiokafka's fetcher raises
# CancelledError out of the consumer thread's stop, the thread dies without reporting it, and
# the worker waits for it forever. A stop gets this long, then the process exits anyway; nothing
# is lost (offsets not committed are routed again, with the same ids).
_STOP_DEADLINE_S = 7.0


class _Worker(Worker):
    """faust's worker, with Herald's JSON logging instead of faust's own format, and a
    deadline on stopping."""

    herald_settings: Settings

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        s = self.herald_settings
        self.spinner = None  # faust's terminal spinner would write escape codes into the log stream
        setup_logging("router", s.log_level, s.log_json)

    async def stop(self) -> None:
        watchdog = threading.Timer(_STOP_DEADLINE_S, _exit_now)
        watchdog.daemon = True
        watchdog.start()
        await super().stop()


def _exit_now() -> None:
    logging.getLogger("herald.router").error("shutdown still not done after %.0fs; exiting", _STOP_DEADLINE_S)
    logging.shutdown()
    os._exit(1)


def main() -> None:
    settings = Settings(service_name="router")
    setup_logging("router", settings.log_level, settings.log_json)
    # Topics exist before faust subscribes, whatever service starts first.
    asyncio.run(ensure_topics(settings))
    app = create_app(settings)
    app.finalize()
    worker = _Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.herald_settings = settings
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
