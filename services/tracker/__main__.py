"""``python -m services.tracker``: fold delivery events into PostgreSQL."""

from __future__ import annotations

import uvloop

from services.tracker.app import serve
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings(service_name="tracker")
    setup_logging("tracker", settings.log_level, settings.log_json)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
