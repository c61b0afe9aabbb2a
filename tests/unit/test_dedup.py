"""The content fingerprint of the dedup window: what makes two sends the same message."""

from __future__ import annotations

from services.ingest.dedup import fingerprint, fingerprint_of
from shared.events import RequestV1


def _request(**fields: object) -> RequestV1:
    return RequestV1.model_validate({"channel": "feishu", "to": ["ops-alerts"], "content": "", **fields})


def test_two_cards_to_one_bot_are_different_messages() -> None:
    a = _request(content_type="card", card={"title": "Deploy api", "fields": [{"title": "took", "value": "3m"}]})
    b = _request(content_type="card", card={"title": "Deploy web", "fields": [{"title": "took", "value": "3m"}]})
    assert fingerprint_of(a) != fingerprint_of(b)
    assert fingerprint_of(a) == fingerprint_of(a.model_copy())


def test_sms_with_other_template_parameters_are_different_messages() -> None:
    base = {"channel": "sms", "to": ["+8613800138000"], "content": "code"}
    one = RequestV1.model_validate({**base, "options": {"template_code": "SMS_1", "params": {"code": "1234"}}})
    two = RequestV1.model_validate({**base, "options": {"template_code": "SMS_1", "params": {"code": "9876"}}})
    again = RequestV1.model_validate({**base, "options": {"params": {"code": "1234"}, "template_code": "SMS_1"}})
    assert fingerprint_of(one) != fingerprint_of(two)
    assert fingerprint_of(one) == fingerprint_of(again)  # key order does not matter


def test_an_email_fingerprint_is_unchanged_by_the_new_fields() -> None:
    """Emails' fingerprints stay what they were (a window open across an upgrade still holds)."""
    email = RequestV1.model_validate({"channel": "email", "to": ["a@example.com"], "subject": "s", "content": "c"})
    assert fingerprint_of(email) == fingerprint("default", "email", ["a@example.com"], "s", "c")
