"""Status callbacks (issue 11): the payload, its Standard Webhooks signature (checked with the
``standardwebhooks`` library's own ``verify``, as a receiver would), the auth header, and the
endpoint bodies' validation."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.ingest.http import patch_changes
from services.ingest.routes.routing import RulePatch
from services.ingest.routes.webhooks import WebhookIn, WebhookPatch
from services.tracker.callbacks import (
    STATUS_STATES,
    auth_header,
    display_url,
    new_signing_secret,
    payload_of,
    request_of,
)
from shared.errors import HeraldError
from shared.events import EventV1, RequestV1, State

AT = datetime(2026, 12, 2, 8, 0, 1, 250000, tzinfo=UTC)


def _event(state: State = State.SENT, **extra) -> EventV1:
    return EventV1(event_id=f"msg_20261202_abc:1:{state.value}", message_id="msg_20261202_abc", tenant_id="t1",
                   state=state, attempt=1, occurred_at=AT, service="sender", channel="email", provider="smtp",
                   request_id="req-1", **extra)  # fmt: skip


def test_payload_shape_has_no_tenant_and_no_recipient() -> None:
    body = payload_of(_event(), category="otp")
    assert body == {
        "type": "message.sent",
        "timestamp": "2026-12-02T08:00:01.250Z",
        "data": {
            "message_id": "msg_20261202_abc",
            "state": "sent",
            "status": "success",
            "channel": "email",
            "provider": "smtp",
            "attempt": 1,
            "error_code": None,
            "error": None,
            "occurred_at": "2026-12-02T08:00:01.250Z",
            "category": "otp",
            "request_id": "req-1",
        },
    }
    assert "tenant" not in orjson.dumps(body).decode()


def test_payload_error_is_masked_like_logs() -> None:
    event = _event(State.DEAD, error_code=2001, error="550 5.1.1 <alice.smith@example.com>: user unknown")
    data = payload_of(event)["data"]
    assert data["status"] == "failed" and data["state"] == "dead" and data["error_code"] == 2001
    assert "alice.smith@example.com" not in data["error"] and "@example.com" in data["error"]


def test_signature_verifies_with_the_library_as_a_receiver_would() -> None:
    secret = new_signing_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    payload = payload_of(_event())
    now = int(time.time())
    body, headers = request_of(42, payload, [secret], now, "Bearer tok-123")
    assert headers["webhook-id"] == "cbd_42"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,") and " " not in headers["webhook-signature"]
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer tok-123"
    assert Webhook(secret).verify(body, headers) == payload
    # The HMAC of "{id}.{timestamp}.{body}", computed independently.
    import hashlib
    import hmac

    key = base64.b64decode(secret[6:])
    expected = base64.b64encode(hmac.new(key, f"cbd_42.{now}.".encode() + body, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"

    with pytest.raises(WebhookVerificationError):  # another secret
        Webhook(new_signing_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # a changed body
        Webhook(secret).verify(body.replace(b"sent", b"dead"), headers)
    with pytest.raises(WebhookVerificationError):  # a replay 10 minutes later
        Webhook(secret).verify(body, {**headers, "webhook-timestamp": str(now - 600)})


def test_the_webhook_id_is_the_same_on_every_try_and_rotation_signs_twice() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    payload = payload_of(_event(State.RETRYING))
    _, first = request_of(7, payload, [old], int(time.time()) - 30)
    body, second = request_of(7, payload, [new, old], int(time.time()))
    assert first["webhook-id"] == second["webhook-id"] == "cbd_7"
    assert len(second["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(body, second) == payload  # a receiver not yet switched
    assert Webhook(new).verify(body, second) == payload
    assert "authorization" not in second


def test_auth_headers() -> None:
    assert auth_header("bearer", "abc") == "Bearer abc"
    assert auth_header("basic", "user:pa:ss") == "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert auth_header("none", "abc") is None and auth_header("bearer", None) is None


def test_status_states_are_the_outcomes_and_retries() -> None:
    assert {s.value for s in STATUS_STATES} == {"sent", "delivered", "failed", "retrying", "dead", "rejected",
                                                "cancelled", "suppressed", "digested"}  # fmt: skip


def test_endpoint_bodies() -> None:
    body = WebhookIn.model_validate({"callback_url": "https://hooks.example.com/x", "events": ["sent", "dead", "sent"]})
    assert body.events == ["sent", "dead"] and body.auth_type == "none"
    assert WebhookIn.model_validate({"callback_url": "http://h.example/x", "events": ["failed", "*"]}).events == ["*"]
    assert WebhookIn.model_validate({"callback_url": "http://h.example/x"}).events == ["*"]
    for bad in (
        {"callback_url": "ftp://h.example/x"},
        {"callback_url": "https://user:pw@h.example/x"},  # credentials go in auth_token
        {"callback_url": "https://h.example/x", "events": ["sending"]},  # not a status change
        {"callback_url": "https://h.example/x", "events": []},
        {"callback_url": "https://h.example/x", "auth_token": "a\nb", "auth_type": "bearer"},
        {"callback_url": "https://h.example/x", "secret": "whsec_x"},
    ):
        with pytest.raises(ValidationError):
            WebhookIn.model_validate(bad)
    assert WebhookPatch.model_validate({"events": ["delivered"]}).model_dump(exclude_unset=True) == {
        "events": ["delivered"]
    }


def test_requests_carry_a_callback_url() -> None:
    request = RequestV1(channel="email", to=["a@example.com"], content="x", callback_url="https://h.example/cb?x=1")
    assert orjson.loads(request.to_bytes())["callback_url"] == "https://h.example/cb?x=1"
    with pytest.raises(ValidationError):
        RequestV1(channel="email", to=["a@example.com"], content="x", callback_url="javascript:alert(1)")


def test_urls_are_shown_with_their_query_masked() -> None:
    """The delivery log and the tries' rows: no credential a producer put in a query."""
    assert display_url("https://h.example/cb?token=s3cr3t&ref=42") == "https://h.example/cb?token=***&ref=***"
    assert display_url("https://h.example:8443/a/b?s3cr3t#frag") == "https://h.example:8443/a/b?***"
    assert display_url("https://user:pw@h.example/x?a=") == "https://***@h.example/x?a=***"
    assert display_url("http://127.0.0.1:8080/hook") == "http://127.0.0.1:8080/hook"
    assert display_url("https://h.example/cb?") == "https://h.example/cb"
    assert display_url("https://h.example/") == "https://h.example/"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Slack, Discord, Feishu: the secret is in the path.
        ("https://hooks.slack.com/services/T0123ABCD/B0123ABCDEF/aBcDeFgHiJkLmNoPqRsTuVwX",
         "https://hooks.slack.com/services/T0123ABCD/B0123ABCDEF/***"),
        ("https://discord.com/api/webhooks/123456789012345678/abcDEF-ghiJKL_mno123pqrSTUvwx456yz",
         "https://discord.com/api/webhooks/***/***"),
        ("https://open.feishu.cn/open-apis/bot/v2/hook/0b7c5d8e-1f2a-4b3c-9d8e-7f6a5b4c3d2e?x=1",
         "https://open.feishu.cn/open-apis/bot/v2/hook/***?x=***"),
        # A token in the first segment (webhook.site-like) too; words and short ids stay.
        ("https://webhook.site/0b7c5d8e-1f2a-4b3c-9d8e-7f6a5b4c3d2e", "https://webhook.site/***"),
        ("https://h.example/cb/notifications-callback/v2", "https://h.example/cb/notifications-callback/v2"),
        ("https://h.example/hooks/42/status", "https://h.example/hooks/42/status"),
        ("https://h.example/Abcdefgh12345678/x", "https://h.example/***/x"),
        ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
    ],
)  # fmt: skip
def test_token_like_path_segments_are_masked(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_a_patch_names_something_to_change_and_nulls_only_where_allowed() -> None:
    """The check PUT /webhooks/{id} and PATCH /routing/rules/{id} share (services/ingest/http.py)."""
    assert patch_changes(WebhookPatch.model_validate({"description": None}), nullable=("description",)) == {
        "description": None
    }
    assert patch_changes(WebhookPatch.model_validate({"events": ["sent"]})) == {"events": ["sent"]}
    for model, body, field in (
        (WebhookPatch, {}, "body"),
        (WebhookPatch, {"events": None}, "events"),
        (WebhookPatch, {"description": None}, "description"),  # not nullable here
        (RulePatch, {}, "body"),
    ):
        with pytest.raises(HeraldError) as caught:
            patch_changes(model.model_validate(body), nullable=("description",) if field != "description" else ())
        assert caught.value.field == field, (body, caught.value)
