"""Vendor endpoints are configurable (self-hosted ntfy, Gotify, Bark; private gateways), so they
are user-given URLs: every plugin's request goes through the SSRF guard."""

from __future__ import annotations

import pytest

from services.senders.bark.api import Bark
from services.senders.base import Permanent
from services.senders.webhook.standard import StandardWebhook
from shared.errors import ErrorCode
from shared.outbound import guarded_client
from tests.providers.conftest import message


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.7:8080/push", "http://[::1]:9/", "http://127.0.0.1:9/"],
)
async def test_a_provider_pointed_at_a_private_address_is_refused_before_connecting(url: str) -> None:
    async with guarded_client("", timeout=2) as http:  # the default: public addresses only
        bark = Bark(Bark.Config.model_validate({"server": url}), http)
        with pytest.raises(Permanent) as caught:
            await bark.send(message("abcdefgh12345678"))
    assert caught.value.sender_fault and caught.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert "refused URL" in caught.value.message


async def test_the_allow_list_admits_only_what_it_names() -> None:
    config = StandardWebhook.Config.model_validate(
        {"url": "http://10.0.0.7:9/hook", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
    )
    async with guarded_client("127.0.0.1/32", timeout=2) as http:
        with pytest.raises(Permanent) as caught:
            await StandardWebhook(config, http).send(message("hook", message_id="msg_20261202_guard"))
    assert "refused URL" in caught.value.message
