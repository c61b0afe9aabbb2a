"""A configured provider at rest: which fields are secret, how they are split from the public
part, and that a row's ciphertext only opens for that row."""

from __future__ import annotations

import base64
import os

import pytest

from services.senders.plugins.config import seal, secret_fields, split, unseal
from services.senders.sms.aliyun import AliyunSms
from services.senders.webhook.standard import StandardWebhook
from shared.crypto import DecryptError, SecretBox

BOX = SecretBox(base64.b64decode(base64.b64encode(os.urandom(32))))


def test_secret_fields_are_the_secretstr_ones_and_those_marked_secret() -> None:
    assert secret_fields(AliyunSms.Config) == {"access_key_secret"}
    assert secret_fields(StandardWebhook.Config) == {"secret", "headers"}


def test_split_keeps_secrets_out_of_the_public_part() -> None:
    config = StandardWebhook.Config.model_validate({
        "url": "https://hooks.example.org/in", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "headers": {"X-Api-Key": "k-123456"},
    })  # fmt: skip
    public, hidden = split(config)
    assert "k-123456" not in str(public) and "whsec_" not in str(public)
    assert hidden == {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "headers": {"X-Api-Key": "k-123456"}}
    # And back: the plugin's model takes the two parts together.
    again = StandardWebhook.Config.model_validate({**public, **unseal(BOX, 7, seal(BOX, 7, hidden))})
    assert again.headers == {"X-Api-Key": "k-123456"}


def test_a_rows_ciphertext_does_not_open_for_another_row() -> None:
    stored = seal(BOX, 7, {"access_key_secret": "s3cr3t"})
    assert unseal(BOX, 7, stored) == {"access_key_secret": "s3cr3t"}
    with pytest.raises(DecryptError):
        unseal(BOX, 8, stored)
    assert seal(BOX, 7, {}) == "" and unseal(BOX, 7, "") == {}
