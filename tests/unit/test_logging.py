"""Masking of personal data and secrets in logs (seed 004 §3.2.4), and the JSON shape."""

from __future__ import annotations

import logging

import orjson

from shared.logging import JsonFormatter, mask_email, mask_text, mask_value, request_id_var


def test_email_masking() -> None:
    assert mask_email("user@example.com") == "u***@example.com"
    assert mask_text("to alice.smith+x@mail.example.org and bob@example.com") == (
        "to a***@mail.example.org and b***@example.com"
    )


def test_phone_and_token_masking() -> None:
    assert mask_text("call 13812345678 now") == "call 138****5678 now"
    assert mask_text("call +86 13812345678") == "call +86 138****5678"
    assert mask_text("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig") == "Authorization: Bearer eyJhbGci***"
    assert mask_text("secret whsec_abcdefghijklmnopqrstuvwx") == "secret whsec_abcd***"


def test_secret_keys_are_cut() -> None:
    assert mask_value("smtp_password", "hunter2hunter2") == "***"
    assert mask_value("api_token", "abcdefghijklmnop") == "abcdefgh***"
    assert mask_value("context", {"recipient": "x@example.com", "n": 3}) == {"recipient": "x***@example.com", "n": 3}


def test_json_formatter_carries_request_id_and_masks_context() -> None:
    record = logging.LogRecord("herald", logging.INFO, __file__, 1, "sent to %s", ("dan@example.com",), None)
    record.context = {"recipient": "dan@example.com", "password": "p4ss"}
    token = request_id_var.set("req_abc")
    try:
        entry = orjson.loads(JsonFormatter("sender").format(record))
    finally:
        request_id_var.reset(token)
    assert entry["request_id"] == "req_abc" and entry["service"] == "sender" and entry["level"] == "INFO"
    assert entry["message"] == "sent to d***@example.com"
    assert entry["context"] == {"recipient": "d***@example.com", "password": "***"}
    assert entry["timestamp"].endswith("Z")


def test_opaque_recipients_are_cut() -> None:
    """Device tokens and push keys are recipients that work as credentials."""
    token = "fcm-token:APA91bH8x7Q2vZ0LmNoPqRsTuVwXyZ0123456789abcdef"
    assert mask_value("recipient", token) == "fcm-to***"
    assert mask_value("context", {"to": "PDU1234abcdEFGH5678ijklMNOP"}) == {"to": "PDU123***"}
    # Phone numbers keep the phone masking, short chat ids stay readable.
    assert mask_value("recipient", "+8613812345678") == "+86138****5678"
    assert mask_value("recipient", "@herald_bot") == "@herald_bot"


def test_credentials_in_url_queries_are_masked() -> None:
    line = "POST https://oapi.dingtalk.com/robot/send?access_token=5b1e0c7d2a9f&timestamp=1&sign=OoYz%3D ok"
    assert mask_text(line) == "POST https://oapi.dingtalk.com/robot/send?access_token=***&timestamp=1&sign=*** ok"
    assert mask_text("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6") == (
        "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=***"
    )


def test_base64_tokens_are_masked_whole() -> None:
    """A ``whsec_`` secret is base64: its ``+``, ``/`` and ``=`` are part of it."""
    assert mask_text("whsec_ab+/CDEFGHIJKLMN==") == "whsec_ab***"
    assert mask_text("secret whsec_abcdEFGH+IJKLMNOP/QRS= end") == "secret whsec_abcd*** end"
    assert mask_text("key=whsec_+/+/abcdefgh=") == "key=whsec_***"
