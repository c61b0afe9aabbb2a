"""FCM HTTP v1 against its emulation (OAuth 2.0 JWT bearer grant, then messages:send)."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import parse_qsl

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr, ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.push.fcm import FCM_SCOPE, JWT_BEARER, Fcm, FcmConfig, assertion_claims, b64url, rs256
from shared.errors import ErrorCode
from tests.emulators.fcm import FcmEmulator
from tests.providers.conftest import message

PROJECT = "herald-test"
EMAIL = "herald-sender@herald-test.iam.gserviceaccount.com"
KEY_ID = "8c3f0b1e2a7d4c5b9e6f1a2b3c4d5e6f7a8b9c0d"
DEVICE = "fGx7Yt3qR0e:APA91bH-example_registration-token.0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def keys() -> tuple[str, str, str]:
    """(private PEM, its public PEM, another private PEM) generated for this test run."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return _pem(key), public, _pem(other)


def account(private_pem: str, token_uri: str, project: str = PROJECT) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": project,
            "private_key_id": KEY_ID,
            "private_key": private_pem,
            "client_email": EMAIL,
            "client_id": "109876543210987654321",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com",
        }
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def emu(keys, clock):
    emulator = FcmEmulator(public_key_pem=keys[1], project_id=PROJECT, client_email=EMAIL, key_id=KEY_ID, clock=clock)
    async with emulator:
        yield emulator


def plugin(emu: FcmEmulator, http, clock, private_pem: str, project: str = PROJECT) -> Fcm:
    config = FcmConfig(service_account=SecretStr(account(private_pem, emu.token_url, project)), endpoint=emu.url)
    return Fcm(config, http, clock=clock)


def _segment(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --- the exchange on the wire ----------------------------------------------------------------


async def test_send_wire_format(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0])
    options = {"data": {"order": "42"}, "priority": "normal", "sound": "default", "badge": 3, "collapse_key": "orders"}
    result = await fcm.send(message(DEVICE, "Your order shipped", title="Order 42", options=options))

    token_call, send_call = emu.calls
    assert (token_call.method, token_call.path) == ("POST", "/token")
    assert token_call.headers["content-type"].startswith("application/x-www-form-urlencoded")
    form = dict(parse_qsl(token_call.body.decode()))
    assert set(form) == {"grant_type", "assertion"}
    assert form["grant_type"] == JWT_BEARER
    header, claims, _ = form["assertion"].split(".")
    assert _segment(header) == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    now = int(clock.now)
    assert _segment(claims) == {"iss": EMAIL, "scope": FCM_SCOPE, "aud": emu.token_url, "exp": now + 3600, "iat": now}
    assert token_call.verified and token_call.status == 200

    assert (send_call.method, send_call.path, send_call.query) == ("POST", f"/v1/projects/{PROJECT}/messages:send", {})
    (issued,) = emu.access_tokens
    assert send_call.headers["authorization"] == f"Bearer {issued}"
    assert send_call.headers["content-type"] == "application/json"
    assert send_call.json() == {
        "message": {
            "token": DEVICE,
            "notification": {"title": "Order 42", "body": "Your order shipped"},
            "data": {"order": "42"},
            "android": {"priority": "NORMAL", "collapse_key": "orders", "notification": {"sound": "default"}},
            "apns": {
                "headers": {"apns-priority": "5", "apns-collapse-id": "orders"},
                "payload": {"aps": {"sound": "default", "badge": 3}},
            },
        }
    }
    assert send_call.verified and not send_call.problems
    assert result.provider_message_id == emu.sent[0]
    assert result.provider_message_id.startswith(f"projects/{PROJECT}/messages/")
    assert result.detail == {"project_id": PROJECT}


async def test_minimal_message(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0])
    await fcm.send(message(DEVICE, "plain"))
    assert emu.calls[-1].json() == {
        "message": {
            "token": DEVICE,
            "notification": {"body": "plain"},
            "android": {"priority": "HIGH"},
            "apns": {"headers": {"apns-priority": "10"}},
        }
    }


async def test_token_cached_then_renewed_before_expiry(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0])
    await fcm.send(message(DEVICE))
    clock.now += 3000  # 3599 s lifetime, renewed 300 s before: still good
    await fcm.send(message(DEVICE))
    assert [c.path for c in emu.calls] == ["/token", *[f"/v1/projects/{PROJECT}/messages:send"] * 2]
    clock.now += 300
    await fcm.send(message(DEVICE))
    assert [c.path for c in emu.calls][3:] == ["/token", f"/v1/projects/{PROJECT}/messages:send"]
    assert len(emu.access_tokens) == 2
    assert emu.calls[-1].headers["authorization"] != emu.calls[2].headers["authorization"]


