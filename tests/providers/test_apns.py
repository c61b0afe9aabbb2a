"""APNs against its emulation: HTTP/2 over TLS (hypercorn, private CA), ES256 provider tokens."""

from __future__ import annotations

import base64
import json
import ssl
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr, ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField
from services.senders.push.apns import Apns, ApnsConfig, apns_id, es256, provider_token
from shared.errors import ErrorCode
from shared.outbound import guarded_client
from tests.emulators.apns import ApnsEmulator
from tests.providers.conftest import message

TEAM = "DEF123GHIJ"
KEY = "ABC123DEFG"
BUNDLE = "app.herald.demo"
DEVICE = "a3f1c09b7e5d4a2b8c6e0f1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d"
PERIOD = 1800


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def keys() -> tuple[str, str, str]:
    """(the team key's .p8 PEM, its public PEM, another P-256 key) for this run."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _pem(key), _public(key), _pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def clock() -> Clock:
    # One minute into a half hour: the first token's iat is the half hour's start.
    return Clock(time.time() // PERIOD * PERIOD + 60)


@pytest.fixture
async def emu(keys, clock):
    async with ApnsEmulator(team_id=TEAM, key_id=KEY, public_key_pem=keys[1], bundle_id=BUNDLE, clock=clock) as e:
        yield e


def config(emu: ApnsEmulator, private_pem: str) -> ApnsConfig:
    return ApnsConfig(
        team_id=TEAM,
        key_id=KEY,
        private_key=SecretStr(private_pem),
        bundle_id=BUNDLE,
        endpoint=emu.url,
        ca_pem=Path(emu.ca_file).read_text(),
    )


@pytest.fixture
async def h2(emu, keys):
    """The client the sender builds from the plugin's client_options (HTTP/2, the private CA)."""
    async with guarded_client("127.0.0.1/32", timeout=5.0, **Apns.client_options(config(emu, keys[0]))) as client:
        yield client


def plugin(emu, h2, clock, private_pem: str) -> Apns:
    return Apns(config(emu, private_pem), h2, clock=clock)


