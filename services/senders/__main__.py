"""``python -m services.senders <channel>``: run the sender of one channel (e.g. ``email``)."""

from __future__ import annotations

import argparse

import uvloop

from services.senders.registry import PROVIDERS
from services.senders.runner import serve
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.senders")
    parser.add_argument("channel", choices=sorted(PROVIDERS))
    args = parser.parse_args()
    settings = Settings(service_name=f"sender-{args.channel}")
    setup_logging(f"sender-{args.channel}", settings.log_level, settings.log_json)
    uvloop.run(serve(settings, args.channel))


if __name__ == "__main__":
    main()
