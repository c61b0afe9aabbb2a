"""AES-256-GCM secrets at rest."""

from __future__ import annotations

import base64
import os

import pytest

from shared.crypto import DecryptError, EncryptionKeyError, SecretBox, parse_key

KEY = base64.b64encode(os.urandom(32)).decode()


def test_round_trip_with_a_fresh_nonce_each_time() -> None:
    box = SecretBox.from_setting(KEY)
    a, b = box.encrypt("hunter2", "smtp"), box.encrypt("hunter2", "smtp")
    assert a != b and a.startswith("v1:") and "hunter2" not in a
    assert box.decrypt(a, "smtp") == box.decrypt(b, "smtp") == "hunter2"


def test_tampering_another_key_or_another_purpose_fail() -> None:
    box = SecretBox.from_setting(KEY)
    stored = box.encrypt("secret", "email_accounts.smtp_password")
    raw = bytearray(base64.b64decode(stored[3:]))
    raw[-1] ^= 1
    with pytest.raises(DecryptError):
        box.decrypt("v1:" + base64.b64encode(bytes(raw)).decode(), "email_accounts.smtp_password")
    with pytest.raises(DecryptError):
        SecretBox.from_setting(base64.b64encode(os.urandom(32)).decode()).decrypt(
            stored, "email_accounts.smtp_password"
        )
    with pytest.raises(DecryptError):
        box.decrypt(stored, "sms_accounts.api_secret")  # bound to its purpose
    with pytest.raises(DecryptError):
        box.decrypt("plaintext", "email_accounts.smtp_password")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "not set"),
        ("", "not set"),
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "32 bytes"),
    ],
)
def test_unusable_keys_are_explained(value: str | None, says: str) -> None:
    with pytest.raises(EncryptionKeyError) as error:
        parse_key(value)
    assert says in str(error.value)
