"""Generic webhook (Standard Webhooks) against a receiver that verifies with the reference
library."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from pydantic import SecretStr, ValidationError
from standardwebhooks.webhooks import Webhook

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.webhook.standard import StandardWebhook, StandardWebhookConfig, sign
from shared.errors import ErrorCode
from tests.emulators.webhook import WebhookReceiver
from tests.providers.conftest import message

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()


def config(url: str, **fields) -> StandardWebhookConfig:
    return StandardWebhookConfig(url=url, secret=fields.pop("secret", SECRET), **fields)


@pytest.fixture
async def receiver():
    async with WebhookReceiver(SECRET) as emu:
        yield emu


def test_reference_vector():
    # The Standard Webhooks reference vector (the spec repository's library test suites,
    # "sign function works"): secret, id, timestamp and body give this exact signature.
    assert (
        sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


async def test_send_default_body(receiver, http):
    now = time.time()
    plugin = StandardWebhook(
        config(receiver.endpoint, headers={"X-Api-Key": "k-123", "X-Team": "ops"}), http, clock=lambda: now
    )
    result = await plugin.send(message("ops-hook", "disk **full**", title="Alert", format="markdown"))
    assert result.provider_message_id is None and result.detail == {"status": 200}
    (call,) = receiver.calls
    assert call.verified and call.method == "POST" and call.path == "/hooks/herald"
    assert call.headers["webhook-id"] == "msg_20261202_abcdef"
    assert call.headers["webhook-timestamp"] == str(int(now))
    assert call.headers["webhook-signature"] == sign(SECRET, "msg_20261202_abcdef", int(now), call.body)
    assert call.headers["content-type"] == "application/json"
    assert call.headers["x-api-key"] == "k-123" and call.headers["x-team"] == "ops"
    body = call.json()
    assert body == {
        "type": "message",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now))),
        "data": {
            "message_id": "msg_20261202_abcdef",
            "title": "Alert",
            "content": "disk **full**",
            "format": "markdown",
        },
    }
    # The reference library accepts the exact bytes sent.
    assert Webhook(SECRET).verify(call.body, call.headers) == body


async def test_same_webhook_id_on_retry_and_put(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint, method="PUT"), http)
    await plugin.send(message("h", attempt=1))
    await plugin.send(message("h", attempt=2))
    assert [c.method for c in receiver.calls] == ["PUT", "PUT"]
    assert receiver.calls[0].headers["webhook-id"] == receiver.calls[1].headers["webhook-id"] == "msg_20261202_abcdef"
    assert all(c.verified for c in receiver.calls)


async def test_card_and_options_in_default_body(receiver, http):
    card = Card(title="Deploy", text="done", fields=[CardField(title="env", value="prod")], url="https://x.test/1")
    plugin = StandardWebhook(config(receiver.endpoint), http)
    await plugin.send(message("h", "", format="card", card=card, options={"event_type": "deploy.finished", "k": 1}))
    body = receiver.calls[0].json()
    assert body["type"] == "deploy.finished"
    assert body["data"]["card"] == {"title": "Deploy", "text": "done", "fields": [{"title": "env", "value": "prod"}],
                                    "url": "https://x.test/1"}  # fmt: skip
    assert body["data"]["options"] == {"event_type": "deploy.finished", "k": 1}


async def test_invalid_option_names_it(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint), http)
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h", options={"event_type": "no spaces allowed"}))
    assert "event_type" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert receiver.calls == []


async def test_body_template_rendered(receiver, http):
    template = {
        "text": "[{{ title }}] {{ content }}",
        "meta": {
            "id": "{{ message_id }}",
            "tenant": "{{ tenant_id }}",
            "try": "{{ attempt }}",
            "label": "#{{ attempt }}",
            "n": 3,
        },
        "card": "{{ card }}",
        "tags": ["herald", "{{ options.team | upper }}"],
    }
    plugin = StandardWebhook(config(receiver.endpoint, body_template=template), http)
    await plugin.send(message("h", 'say "hi"', title="T", attempt=2, options={"team": "sre"}))
    call = receiver.calls[0]
    assert call.verified
    assert call.json() == {
        "text": '[T] say "hi"',
        "meta": {"id": "msg_20261202_abcdef", "tenant": "default", "try": 2, "label": "#2", "n": 3},
        "card": None,
        "tags": ["herald", "SRE"],
    }


def test_sandbox_escape_refused_in_config():
    with pytest.raises(ValidationError) as err:
        config("https://example.com/h", body_template={"x": "{{ ''.__class__.__mro__ }}"})
    assert "__class__" in str(err.value)
    with pytest.raises(ValidationError):
        config("https://example.com/h", body_template={"x": "{{ config }}"})  # undeclared variable


async def test_sandbox_escape_refused_when_sending(receiver, http):
    # A configuration stored before the check existed (model_construct skips validation):
    # the sandbox itself refuses at render time, and nothing is sent.
    bad = StandardWebhookConfig.model_construct(
        url=receiver.endpoint,
        secret=SecretStr(SECRET),
        headers={},
        body_template={"x": "{{ content.__class__.__mro__ }}"},
        method="POST",
    )
    plugin = StandardWebhook(bad, http)
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h"))
    assert "refused" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert receiver.calls == []


def test_config_validation():
    with pytest.raises(ValidationError):
        config("ftp://example.com/h")
    with pytest.raises(ValidationError):
        config("https://example.com/h", secret="MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")  # no whsec_
    with pytest.raises(ValidationError):
        config("https://example.com/h", secret="whsec_" + base64.b64encode(b"x" * 16).decode())  # < 24 bytes
    for name in ("webhook-signature", "Webhook-Id", "Content-Type", "Host"):
        with pytest.raises(ValidationError):
            config("https://example.com/h", headers={name: "x"})
    with pytest.raises(ValidationError):
        config("https://example.com/h", headers={"X-A": "b\r\nX-Injected: 1"})
    assert config("https://example.com/h", headers={"X-A": "b"}).headers == {"X-A": "b"}


async def test_wrong_secret_rejected(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint, secret=OTHER_SECRET), http)
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert not receiver.calls[0].verified and receiver.calls[0].status == 401


async def test_stale_timestamp_rejected(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint), http, clock=lambda: time.time() - 600)
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED
    assert "too old" in receiver.calls[0].problems[0]


async def test_injected_failures(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint), http)
    receiver.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 7.0
    assert not isinstance(err.value, QuotaExceeded)

    receiver.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED

    receiver.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    receiver.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    receiver.fail("quota")  # a receiver has no quota: answered as throttling
    with pytest.raises(Retryable) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.RATE_LIMITED
    assert [c.injected for c in receiver.calls] == [
        "rate_limited",
        "server_error",
        "invalid_recipient",
        "auth",
        "quota",
    ]


@pytest.mark.parametrize(
    ("status", "headers", "kind", "code", "after"),
    [
        (410, {}, Permanent, ErrorCode.CHANNEL_SEND_FAILED, None),
        (301, {"Location": "/moved"}, Permanent, ErrorCode.CHANNEL_SEND_FAILED, None),
        (503, {"Retry-After": "12"}, Retryable, ErrorCode.CHANNEL_SEND_FAILED, 12.0),
        (502, {}, Retryable, ErrorCode.CHANNEL_SEND_FAILED, 5.0),
        (504, {}, Retryable, ErrorCode.CHANNEL_SEND_FAILED, 5.0),
        (422, {}, Permanent, ErrorCode.CHANNEL_SEND_FAILED, None),
        (202, {}, None, None, None),
    ],
)
async def test_status_handling(receiver, http, status, headers, kind, code, after):
    receiver.respond(status, headers)
    plugin = StandardWebhook(config(receiver.endpoint), http)
    if kind is None:
        assert (await plugin.send(message("h"))).detail == {"status": status}
        return
    with pytest.raises(kind) as err:
        await plugin.send(message("h"))
    assert err.value.code == code
    if kind is Retryable:
        assert err.value.retry_after == after
    else:
        assert err.value.sender_fault == (status in (410, 301))
    # A redirect is not followed: one request only.
    assert len(receiver.calls) == 1


async def test_connection_refused(http):
    emu = WebhookReceiver(SECRET)
    await emu.start()
    url = emu.endpoint
    await emu.stop()
    plugin = StandardWebhook(config(url), http)
    with pytest.raises(Retryable) as err:
        await plugin.send(message("h"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED


async def test_body_is_compact_json(receiver, http):
    plugin = StandardWebhook(config(receiver.endpoint), http)
    await plugin.send(message("h", "ünïcode"))
    body = receiver.calls[0].body
    assert body == orjson.dumps(orjson.loads(body)) and "ünïcode".encode() in body
