"""What every route needs: the service's resources, the caller, and the tenant it acts for."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Request
from redis.asyncio import Redis

from services.ingest.auth import Authenticator, Principal, Scope, Tokens
from services.ingest.dedup import Guard
from services.ingest.frequency import RuleDistributor
from services.ingest.limits import Quotas, RateLimiter
from services.ingest.publish import Publisher
from services.ingest.routing import RoutingDistributor, RuleCache
from services.ingest.templates import TemplateDistributor
from services.ingest.tenants import TenantSettingsCache
from shared.errors import ErrorCode, HeraldError
from shared.settings import Settings


@dataclass(slots=True)
class Services:
    """The resources ingest opens at start-up and closes at shutdown."""

    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    producer: AIOKafkaProducer
    publisher: Publisher
    guard: Guard
    tenants: TenantSettingsCache
    templates: TemplateDistributor
    tokens: Tokens
    auth: Authenticator
    limiter: RateLimiter
    quotas: Quotas
    rules: RuleDistributor  # frequency caps and digest rules (issue 8)
    routing: RoutingDistributor  # providers, routing rules and policies (issue 10)
    routing_rules: RuleCache  # each tenant's live routing rules, for sends without a channel


# Routes call these directly rather than through ``Depends``: in the ingest profile FastAPI's
# dependency solving cost ~9% of CPU per request (it re-evaluates a typing.cast per
# dependency), and a plain ``def`` dependency adds a thread-pool hand-off on top.


def services_of(request: Request) -> Services:
    return request.app.state.services


def caller(request: Request, scope: Scope | None) -> Principal:
    """The authenticated caller (set by :class:`services.ingest.access.AccessMiddleware`),
    refused with 403 / 1003 when its key lacks ``scope`` (None: any valid token will do)."""
    principal = request.scope.get("state", {}).get("principal")
    if principal is None:  # only public paths get here without one; they do not call this
        raise HeraldError(ErrorCode.UNAUTHENTICATED, "authentication required")
    if scope is not None and scope not in principal.scopes:
        raise HeraldError(ErrorCode.FORBIDDEN, f"this API key lacks the '{scope}' scope")
    return principal


def tenant_of(request: Request, scope: Scope) -> str:
    """The tenant a request acts for, once its key is known to hold ``scope``. Every query
    is scoped by it; another tenant's resources are simply not found."""
    return caller(request, scope).tenant
