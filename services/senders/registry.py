"""The provider each channel's sender delivers through: the SMTP pool for email; for every
other channel the tenant's configured providers and their plugins
(:mod:`services.senders.channel`, catalogue in :mod:`services.senders.plugins`)."""

from __future__ import annotations

import importlib

from services.senders.base import Provider
from shared.events import Channel

CHANNELS: tuple[str, ...] = tuple(c.value for c in Channel)


def load(channel: str) -> type[Provider]:
    """The provider class of ``channel`` (LookupError for an unknown channel)."""
    if channel == Channel.EMAIL:
        return importlib.import_module("services.senders.email.smtp").SmtpProvider
    if channel not in CHANNELS:
        raise LookupError(f"no channel {channel!r}")
    from services.senders.channel import ChannelSender

    return ChannelSender.bound(channel)  # type: ignore[return-value]