async def test_revoked_token_is_renewed_once(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0])
    await fcm.send(message(DEVICE))
    emu.revoke_tokens()
    result = await fcm.send(message(DEVICE))
    assert [(c.path, c.status) for c in emu.calls[2:]] == [
        (f"/v1/projects/{PROJECT}/messages:send", 401),
        ("/token", 200),
        (f"/v1/projects/{PROJECT}/messages:send", 200),
    ]
    assert result.provider_message_id == emu.sent[-1]


# --- signatures: the documented examples -----------------------------------------------------

# RFC 7515 Appendix A.2 (JWS using RSASSA-PKCS1-v1_5 SHA-256): the RSA key (JWK), the signing
# input and the signature as published.
RFC7515_A2 = {
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS"
    "-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2Cap"
    "Hg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4"
    "FRWyuXpoQ",
    "e": "AQAB",
    "d": "Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NXOoAJe46sui395IW_GO"
    "-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2"
    "QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRu"
    "OopznQ",
}
RFC7515_A2_SIGNING_INPUT = (
    "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0"
    "cnVlfQ"
)
RFC7515_A2_SIGNATURE = (
    "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1"
    "dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzD"
    "wusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe7"
    "7Rw"
)


def _int(b64: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)), "big")


def test_rs256_reproduces_rfc7515_appendix_a2():
    n, e, d = _int(RFC7515_A2["n"]), _int(RFC7515_A2["e"]), _int(RFC7515_A2["d"])
    p, q = rsa.rsa_recover_prime_factors(n, e, d)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, n)
    )
    pem = _pem(numbers.private_key())
    assert rs256(RFC7515_A2_SIGNING_INPUT.encode(), pem) == RFC7515_A2_SIGNATURE


def test_google_documented_assertion_example():
    # developers.google.com/identity/protocols/oauth2/service-account, "Forming the JWT": the
    # header {"alg":"RS256","typ":"JWT"} in base64url, and the example claim set.
    assert b64url(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode()) == (
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"
    )
    claims = assertion_claims(
        "761326798069-r5mljlln1rd4lrbhg75efgigp36m78j5@developer.gserviceaccount.com",
        "https://oauth2.googleapis.com/token",
        1328550785,
        scope="https://www.googleapis.com/auth/devstorage.read_only",
    )
    assert claims == {
        "iss": "761326798069-r5mljlln1rd4lrbhg75efgigp36m78j5@developer.gserviceaccount.com",
        "scope": "https://www.googleapis.com/auth/devstorage.read_only",
        "aud": "https://oauth2.googleapis.com/token",
        "exp": 1328554385,
        "iat": 1328550785,
    }


async def test_assertion_verifies_with_the_public_key(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0])
    token = fcm.token_call().form["assertion"]
    decoded = jwt.decode(token, keys[1], algorithms=["RS256"], audience=emu.token_url, options={"verify_exp": False})
    assert decoded["iss"] == EMAIL


# --- failures --------------------------------------------------------------------------------


async def test_wrong_key_is_rejected_as_auth(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[2])  # the right key id, the wrong key
    with pytest.raises(Permanent) as err:
        await fcm.send(message(DEVICE))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "invalid_grant" in err.value.message
    (call,) = emu.calls
    assert call.status == 400 and not call.verified and call.problems == ["invalid_grant: Invalid JWT Signature."]
    assert "PRIVATE KEY" not in err.value.message


async def test_other_project_is_rejected_as_auth(emu, http, clock, keys):
    fcm = plugin(emu, http, clock, keys[0], project="someone-else")
    with pytest.raises(Permanent) as err:
        await fcm.send(message(DEVICE))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert emu.calls[-1].status == 403


async def test_token_too_old_for_the_emulator(emu, http, keys):
    skewed = Clock()
    skewed.now -= 7200  # the sender's clock two hours late: Google refuses the assertion
    fcm = plugin(emu, http, skewed, keys[0])
    with pytest.raises(Permanent) as err:
        await fcm.send(message(DEVICE))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED
    assert emu.calls[0].problems == ["invalid_grant: Invalid JWT: Check your iat and exp values"]


