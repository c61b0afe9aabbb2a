"""Every provider, by channel: ``name -> "module:Class"``, imported only when used."""

from __future__ import annotations

import importlib

from services.senders.base import Provider

PROVIDERS: dict[str, dict[str, str]] = {
    "email": {
        "smtp": "services.senders.email.smtp:SmtpProvider",
    },
}

DEFAULT_PROVIDER: dict[str, str] = {"email": "smtp"}


def load(channel: str, name: str | None = None) -> type[Provider]:
    """The provider class registered for ``channel`` under ``name`` (or the default)."""
    try:
        target = PROVIDERS[channel][name or DEFAULT_PROVIDER[channel]]
    except KeyError:
        raise LookupError(f"no provider {name!r} for channel {channel!r}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