def _segment(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --- the exchange on the wire ----------------------------------------------------------------


async def test_send_wire_format_over_http2(emu, h2, clock, keys):
    apns = plugin(emu, h2, clock, keys[0])
    options = {"data": {"order": "42"}, "priority": "normal", "sound": "default", "badge": 2, "collapse_key": "o42"}
    msg = message(DEVICE, "Your order shipped", title="Order 42", options=options, dispatch_id="msg_1:1")
    result = await apns.send(msg)

    (call,) = emu.calls
    assert call.http_version == "2"  # Apple only speaks HTTP/2
    assert (call.method, call.path, call.query) == ("POST", f"/3/device/{DEVICE}", {})
    h = call.headers
    scheme, token = h["authorization"].split(" ")
    assert scheme == "bearer"
    header, claims, _ = token.split(".")
    assert _segment(header) == {"alg": "ES256", "kid": KEY}
    assert _segment(claims) == {"iss": TEAM, "iat": int(clock.now) - 60}
    assert h["apns-topic"] == BUNDLE
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "5"
    assert h["apns-expiration"] == str(int(clock.now) + 86_400)
    assert h["apns-id"] == apns_id("msg_1:1")
    assert h["apns-collapse-id"] == "o42"
    assert call.json() == {
        "order": "42",
        "aps": {"alert": {"title": "Order 42", "body": "Your order shipped"}, "sound": "default", "badge": 2},
    }
    assert call.verified and not call.problems and call.status == 200
    assert result.provider_message_id == apns_id("msg_1:1")


async def test_http11_is_refused(emu, keys):
    context = ssl.create_default_context(cafile=emu.ca_file)
    async with httpx.AsyncClient(verify=context) as http1:
        response = await http1.post(f"{emu.url}/3/device/{DEVICE}", json={"aps": {"alert": "x"}})
    assert response.status_code == 505
    (call,) = emu.calls
    assert call.http_version == "1.1" and not call.verified
    assert call.problems == ["HTTP/1.1: APNs requires HTTP/2"]


def test_apns_id_is_per_dispatch():
    first = apns_id("msg_20261202_abcdef:1")
    assert first == apns_id("msg_20261202_abcdef:1") != apns_id("msg_20261202_abcdef:2")
    assert str(uuid.UUID(first)) == first and uuid.UUID(first).version == 5


async def test_defaults_and_ttl_zero(emu, h2, clock, keys):
    apns = plugin(emu, h2, clock, keys[0])
    await apns.send(message(DEVICE, "hi", options={"ttl_s": 0}))
    call = emu.calls[-1]
    assert call.headers["apns-priority"] == "10" and call.headers["apns-expiration"] == "0"
    assert "apns-collapse-id" not in call.headers
    assert call.json() == {"aps": {"alert": {"body": "hi"}}}


# --- the provider token ----------------------------------------------------------------------

# RFC 6979 A.2.5: ECDSA, 256 bits (prime field), private key x, SHA-256, messages "sample"/"test".
RFC6979_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979 = {
    b"sample": (
        0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
        0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
    ),
    b"test": (
        0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
        0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
    ),
}


def test_es256_reproduces_rfc6979_a25():
    pem = _pem(ec.derive_private_key(RFC6979_X, ec.SECP256R1()))
    for msg, (r, s) in RFC6979.items():
        expected = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
        assert es256(msg, pem) == expected


def test_apple_documented_token_example():
    # "Establishing a token-based connection to APNs": header {"alg": "ES256", "kid": "ABC123DEFG"},
    # claims {"iss": "DEF123GHIJ", "iat": 1437179036}.
    key = ec.derive_private_key(RFC6979_X, ec.SECP256R1())
    token = provider_token("DEF123GHIJ", "ABC123DEFG", _pem(key), 1437179036)
    header, claims, _ = token.split(".")
    assert header == "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyM0RFRkcifQ"  # {"alg":"ES256","kid":"ABC123DEFG"}
    assert claims == "eyJpc3MiOiJERUYxMjNHSElKIiwiaWF0IjoxNDM3MTc5MDM2fQ"  # {"iss":"DEF123GHIJ","iat":1437179036}
    assert _segment(header) == {"alg": "ES256", "kid": "ABC123DEFG"}
    decoded = jwt.decode(token, _public(key), algorithms=["ES256"], options={"verify_iat": False})
    assert decoded == {"iss": "DEF123GHIJ", "iat": 1437179036}
    assert provider_token("DEF123GHIJ", "ABC123DEFG", _pem(key), 1437179036) == token  # deterministic


async def test_token_reused_then_renewed_after_50_minutes(emu, h2, clock, keys):
    apns = plugin(emu, h2, clock, keys[0])
    await apns.send(message(DEVICE))
    clock.now += 40 * 60
    await apns.send(message(DEVICE))
    first, second = (c.headers["authorization"] for c in emu.calls)
    assert first == second
    clock.now += 10 * 60  # 51 minutes after iat
    await apns.send(message(DEVICE))
    third = emu.calls[-1]
    assert third.headers["authorization"] != first and third.status == 200
    assert _segment(third.headers["authorization"].split(".")[1])["iat"] == int(clock.now) // PERIOD * PERIOD
    assert len(emu.tokens_seen) == 2


async def test_processes_share_one_token(emu, h2, clock, keys):
    # Two sender processes with the same key compute the same token: Apple sees one.
    await plugin(emu, h2, clock, keys[0]).send(message(DEVICE))
    clock.now += 5
    await plugin(emu, h2, clock, keys[0]).send(message(DEVICE))
    assert [c.status for c in emu.calls] == [200, 200] and len(emu.tokens_seen) == 1


async def test_too_many_token_updates_is_throttling(emu, h2, clock, keys):
    apns = plugin(emu, h2, clock, keys[0])
    await apns.send(message(DEVICE))
    clock.now += 60
    apns.provider_token(renew=True)  # a second token one minute later
    with pytest.raises(Retryable) as err:
        await apns.send(message(DEVICE))
    assert err.value.code == ErrorCode.RATE_LIMITED and "TooManyProviderTokenUpdates" in err.value.message
    assert emu.calls[-1].problems == ["new token within 20 minutes"]


async def test_expired_provider_token_renewed_once(keys, h2, emu, clock):
    # Apple's clock 2000 s ahead of ours: the half-hour token (iat 29 min ago for us) is over an
    # hour old for Apple; the renewed one (iat = now) is not.
    clock.now += 1700 - 60
    emu.clock = lambda: clock.now + 2000
    result = await plugin(emu, h2, clock, keys[0]).send(message(DEVICE, dispatch_id="d:1"))
    assert [(c.status, c.problems) for c in emu.calls] == [
        (403, ["provider token older than an hour"]),
        (200, []),
    ]
    assert result.provider_message_id == apns_id("d:1")


async def test_expired_twice_is_auth(keys, h2, emu, clock):
    emu.clock = lambda: clock.now + 4000  # even a fresh token is "expired": give up after one renewal
    with pytest.raises(Permanent) as err:
        await plugin(emu, h2, clock, keys[0]).send(message(DEVICE))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert [c.status for c in emu.calls] == [403, 403]


# --- failures --------------------------------------------------------------------------------


async def test_wrong_key_is_invalid_provider_token(emu, h2, clock, keys):
    with pytest.raises(Permanent) as err:
        await plugin(emu, h2, clock, keys[2]).send(message(DEVICE))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "InvalidProviderToken" in err.value.message
    (call,) = emu.calls
    assert call.status == 403 and not call.verified and "Signature verification failed" in call.problems[0]


async def test_unregistered_device(emu, h2, clock, keys):
    emu.unregistered.add(DEVICE)
    with pytest.raises(Permanent) as err:
        await plugin(emu, h2, clock, keys[0]).send(message(DEVICE))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault
    assert emu.calls[-1].status == 410


async def test_not_a_device_token_fails_before_sending(emu, h2, clock, keys):
    with pytest.raises(Permanent) as err:
        await plugin(emu, h2, clock, keys[0]).send(message("fGx7Yt3qR0e:APA91bH-fcm-token"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and emu.calls == []


async def test_payload_too_large(emu, h2, clock, keys):
    with pytest.raises(Permanent) as err:
        await plugin(emu, h2, clock, keys[0]).send(message(DEVICE, options={"data": {"blob": "x" * 5000}}))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and "PayloadTooLarge" in err.value.message


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True),  # APNs has no quota: TooManyRequests
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures(emu, h2, clock, keys, kind, exc, code, sender_fault):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await plugin(emu, h2, clock, keys[0]).send(message(DEVICE))
    assert type(err.value) is exc and err.value.code == code and err.value.sender_fault is sender_fault
    if kind in ("rate_limited", "quota"):
        assert err.value.retry_after == 60.0  # no Retry-After from Apple: a minute
    assert emu.calls[-1].injected == kind and emu.calls[-1].verified and emu.calls[-1].http_version == "2"


async def test_emulator_down_is_retryable(keys, clock):
    emulator = ApnsEmulator(team_id=TEAM, key_id=KEY, public_key_pem=keys[1], bundle_id=BUNDLE, clock=clock)
    await emulator.start()
    await emulator.stop()
    cfg = config(emulator, keys[0])
    async with guarded_client("127.0.0.1/32", timeout=5.0, **Apns.client_options(cfg)) as client:
        with pytest.raises(Retryable) as err:
            await Apns(cfg, client, clock=clock).send(message(DEVICE))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and err.value.sender_fault


# --- rendering, options, configuration -------------------------------------------------------


def _offline(keys) -> Apns:
    cfg = ApnsConfig(team_id=TEAM, key_id=KEY, private_key=SecretStr(keys[0]), bundle_id=BUNDLE)
    return Apns(cfg, None, clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]


def test_markdown_and_card_become_plain_text(keys):
    apns = _offline(keys)
    md = message(DEVICE, "**Disk** at 95%: [graph](https://grafana.example/d/1)", format="markdown", title="db1")
    assert apns.build(md).json["aps"]["alert"] == {
        "title": "db1",
        "body": "Disk at 95%: graph (https://grafana.example/d/1)",
    }
    card = Card(title="Deploy", text="v1.4.2 is live", fields=[CardField(title="Env", value="prod")])
    assert apns.build(message(DEVICE, "", format="card", card=card)).json["aps"]["alert"] == {
        "title": "Deploy",
        "body": "v1.4.2 is live\nEnv: prod",
    }


@pytest.mark.parametrize(
    ("options", "named"),
    [({"priority": 10}, "priority"), ({"data": {"aps": "x"}}, "data"), ({"collapse_key": "x" * 65}, "collapse_key")],
)
def test_invalid_options_name_the_option(keys, options, named):
    with pytest.raises(Permanent) as err:
        _offline(keys).build(message(DEVICE, options=options))
    assert f"option '{named}'" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED


def test_client_options(emu, keys):
    with_ca = Apns.client_options(config(emu, keys[0]))
    assert with_ca["http2"] is True and isinstance(with_ca["verify"], ssl.SSLContext)
    assert Apns.client_options(config(emu, keys[0]))["verify"] is with_ca["verify"]  # one context per CA file
    assert Apns.client_options(_offline(keys).config) == {"http2": True}
    assert _offline(keys).config.endpoint == "https://api.push.apple.com"


def test_config_wants_a_p256_key(keys):
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValidationError) as err:
        ApnsConfig(team_id=TEAM, key_id=KEY, private_key=SecretStr(rsa_pem.decode()), bundle_id=BUNDLE)
    assert "EC P-256" in str(err.value) and "PRIVATE KEY" not in str(err.value)


def test_the_private_ca_is_pem_content_never_a_path_on_the_senders_host(keys):
    for not_pem in ("/etc/hostname", "/etc/ssl/certs/ca-certificates.crt", "-----BEGIN CERTIFICATE-----\nnope"):
        with pytest.raises(ValidationError):
            ApnsConfig(team_id=TEAM, key_id=KEY, private_key=SecretStr(keys[0]), bundle_id=BUNDLE, ca_pem=not_pem)
