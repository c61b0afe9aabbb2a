"""A configured provider as stored (``providers`` row) and as a plugin gets it: the plugin's
``Config`` split into the public part (JSON, shown by the API) and the secret part (the fields
typed ``SecretStr``, one AES-256-GCM ciphertext bound to the row, never shown)."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
from pydantic import BaseModel, SecretStr

from services.senders.plugins import plugin
from services.senders.plugins.base import Costs, Plugin, ProviderConfig, RateLimit
from shared.crypto import SecretBox


def purpose(provider_id: int) -> str:
    """The associated data of a row's secrets: a ciphertext cannot be moved to another row."""
    return f"providers.secrets:{provider_id}"


@cache
def secret_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` typed ``SecretStr`` (also ``SecretStr | None``), and those marked
    ``json_schema_extra={"secret": True}`` (a webhook's custom headers)."""
    names = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = (
            typing.get_args(annotation)
            if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
            else ()
        )
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if annotation is SecretStr or SecretStr in args or extra.get("secret"):
            names.add(name)
    return frozenset(names)


def split(config: ProviderConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public JSON, secret values) of a validated configuration."""
    secrets = secret_fields(type(config))
    public = config.model_dump(mode="json", exclude=set(secrets))
    hidden = {}
    for name in secrets:
        value = getattr(config, name)
        if isinstance(value, SecretStr):
            hidden[name] = value.get_secret_value()
        elif value:  # a field marked secret (json_schema_extra={"secret": True}): its JSON value
            hidden[name] = value
    return public, hidden


def seal(box: SecretBox, provider_id: int, secrets: dict[str, Any]) -> str:
    return box.encrypt(orjson.dumps(secrets).decode(), purpose(provider_id)) if secrets else ""


def unseal(box: SecretBox, provider_id: int, stored: str) -> dict[str, Any]:
    return orjson.loads(box.decrypt(stored, purpose(provider_id))) if stored else {}


@dataclass(frozen=True, slots=True)
class Configured:
    """One ``providers`` row, decrypted, as a sender uses it."""

    id: int
    tenant_id: str
    channel: str
    provider: str  # the plugin's name
    name: str
    config: ProviderConfig
    priority: int
    weight: int
    costs: Costs
    rate_limit: RateLimit | None  # the tenant's own, tighter than the vendor's
    is_active: bool
    revision: int

    @property
    def plugin(self) -> type[Plugin]:
        return plugin(self.channel, self.provider)

    def cost(self, to: str) -> Decimal:
        return self.plugin.cost(self.costs, to)

    def limits(self) -> list[RateLimit]:
        """The vendor's documented limits and the tenant's own."""
        return [*self.plugin.rate_limits, *([self.rate_limit] if self.rate_limit else [])]


def configured(row: Any, box: SecretBox) -> Configured:
    """A ``providers`` row (mapping) as :class:`Configured`; ``ValueError`` when it no longer
    validates (a plugin whose config model changed) or its secrets cannot be decrypted."""
    cls = plugin(row["channel"], row["provider"])
    public = row["config"] if isinstance(row["config"], dict) else orjson.loads(row["config"] or "{}")
    public = {k: v for k, v in public.items() if k != "_secrets"}  # the names of the secrets set
    config = cls.Config.model_validate({**public, **unseal(box, row["id"], row["secrets"])})
    costs = row["costs"] if isinstance(row["costs"], dict) else orjson.loads(row["costs"] or "{}")
    limit = row["rate_limit"]
    if isinstance(limit, str):
        limit = orjson.loads(limit)
    return Configured(
        id=row["id"],
        tenant_id=row["tenant_id"],
        channel=row["channel"],
        provider=row["provider"],
        name=row["name"],
        config=config,
        priority=row["priority"],
        weight=row["weight"],
        costs=Costs.model_validate(costs or {}),
        rate_limit=RateLimit(int(limit["count"]), float(limit["per_s"]), limit.get("scope", "provider"), "tenant")
        if limit
        else None,
        is_active=row["is_active"],
        revision=row["revision"],
    )
