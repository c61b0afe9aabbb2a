"""``python -m services.senders <channel> [<channel> ...]``: run the senders of one channel (one
deployment per channel in production) or of several in one process (``all-plugins``: every
channel but email, as ``make run`` and the tests do)."""

from __future__ import annotations

import argparse
import sys

import uvloop

from services.senders.registry import CHANNELS
from services.senders.runner import serve
from shared.crypto import EncryptionKeyError
from shared.logging import setup_logging
from shared.settings import Settings

ALL_PLUGINS = "all-plugins"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.senders")
    parser.add_argument("channels", nargs="+", choices=[*CHANNELS, ALL_PLUGINS], metavar="channel")
    args = parser.parse_args()
    channels = list(dict.fromkeys(c for name in args.channels for c in (
        [c for c in CHANNELS if c != "email"] if name == ALL_PLUGINS else [name])))  # fmt: skip
    name = f"sender-{channels[0]}" if len(channels) == 1 else "sender-plugins"
    settings = Settings(service_name=name)
    setup_logging(name, settings.log_level, settings.log_json)
    try:
        uvloop.run(serve(settings, channels))
    except EncryptionKeyError as exc:
        sys.exit(f"herald {name}: {exc}")


if __name__ == "__main__":
    main()
