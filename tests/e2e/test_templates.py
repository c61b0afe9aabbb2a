"""Templates end to end (issue 5): the API of seed 004 §3.4.9, sends in template mode rendered by
the router from the config topic, bad input and injection attempts."""

from __future__ import annotations

import asyncio
import uuid
from email import policy
from email.parser import BytesParser

import asyncpg
import httpx
import pytest

from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, by_message_id, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

TEMPLATES = "/api/v1/templates"


def name() -> str:
    return f"code-{uuid.uuid4().hex[:8]}"


def new_template(**changes: object) -> dict:
    return {
        "template_name": name(),
        "template_type": "email",
        "subject": "Your code, {{ username }}",
        "content": "<p>Hello {{ username }}, your code is <b>{{ code }}</b>.</p>"
        "{% if items %}<ul>{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul>{% endif %}",
        "variables": ["username", "code", "items"],
        "description": "sign-up code",
        "created_by": "alice",
        **changes,
    }


async def create(client: httpx.AsyncClient, **changes: object) -> dict:
    r = await client.post(TEMPLATES, json=new_template(**changes))
    assert r.status_code == 201, r.text
    return r.json()["data"]


def bodies(item) -> tuple[str, str | None]:
    """(HTML part, plain-text part) of a received email."""
    message = BytesParser(policy=policy.default).parsebytes(item.data)
    html = message.get_body(("html",))
    text = message.get_body(("plain",))
    return (html.get_content() if html else ""), (text.get_content() if text else None)


async def test_create_version_history_rollback_and_delete(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    t = await create(client)
    assert t["version"] == 1 and t["variables"] == ["username", "code", "items"] and t["created_by"] == "alice"
    tid = t["id"]

    r = await client.put(f"{TEMPLATES}/{tid}", json={"subject": "[Brand] {{ username }}", "updated_by": "bob",
                                                     "change_description": "brand in the subject"})  # fmt: skip
    assert r.status_code == 200 and r.json()["data"]["version"] == 2
    history = (await client.get(f"{TEMPLATES}/{tid}/history")).json()["data"]["records"]
    assert [(h["version"], h["created_by"], h["change_description"]) for h in history] == [
        (2, "bob", "brand in the subject"),
        (1, "alice", "created"),
    ]
    assert history[1]["subject"] == "Your code, {{ username }}"

    back = await client.post(f"{TEMPLATES}/{tid}/rollback", json={"version": 1, "updated_by": "carol"})
    assert back.status_code == 200
    current = back.json()["data"]
    assert current["version"] == 3 and current["subject"] == "Your code, {{ username }}"
    history = (await client.get(f"{TEMPLATES}/{tid}/history")).json()["data"]["records"]
    assert [h["version"] for h in history] == [3, 2, 1]  # linear: the rollback is a new version
    assert history[0]["change_description"] == "rollback to version 1" and history[0]["created_by"] == "carol"

    missing = await client.post(f"{TEMPLATES}/{tid}/rollback", json={"version": 99})
    assert missing.status_code == 404 and missing.json()["code"] == 1004
    assert missing.json()["errors"][0]["field"] == "version"

    listed = (await client.get(TEMPLATES, params={"template_name": t["template_name"]})).json()["data"]
    assert listed["total"] == 1 and listed["records"][0]["version"] == 3
    assert (await client.delete(f"{TEMPLATES}/{tid}")).status_code == 200
    assert (await client.get(f"{TEMPLATES}/{tid}")).status_code == 404
    gone = await client.post(SEND, json={"to": "gone@example.com", "template_id": tid,
                                         "template_vars": {"username": "x", "code": "1", "items": []}})  # fmt: skip
    assert gone.status_code == 404 and gone.json()["code"] == 2003
    # Soft: the rows and the history stay.
    assert await db.fetchval("SELECT count(*) FROM message_template_history WHERE template_id=$1", tid) == 3
    # The name is free again.
    assert (await client.post(TEMPLATES, json=new_template(template_name=t["template_name"]))).status_code == 201


async def test_list_filters_and_pagination(client: httpx.AsyncClient) -> None:
    prefix = f"list-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        await create(client, template_name=f"{prefix}-{i}")
    await create(client, template_name=f"{prefix}-sms", template_type="sms", subject=None, content="code {{ code }}",
                 variables=["code"])  # fmt: skip
    page = (await client.get(TEMPLATES, params={"template_name": prefix, "page_size": 2})).json()["data"]
    assert page["total"] == 4 and len(page["records"]) == 2 and page["page_size"] == 2
    sms = (await client.get(TEMPLATES, params={"template_name": prefix, "template_type": "sms"})).json()["data"]
    assert [r["template_name"] for r in sms["records"]] == [f"{prefix}-sms"]
    duplicate = await client.post(TEMPLATES, json=new_template(template_name=f"{prefix}-0"))
    assert duplicate.status_code == 409 and duplicate.json()["errors"][0]["field"] == "template_name"


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ config }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ username._secret }}",
        "{{ username['__class__'] }}",
    ],
)
async def test_injection_payloads_are_refused_and_nothing_saved(
    client: httpx.AsyncClient, db: asyncpg.Pool, payload: str
) -> None:
    t = new_template(content=payload, variables=["username"])
    r = await client.post(TEMPLATES, json=t)
    assert r.status_code == 400 and r.json()["code"] == 2004, r.text
    assert r.json()["errors"][0]["field"] in ("content", "variables")
    assert await db.fetchval("SELECT count(*) FROM message_templates WHERE template_name=$1", t["template_name"]) == 0