async def test_unregistered_token(emu, http, clock, keys):
    emu.unregistered.add(DEVICE)
    with pytest.raises(Permanent) as err:
        await plugin(emu, http, clock, keys[0]).send(message(DEVICE))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault", "retry"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True, 30.0),
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True, 30.0),  # FCM's quota is per minute: throttling
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
    ],
)
async def test_injected_failures(emu, http, clock, keys, kind, exc, code, sender_fault, retry):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await plugin(emu, http, clock, keys[0]).send(message(DEVICE))
    assert type(err.value) is exc and not isinstance(err.value, QuotaExceeded)
    assert err.value.code == code and err.value.sender_fault is sender_fault
    if retry is not None:
        assert err.value.retry_after == retry
    assert emu.calls[-1].injected == kind and emu.calls[-1].verified


def test_bad_argument_classification(keys):
    # Google's two documented INVALID_ARGUMENT examples: a bad data value (content) and a bad token.
    fcm = _offline(keys)
    bad_data = {
        "error": {
            "code": 400,
            "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.data[0].value", "description": "Invalid value"}],
                }
            ],
        }
    }
    bad_token = {
        "error": {
            "code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT",
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}
            ],
        }
    }
    with pytest.raises(Permanent) as err:
        fcm.parse(message(DEVICE), httpx.Response(400, json=bad_data))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    with pytest.raises(Permanent) as err:
        fcm.parse(message(DEVICE), httpx.Response(400, json=bad_token))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID


def test_unauthenticated_and_third_party_auth_are_auth(keys):
    fcm = _offline(keys)
    for code, status in (("THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED"), ("", "UNAUTHENTICATED")):
        details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}] if code else []
        body = {"error": {"code": 401, "message": "auth", "status": status, "details": details}}
        with pytest.raises(Permanent) as err:
            fcm.parse(message(DEVICE), httpx.Response(401, json=body))
        assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault


async def test_emulator_down_is_retryable(keys, http, clock):
    emulator = FcmEmulator(public_key_pem=keys[1], project_id=PROJECT, client_email=EMAIL, key_id=KEY_ID)
    await emulator.start()
    fcm = plugin(emulator, http, clock, keys[0])
    await emulator.stop()
    with pytest.raises(Retryable) as err:
        await fcm.send(message(DEVICE))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and err.value.sender_fault


# --- rendering and options -------------------------------------------------------------------


def _offline(keys) -> Fcm:
    config = FcmConfig(service_account=SecretStr(account(keys[0], "https://oauth2.googleapis.com/token")))
    return Fcm(config, None)  # type: ignore[arg-type]  # build() makes no request


def test_markdown_and_card_become_plain_text(keys):
    fcm = _offline(keys)
    md = message(
        DEVICE, "## Disk\n**95%** used on `db1`, see [the graph](https://grafana.example/d/1)", format="markdown"
    )
    assert fcm.build(md).json["message"]["notification"] == {
        "body": "Disk\n95% used on db1, see the graph (https://grafana.example/d/1)"
    }
    card = Card(
        title="Deploy finished",
        text="Version **1.4.2** is live",
        fields=[CardField(title="Env", value="prod")],
        url="https://ci.example/run/7",
    )
    built = fcm.build(message(DEVICE, "", format="card", card=card)).json["message"]["notification"]
    assert built == {"title": "Deploy finished", "body": "Version 1.4.2 is live\nEnv: prod\nhttps://ci.example/run/7"}
    page = message(DEVICE, "<p>Hello&amp; <b>you</b></p><p>bye</p>", format="html")
    assert fcm.build(page).json["message"]["notification"] == {"body": "Hello& you\nbye"}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"priority": "urgent"}, "priority"),
        ({"data": {"n": 1}}, "data.n"),
        ({"data": {"google.sent": "x"}}, "data"),
        ({"badge": -1}, "badge"),
        ({"ttl_s": 10**9}, "ttl_s"),
    ],
)
def test_invalid_options_name_the_option(keys, options, named):
    with pytest.raises(Permanent) as err:
        _offline(keys).build(message(DEVICE, options=options))
    assert f"option '{named}'" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED


async def test_invalid_option_fails_before_any_request(emu, http, clock, keys):
    with pytest.raises(Permanent):
        await plugin(emu, http, clock, keys[0]).send(message(DEVICE, options={"priority": "max"}))
    assert emu.calls == []


def test_config_rejects_bad_service_account_without_echoing_it(keys):
    with pytest.raises(ValidationError) as err:
        FcmConfig(
            service_account=SecretStr(account("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----", "x"))
        )
    assert "private_key" in str(err.value) and "nope" not in str(err.value)
    with pytest.raises(ValidationError) as err:
        FcmConfig(service_account=SecretStr("{not json"))
    assert "not JSON" in str(err.value) and "{not json" not in str(err.value)
