"""Provider tests: each plugin against its vendor emulation, over real HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.senders.plugins.base import Message
from shared.outbound import guarded_client


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The client senders use (the SSRF guard, here allowing the loopback emulators)."""
    async with guarded_client("127.0.0.1/32", timeout=5.0) as client:
        yield client


def message(to: str, content: str = "hello from Herald", **fields: Any) -> Message:
    return Message(
        message_id=fields.pop("message_id", "msg_20261202_abcdef"),
        dispatch_id=fields.pop("dispatch_id", "msg_20261202_abcdef:1"),
        tenant_id=fields.pop("tenant_id", "default"),
        to=to,
        content=content,
        **fields,
    )
