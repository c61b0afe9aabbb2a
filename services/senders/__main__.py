"""``python -m services.senders <channel>``: run the sender of one channel (e.g. ``email``)."""

from __future__ import annotations

import argparse
import sys

import uvloop

from services.senders.registry import PROVIDERS
from services.senders.runner import serve
from shared.crypto import EncryptionKeyError
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.senders")
    parser.add_argument("channel", choices=sorted(PROVIDERS))
    args = parser.parse_args()
    settings = Settings(service_name=f"sender-{args.channel}")
    setup_logging(f"sender-{args.channel}", settings.log_level, settings.log_json)
    try:
        uvloop.run(serve(settings, args.channel))
    except EncryptionKeyError as exc:
        sys.exit(f"herald sender-{args.channel}: {exc}")


if __name__ == "__main__":
    main()