async def test_size_syntax_and_undeclared_variables(client: httpx.AsyncClient) -> None:
    big = await client.post(TEMPLATES, json=new_template(content="x" * (16 * 1024 + 1)))
    assert big.status_code == 400 and big.json()["code"] == 1001 and big.json()["errors"][0]["field"] == "content"
    broken = await client.post(TEMPLATES, json=new_template(content="{% for %}"))
    assert broken.status_code == 400 and broken.json()["code"] == 2004
    undeclared = await client.post(TEMPLATES, json=new_template(variables=["username"]))
    assert undeclared.status_code == 400 and "code" in undeclared.json()["message"]
    bad_variant = await client.post(
        TEMPLATES, json=new_template(variants=[{"channel": "sms", "content": "{{ ().__class__ }}", "format": "text"}])
    )
    assert bad_variant.status_code == 400 and bad_variant.json()["errors"][0]["field"] == "variants.0.content"


async def test_preview_renders_escaped_and_a_huge_range_is_refused(client: httpx.AsyncClient) -> None:
    t = await create(client)
    r = await client.post(f"{TEMPLATES}/preview", json={"template_id": t["id"], "template_vars": {
        "username": "<Tom>", "code": "123456", "items": ["a", "b"]}})  # fmt: skip
    data = r.json()["data"]
    assert data["subject"] == "Your code, <Tom>"  # subjects are not HTML: not escaped
    assert data["content"] == "<p>Hello &lt;Tom&gt;, your code is <b>123456</b>.</p><ul><li>a</li><li>b</li></ul>"
    missing = await client.post(f"{TEMPLATES}/preview", json={"template_id": t["id"], "template_vars": {
        "username": "x", "items": []}})  # fmt: skip
    assert missing.status_code == 400 and missing.json()["code"] == 2004 and "code" in missing.json()["message"]
    loop = await create(client, content="{% for i in range(n) %}.{% endfor %}", variables=["n", "username"])
    huge = await client.post(f"{TEMPLATES}/preview", json={"template_id": loop["id"],
                                                           "template_vars": {"n": 10**9, "username": "u"}})  # fmt: skip
    assert huge.status_code == 400 and huge.json()["code"] == 2004


