"""Secrets at rest: AES-256-GCM with a key from the environment (``HERALD_ENCRYPTION_KEY``,
32 bytes, base64). Stored form: ``v1:<base64(nonce ‖ ciphertext ‖ tag)>``; the associated data
binds a ciphertext to its purpose (e.g. ``email_accounts.smtp_password``) so one cannot be
swapped for another."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_PREFIX = "v1:"


class EncryptionKeyError(ValueError):
    """The encryption key is missing or malformed (raised at start-up)."""


class DecryptError(ValueError):
    """A stored secret could not be decrypted (wrong key or tampered data)."""


def parse_key(value: str | None) -> bytes:
    """Decode ``HERALD_ENCRYPTION_KEY``; explains exactly what is wrong when it is unusable."""
    if not value:
        raise EncryptionKeyError(
            "HERALD_ENCRYPTION_KEY is not set: it must be 32 random bytes, base64-encoded "
            "(generate one with: python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')"
        )
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionKeyError("HERALD_ENCRYPTION_KEY is not valid base64") from None
    if len(key) != 32:
        raise EncryptionKeyError(f"HERALD_ENCRYPTION_KEY must decode to 32 bytes (AES-256), not {len(key)}")
    return key


class SecretBox:
    """Encrypts and decrypts short secrets (passwords, API keys) with AES-256-GCM."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise EncryptionKeyError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(key)

    @classmethod
    def from_setting(cls, value: str | None) -> SecretBox:
        return cls(parse_key(value))

    def encrypt(self, plaintext: str, purpose: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), purpose.encode())
        return _PREFIX + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, stored: str, purpose: str) -> str:
        if not stored.startswith(_PREFIX):
            raise DecryptError("not a Herald ciphertext")
        try:
            raw = base64.b64decode(stored[len(_PREFIX) :], validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], purpose.encode()).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise DecryptError("secret could not be decrypted (wrong key or tampered value)") from None
