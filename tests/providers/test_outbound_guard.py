"""Vendor endpoints are configurable (self-hosted ntfy, Gotify, Bark; private gateways), so they
are user-given URLs: every plugin's request goes through the SSRF guard."""

from __future__ import annotations

import time
from email.utils import formatdate

import httpx
import pytest

from services.senders.bark.api import Bark
from services.senders.base import Permanent
from services.senders.webhook.standard import StandardWebhook
from shared.errors import ErrorCode
from shared.outbound import guarded_client, retry_after
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


def _answer(retry: str | None) -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": retry} if retry is not None else {})


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """One reading of ``Retry-After`` for the plugins and the status callbacks."""
    assert retry_after(_answer("120")) == 120.0 and retry_after(_answer(" 1.5 ")) == 1.5
    assert retry_after(_answer("-3")) == 0.0
    in_a_minute = time.time() + 60
    for date in (
        formatdate(in_a_minute, usegmt=True),  # "... GMT"
        formatdate(in_a_minute),  # "... -0000": no zone, which RFC 9110 reads as UTC
        formatdate(in_a_minute, localtime=True),  # another zone, named
    ):
        assert 55 <= retry_after(_answer(date)) <= 60, date
    assert retry_after(_answer(formatdate(time.time() - 60, usegmt=True))) == 0.0  # past: at once
    for unreadable in (None, "", "soon", "nan", "inf", "Fri, 99 Foo 2026 99:99:99 GMT"):
        assert retry_after(_answer(unreadable)) is None, unreadable
        assert retry_after(_answer(unreadable), 5.0) == 5.0, unreadable


def test_one_retry_after_for_plugins_and_callbacks() -> None:
    from services.senders.plugins import base
    from services.tracker import callbacks

    assert base.retry_after is retry_after and callbacks.retry_after is retry_after
