"""Batch sends (issue 8): the body and the reading of its recipient list, item by item."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from services.ingest.batches import (
    BatchSendRequest,
    Item,
    ItemError,
    item_hash,
    item_key,
    read_recipients,
    refusal_code,
)
from services.ingest.http import json_body_schema
from shared.errors import ErrorCode
from shared.ids import new_batch_id


def fields(errors: list[ItemError]) -> list[tuple[int, str, int]]:
    return [(e.index, e.field, int(e.code)) for e in errors]


def test_addresses_and_objects_become_items_in_order_with_their_index() -> None:
    items, errors = read_recipients(
        ["a@example.com", {"to": " B@Example.COM "}, "c@example.org"], templated=False, common_vars=None
    )
    assert errors == []
    assert items == [Item(0, "a@example.com"), Item(1, "B@example.com"), Item(2, "c@example.org")]


def test_each_bad_item_is_reported_with_its_path_and_the_others_kept() -> None:
    raw = [
        "ok0@example.com",
        "not-an-address",
        {"to": "b@@example.com"},
        42,
        None,
        ["x@example.com"],
        {"cc": "x@example.com"},
        {"to": "ok7@example.com", "bcc": "y@example.com"},
        {"to": 7},
        {"to": "ok9@example.com", "template_vars": {"a": 1}},
        {"to": "ok10@example.com", "locale": "zh-CN"},
        "ok11@example.com",
    ]
    items, errors = read_recipients(raw, templated=False, common_vars=None)
    assert [i.index for i in items] == [0, 11]
    assert fields(errors) == [
        (1, "recipients.1", 1001),
        (2, "recipients.2.to", 1001),
        (3, "recipients.3", 1001),
        (4, "recipients.4", 1001),
        (5, "recipients.5", 1001),
        (6, "recipients.6.cc", 1001),  # unknown fields come before a missing "to"
        (7, "recipients.7.bcc", 1001),
        (8, "recipients.8.to", 1001),
        (9, "recipients.9.template_vars", 1001),  # direct mode: the batch's content is final
        (10, "recipients.10.locale", 1001),
    ]
    assert "email address" in errors[0].message and errors[0].to == "not-an-address"
    assert errors[0].as_dict() == {
        "index": 1,
        "field": "recipients.1",
        "code": 1001,
        "message": errors[0].message,
        "to": "not-an-address",
    }
    assert "to" not in errors[2].as_dict()  # nothing to echo for a number
    assert "only with template_id" in errors[8].message


def test_a_repeated_address_is_refused_the_second_time_unless_repeats_are_allowed() -> None:
    raw = ["a@example.com", {"to": "A@example.com"}, "b@example.com", "a@example.com"]
    items, errors = read_recipients(raw, templated=False, common_vars=None)
    assert [i.index for i in items] == [0, 2]
    assert fields(errors) == [(1, "recipients.1.to", 1006), (3, "recipients.3", 1006)]
    assert errors[0].message == "A@example.com is already recipients.0 of this batch"
    # An invalid first occurrence does not make the next one a repeat.
    items, errors = read_recipients(["a@@x.com", "b@example.com", "b@example.com"], templated=False, common_vars=None)
    assert [i.index for i in items] == [1] and fields(errors) == [(0, "recipients.0", 1001), (2, "recipients.2", 1006)]
    items, errors = read_recipients(raw, templated=False, common_vars=None, allow_repeats=True)
    assert len(items) == 4 and errors == []


def test_template_variables_merge_over_the_batchs_and_every_declared_one_must_be_there() -> None:
    common = {"greeting": "Hi", "name": "friend"}
    raw = [
        "plain@example.com",
        {"to": "ann@example.com", "template_vars": {"name": "Ann", "code": "1"}},
        {"to": "bo@example.com", "template_vars": {"code": "2"}, "locale": "zh-CN"},
        {"to": "cy@example.com", "template_vars": {"name": "Cy"}},
        {"to": "di@example.com", "template_vars": "name=Di"},
        {"to": "ed@example.com", "template_vars": {"code": "5"}, "locale": "not a tag"},
    ]
    items, errors = read_recipients(
        raw, templated=True, common_vars=common, required_vars=["name", "code"], locale="en"
    )
    assert items == [
        Item(1, "ann@example.com", {"greeting": "Hi", "name": "Ann", "code": "1"}, "en"),
        Item(2, "bo@example.com", {"greeting": "Hi", "name": "friend", "code": "2"}, "zh-CN"),
    ]
    assert fields(errors) == [
        (0, "recipients.0.template_vars.code", 2004),
        (3, "recipients.3.template_vars.code", 2004),
        (4, "recipients.4.template_vars", 1001),
        (5, "recipients.5.locale", 1001),
    ]
    assert errors[0].message == "missing template variable: code" and errors[0].to == "plain@example.com"
    _, errors = read_recipients(["x@example.com"], templated=True, common_vars=None, required_vars=["a", "b", "c"])
    assert errors[0].message == "missing template variable: a (and 2 more)"
    # The batch's variables are not changed by an item's.
    assert common == {"greeting": "Hi", "name": "friend"}


def test_a_refused_batch_answers_the_items_code_when_they_share_one() -> None:
    dup = ItemError(0, "recipients.0", "duplicate", ErrorCode.DUPLICATE_REQUEST)
    missing = ItemError(1, "recipients.1.template_vars.x", "missing", ErrorCode.TEMPLATE_RENDER_FAILED)
    bad = ItemError(2, "recipients.2", "bad")
    assert refusal_code([dup, dup]) == ErrorCode.DUPLICATE_REQUEST
    assert refusal_code([missing]) == ErrorCode.TEMPLATE_RENDER_FAILED
    assert refusal_code([bad, bad]) == ErrorCode.INVALID_PARAMS
    assert refusal_code([dup, missing]) == ErrorCode.INVALID_PARAMS


BASE = {"recipients": ["a@example.com"], "subject": "s", "content": "<p>c</p>"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"subject": None}, "subject", id="direct-needs-subject"),
        pytest.param({"content": None}, "content", id="direct-needs-content"),
        pytest.param({"template_vars": {"a": 1}}, "template_vars", id="vars-without-template"),
        pytest.param({"locale": "en"}, "locale", id="locale-without-template"),
        pytest.param({"template_id": 1}, "content", id="template-and-content"),
        pytest.param(
            {"template_id": 1, "template_name": "x", "content": None, "subject": None},
            "template_name",
            id="id-and-name",
        ),
        pytest.param(
            {"template_id": 1, "content": None, "subject": None, "text_content": "t"},
            "text_content",
            id="template-and-text",
        ),
    ],
)
def test_mode_errors_name_the_field(changes: dict, field: str) -> None:
    body = BatchSendRequest.model_validate({**BASE, **changes})
    error = body.mode_error()
    assert error is not None and error.field == field and error.code == ErrorCode.INVALID_PARAMS


def test_the_body_takes_any_items_but_refuses_unknown_fields_and_other_channels() -> None:
    body = BatchSendRequest.model_validate_json(orjson.dumps({**BASE, "recipients": ["a@example.com", 1, {"x": 2}]}))
    assert body.mode_error() is None and body.recipients == ["a@example.com", 1, {"x": 2}]
    assert body.channel == "email" and body.dedup is True
    templated = BatchSendRequest.model_validate({"recipients": ["a@example.com"], "template_name": "welcome"})
    assert templated.templated and templated.mode_error() is None
    for bad in (
        {**BASE, "to": "a@example.com"},
        {**BASE, "channel": "sms"},
        {**BASE, "recipients": "a@example.com"},
        {"subject": "s", "content": "c"},
    ):
        with pytest.raises(ValidationError):
            BatchSendRequest.model_validate(bad)
    schema = json_body_schema(BatchSendRequest)["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["recipients"]["items"]["anyOf"][1]["required"] == ["to"]


def test_ids_keys_and_hashes() -> None:
    batch_id = new_batch_id()
    assert batch_id.startswith("bat_") and len(batch_id) == len("bat_20261123_") + 16
    assert item_key(batch_id, 7) == f"{batch_id}:7"
    assert item_hash("h", 1) == item_hash("h", 1) != item_hash("h", 2)
    assert len(item_hash("h", 1)) == 64
