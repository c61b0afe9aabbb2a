"""What every route needs: the service's resources, and the tenant a request acts for."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Request
from redis.asyncio import Redis

from services.ingest.publish import Publisher
from shared.settings import Settings


@dataclass(slots=True)
class Services:
    """The resources ingest opens at start-up and closes at shutdown."""

    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    producer: AIOKafkaProducer
    publisher: Publisher


def get_services(request: Request) -> Services:
    return request.app.state.services


def current_tenant() -> str:
    """The tenant a request acts for. Until API keys and JWT land, every request acts for
    the ``default`` tenant; every query is already scoped by it."""
    return "default"
