"""The pure parts of access control: key and secret formats, bcrypt checks, token signing and
verification, the signing key's derivation, key states, rate-limit headers, quota months and
the audit log's scrubbing."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import jwt
import pytest

from services.ingest.audit import scrub
from services.ingest.auth import (
    AuthError,
    KeyState,
    Tokens,
    check_secret,
    hash_secret,
    new_api_key,
    new_api_secret,
    signing_key,
)
from services.ingest.limits import Decision, month_bounds
from shared.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY

KEY = b"k" * 32


def test_api_keys_and_secrets_have_the_seed_format_and_do_not_repeat() -> None:
    keys = {new_api_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert key.startswith("noti_") and len(key) == 37 and key[5:].isalnum() and key.isascii()
    secrets = {new_api_secret() for _ in range(1000)}
    assert len(secrets) == 1000 and min(map(len, secrets)) >= 43


def test_secrets_are_checked_against_bcrypt_hashes() -> None:
    secret = new_api_secret()
    hashed = hash_secret(secret, 4)
    assert hashed.startswith("$2b$04$") and secret not in hashed
    assert check_secret(secret, hashed)
    assert not check_secret(secret + "x", hashed)
    assert not check_secret(secret, None)  # unknown key: still checked (same cost), never true
    assert not check_secret(secret, "not a bcrypt hash")
    assert hash_secret(secret, 4) != hashed  # salted


def test_tokens_round_trip_and_carry_no_scopes() -> None:
    tokens = Tokens(KEY, 3600)
    token, claims = tokens.issue("noti_a", "acme", now=1_000_000_000)
    assert set(claims) == {"iss", "sub", "tid", "jti", "iat", "exp"}
    assert claims["exp"] - claims["iat"] == 3600 and claims["sub"] == "noti_a" and claims["tid"] == "acme"
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    fresh, _ = tokens.issue("noti_a", "acme")
    assert tokens.decode(fresh)["sub"] == "noti_a"
    with pytest.raises(AuthError, match="token expired"):
        tokens.decode(token)
    assert jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False})["jti"] == claims["jti"]


@pytest.mark.parametrize(
    "make",
    [
        lambda c: jwt.encode(c, b"x" * 32, algorithm="HS256"),  # another key
        lambda c: jwt.encode(c, KEY, algorithm="HS384"),  # another algorithm
        lambda c: jwt.encode(c, None, algorithm="none"),  # unsigned
        lambda c: jwt.encode({**c, "iss": "someone"}, KEY, algorithm="HS256"),
        lambda c: jwt.encode({k: v for k, v in c.items() if k != "exp"}, KEY, algorithm="HS256"),
        lambda c: jwt.encode({k: v for k, v in c.items() if k != "sub"}, KEY, algorithm="HS256"),
        lambda c: jwt.encode(c, KEY, algorithm="HS256")[:-3] + "abc",  # signature changed
        lambda c: "a.b.c",
    ],
    ids=["other-key", "hs384", "alg-none", "issuer", "no-exp", "no-sub", "signature", "garbage"],
)
@pytest.mark.filterwarnings("ignore:The HMAC key is 32 bytes long")
def test_tokens_not_ours_are_invalid(make) -> None:
    now = int(time.time())
    claims = {"iss": "herald", "sub": "noti_a", "tid": "t", "jti": "j", "iat": now, "exp": now + 60}
    with pytest.raises(AuthError, match="token invalid"):
        Tokens(KEY, 3600).decode(make(claims))


def test_the_signing_key_is_derived_from_the_encryption_key_unless_given() -> None:
    derived = signing_key(Settings(encryption_key=TEST_ENCRYPTION_KEY))
    assert len(derived) == 32 and derived == signing_key(Settings(encryption_key=TEST_ENCRYPTION_KEY))
    assert derived != base64.b64decode(TEST_ENCRYPTION_KEY)  # never the encryption key itself
    given = "g" * 40
    assert signing_key(Settings(encryption_key=TEST_ENCRYPTION_KEY, jwt_secret=given)) == given.encode()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        signing_key(Settings(jwt_secret="short"))


def test_key_states_refuse_disabled_and_expired_keys() -> None:
    now = time.time()
    live = KeyState("noti_a", "t", frozenset({"read"}), "standard", True, None)
    assert live.refusal(now) is None
    assert KeyState("noti_a", "t", frozenset(), "standard", False, None).refusal(now).startswith("API key disabled")
    assert KeyState("noti_a", "t", frozenset(), "standard", True, now - 1).refusal(now) == "API key expired"
    assert KeyState("noti_a", "t", frozenset(), "standard", True, now + 60).refusal(now) is None


def test_rate_limit_headers() -> None:
    ok = dict(Decision(True, 100, 42, 17, 60).headers())
    assert ok == {b"ratelimit-limit": b"100", b"ratelimit-remaining": b"42", b"ratelimit-reset": b"17",
                  b"ratelimit-policy": b"100;w=60"}  # fmt: skip
    refused = dict(Decision(False, 100, 0, 0, 60).headers())
    assert refused[b"retry-after"] == b"1"  # never "retry in 0 s"
    assert dict(Decision(False, 5, 0, 33, 60).headers())[b"retry-after"] == b"33"


def test_quota_months_are_calendar_months_in_utc() -> None:
    start, end = month_bounds(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    start, end = month_bounds(datetime(2026, 2, 1, 0, 0, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))


def test_audit_details_never_hold_secrets() -> None:
    assert scrub({"smtp_password": "v1:abc", "email": "a@b.c", "api_secret": "s", "password": ""}) == {
        "smtp_password": "<set>",
        "email": "a@b.c",
        "api_secret": "<set>",
        "password": "",
    }