async def test_send_in_template_mode_with_locales_and_pinned_versions(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    t = await create(
        client,
        text_content="Hello {{ username }}: {{ code }}",
        variants=[
            {"channel": "email", "locale": "zh", "subject": "验证码 {{ username }}",
             "content": "<p>{{ username }}，您的验证码是 {{ code }}</p>"},
            {"channel": "sms", "content": "code {{ code }}", "format": "text"},
        ],
    )  # fmt: skip
    variables = {"username": "Li & Co", "code": "654321", "items": []}
    sent = await client.post(SEND, json={"to": "tpl@example.com", "template_id": t["id"], "template_vars": variables,
                                         "locale": "zh-CN"})  # fmt: skip
    assert sent.status_code == 202, sent.text
    mid = sent.json()["data"]["message_id"]
    item = await wait_for_mail(pipeline, by_message_id(mid))
    html, _ = bodies(item)
    assert item.parsed()["Subject"] == "验证码 Li & Co"
    assert "Li &amp; Co，您的验证码是 654321" in html

    record = await wait_for_state(client, mid, "sent")
    assert (record["template_id"], record["template_version"], record["locale"]) == (t["id"], 1, "zh-CN")
    assert record["template_vars"] == variables
    # Re-rendering from the record gives what was sent.
    again = (await client.post(f"{TEMPLATES}/preview", json={
        "template_id": record["template_id"], "template_version": record["template_version"],
        "template_vars": record["template_vars"], "locale": record["locale"]})).json()["data"]  # fmt: skip
    stored = await db.fetchrow("SELECT subject, content FROM message_records WHERE message_id=$1", mid)
    assert (
        (again["subject"], again["content"])
        == (stored["subject"], stored["content"])
        == (
            "验证码 Li & Co",
            "<p>Li &amp; Co，您的验证码是 654321</p>",
        )
    )

    # A new version: sends use it at once; a pinned send still gets version 1. By name too.
    update = await client.put(f"{TEMPLATES}/{t['id']}", json={
        "content": "<p>v2 {{ code }}</p>", "variables": ["code"], "subject": "v2", "text_content": None,
        "variants": []})  # fmt: skip
    assert update.status_code == 200 and update.json()["data"]["version"] == 2, update.text
    v2 = await client.post(SEND, json={"to": "tpl@example.com", "template_name": t["template_name"],
                                       "template_vars": {"code": "1"}})  # fmt: skip
    v1 = await client.post(SEND, json={"to": "tpl@example.com", "template_id": t["id"], "template_version": 1,
                                       "template_vars": variables})  # fmt: skip
    m2 = await wait_for_mail(pipeline, by_message_id(v2.json()["data"]["message_id"]))
    m1 = await wait_for_mail(pipeline, by_message_id(v1.json()["data"]["message_id"]))
    assert "v2 1" in bodies(m2)[0] and m2.parsed()["Subject"] == "v2"
    html1, text1 = bodies(m1)
    assert m1.parsed()["Subject"] == "Your code, Li & Co" and "Hello Li &amp; Co" in html1
    assert text1 is not None and text1.strip() == "Hello Li & Co: 654321"  # the template's text part


async def test_send_errors_in_template_mode(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    t = await create(client)
    base = {"to": "tpl-err@example.com", "template_id": t["id"]}
    missing = await client.post(SEND, json={**base, "template_vars": {"username": "x", "items": []}})
    assert missing.status_code == 400 and missing.json()["code"] == 2004
    assert missing.json()["errors"][0]["field"] == "template_vars.code"
    both = await client.post(SEND, json={**base, "content": "<p>x</p>", "template_vars": {}})
    assert both.status_code == 400 and both.json()["errors"][0]["field"] == "content"
    unknown = await client.post(SEND, json={**base, "template_id": 987654321, "template_vars": {}})
    assert unknown.status_code == 404 and unknown.json()["code"] == 2003
    no_version = await client.post(SEND, json={**base, "template_version": 7, "template_vars": {}})
    assert no_version.status_code == 404 and no_version.json()["errors"][0]["field"] == "template_version"
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE recipient='tpl-err@example.com'") == 0


async def test_a_render_failure_at_the_router_is_rejected_with_2004(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # Declared variables are all given, but one is not what the template expects.
    t = await create(client, content="<p>{{ user.name }}</p>", variables=["user", "username"])
    r = await client.post(SEND, json={"to": "render@example.com", "template_id": t["id"],
                                      "template_vars": {"user": "not an object", "username": "u"}})  # fmt: skip
    mid = r.json()["data"]["message_id"]
    record = await wait_for_state(client, mid, "rejected")
    assert record["error_code"] == 2004
    deadline = asyncio.get_running_loop().time() + 20
    while not (letter := await db.fetchrow("SELECT reason FROM dead_letters WHERE message_id=$1", mid)):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert letter["reason"] == "template_render_failed"


async def test_a_thousand_templated_sends_query_no_template(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """The router renders from its store (the config topic), never from PostgreSQL: counted by
    pg_stat_statements over every statement that reads the template tables."""
    t = await create(client, content="<p>{{ code }}</p>", variables=["code", "username"])
    await db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    async def template_reads() -> int:
        return await db.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query ILIKE '%message_template%' "
            "AND query NOT ILIKE '%pg_stat_statements%'"
        )

    # The suite's mailbox allows 500 a day: room for these thousand, and the counts put back
    # afterwards so that later tests find the pool as it was.
    saved = await db.fetch("SELECT id, daily_limit, daily_sent_count FROM email_accounts WHERE tenant_id='default'")
    await db.execute("UPDATE email_accounts SET daily_limit = daily_limit + 1000 WHERE tenant_id='default'")
    before = await template_reads()
    assert before > 0  # the counter works: creating the template was counted
    semaphore = asyncio.Semaphore(32)
    tag = uuid.uuid4().hex[:8]

    async def one(i: int) -> str:
        async with semaphore:
            r = await client.post(SEND, json={"to": f"bulk{i % 20}@example.com", "template_id": t["id"],
                                              "template_vars": {"code": f"{tag}-{i}", "username": "u"}})  # fmt: skip
            assert r.status_code == 202, r.text
            return r.json()["data"]["message_id"]

    ids = await asyncio.gather(*(one(i) for i in range(1000)))
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        sent = await db.fetchval(
            "SELECT count(*) FROM message_records WHERE message_id = ANY($1::text[]) AND state = 'sent'", ids
        )
        if sent == 1000 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    after = await template_reads()
    for row in saved:
        await db.execute("UPDATE email_accounts SET daily_limit=$2, daily_sent_count=$3 WHERE id=$1", *row.values())
    print(f"1000 templated sends: sent={sent} template queries={after - before}")
    assert sent == 1000
    assert after - before == 0
    contents = await db.fetch("SELECT content FROM message_records WHERE message_id = ANY($1::text[])", ids)
    assert {c["content"] for c in contents} == {f"<p>{tag}-{i}</p>" for i in range(1000)}
