"""The plugin sender's bookkeeping of plugin instances: one per configured provider until its
revision changes; a replaced or removed provider's own HTTP client is closed (after its requests
had time to finish), never leaked."""

from __future__ import annotations

import base64
import os
from decimal import Decimal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis.asyncio import Redis

from services.senders.channel import ChannelSender
from services.senders.plugins.base import Costs
from services.senders.plugins.config import Configured
from services.senders.push.apns import ApnsConfig
from shared.crypto import SecretBox
from shared.settings import Settings

KEY = base64.b64encode(os.urandom(32)).decode()


def _apns(revision: int) -> Configured:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    config = ApnsConfig(team_id="DEF123GHIJ", key_id="ABC123DEFG", private_key=pem.decode(), bundle_id="app.x")
    return Configured(id=41, tenant_id="default", channel="push", provider="apns", name="ios", config=config,
                      priority=1, weight=1, costs=Costs(default=Decimal(0)), rate_limit=None, is_active=True,
                      revision=revision)  # fmt: skip


async def test_a_replaced_or_removed_plugin_gives_back_its_own_client() -> None:
    redis = Redis.from_url("redis://127.0.0.1:1/0")  # never connected: pacing is not exercised here
    sender = ChannelSender.bound("push")(Settings(encryption_key=KEY), None, redis, SecretBox.from_setting(KEY))
    try:
        first = sender.plugin_for(_apns(1))
        assert sender.plugin_for(_apns(1)) is first  # same revision: same instance (its token cache)
        assert first.http in sender._clients and first.http is not sender._default_client  # HTTP/2
        second = sender.plugin_for(_apns(2))
        assert second is not first and first.http not in sender._clients and second.http in sender._clients
        sender.directory.by_tenant = {}  # the provider was deleted
        sender.forget_removed()
        assert sender._plugins == {} and sender._clients == [sender._default_client]
    finally:
        await sender._default_client.aclose()
        await redis.aclose()
