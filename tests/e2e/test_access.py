"""Access and isolation (issue 7), against the running pipeline: API keys and tokens, scopes on
every route, tenant isolation on every resource type, quotas, rate limits, the audit log, and
no secret in responses or logs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import jwt
import orjson
import pytest
from redis.asyncio import Redis

from devstack import access
from devstack.pipeline import start_services, stop_services
from tests.conftest import TEST_JWT_SECRET, Pipeline
from tests.e2e.helpers import KEYS, SEND, TOKEN, auth, make_key, uniq

AUDIT = "/api/v1/audit-logs"
pytestmark = pytest.mark.usefixtures("dump_logs_on_failure")


def forge(claims: dict, *, key: str = TEST_JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def assert_401(r: httpx.Response, reason: str | None = None) -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["code"] == 1002 and body["data"] is None
    assert r.headers["www-authenticate"].startswith("Bearer")
    if reason:
        assert reason in body["message"], body["message"]


# --- keys and tokens -------------------------------------------------------------------------------


async def test_key_lifecycle_token_exchange_and_what_is_refused(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    key = await make_key(client, ["send", "read"])
    assert key["api_key"].startswith("noti_") and len(key["api_key"]) == 5 + 32 and key["api_key"][5:].isalnum()
    assert len(key["api_secret"]) >= 32
    stored = await db.fetchrow("SELECT api_secret_hash FROM api_keys WHERE api_key = $1", key["api_key"])
    assert stored["api_secret_hash"].startswith("$2b$") and key["api_secret"] not in stored["api_secret_hash"]

    # The secret is shown once: never by a read, never a hash either.
    for r in (await client.get(f"{KEYS}/{key['id']}"), await client.get(KEYS)):
        assert r.status_code == 200
        assert key["api_secret"] not in r.text and "hash" not in r.text and "$2b$" not in r.text

    async with httpx.AsyncClient(base_url=client.base_url, timeout=10) as anon:
        r = await anon.post(TOKEN, json={"api_key": key["api_key"], "api_secret": key["api_secret"]})
        data = r.json()["data"]
        assert r.status_code == 200 and data["token_type"] == "bearer" and data["expires_in"] == 3600
        claims = jwt.decode(data["access_token"], TEST_JWT_SECRET, algorithms=["HS256"])
        assert claims["sub"] == key["api_key"] and claims["tid"] == "default"
        assert claims["exp"] - claims["iat"] == 3600
        access.ISSUED.append(data["access_token"])

        r = await anon.get("/api/v1/messages", headers=auth(data["access_token"]))
        assert r.status_code == 200, r.text
        assert "ratelimit-limit" not in r.headers  # the unlimited tier carries no limit headers

        r = await anon.post(TOKEN, json={"api_key": key["api_key"], "api_secret": key["api_secret"] + "x"})
        assert r.status_code == 401 and r.json()["code"] == 1002
        r = await anon.post(TOKEN, json={"api_key": "noti_" + "x" * 32, "api_secret": key["api_secret"]})
        assert r.status_code == 401 and "unknown API key or wrong secret" in r.json()["message"]
        r = await anon.post(TOKEN, json={"api_key": key["api_key"]})
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "api_secret"

        assert_401(await anon.get("/api/v1/messages"), "missing bearer token")
        # The key and secret themselves are not a bearer credential.
        raw = {"Authorization": f"Bearer {key['api_key']}:{key['api_secret']}"}
        assert_401(await anon.get("/api/v1/messages", headers=raw), "exchange the key")
        assert_401(await anon.get("/api/v1/messages", headers={"Authorization": f"Basic {key['api_key']}"}))
        # Health and metrics stay open.
        assert (await anon.get("/health")).status_code == 200
        assert (await anon.get("/metrics")).status_code == 200
        assert_401(await anon.get("/openapi.json"))

    await asyncio.sleep(6)  # usage is written in batches every 5 s
    used = (await client.get(f"{KEYS}/{key['id']}")).json()["data"]
    assert used["usage_count"] == 1 and used["last_used_at"] is not None


async def test_expired_tampered_none_and_foreign_tokens_are_refused(client: httpx.AsyncClient) -> None:
    key = await make_key(client, ["read"])
    now = int(time.time())
    good = {"iss": "herald", "sub": key["api_key"], "tid": "default", "jti": uniq(), "iat": now}
    head, payload, signature = key["token"].split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    none_token = (
        jwt.utils.base64url_encode(orjson.dumps({"alg": "none", "typ": "JWT"})).decode()
        + "."
        + jwt.utils.base64url_encode(orjson.dumps({**good, "exp": now + 600})).decode()
        + "."
    )
    cases = {
        "expired": (forge({**good, "exp": now - 1}), "token expired"),
        "tampered": (f"{head}.{flipped}.{signature}", "token invalid"),
        "alg none": (none_token, "token invalid"),
        "other key": (forge({**good, "exp": now + 600}, key="another-secret-of-at-least-32-bytes!!"), "token invalid"),
        "HS512": (forge({**good, "exp": now + 600}, alg="HS512"), "token invalid"),
        "no jti": (forge({k: v for k, v in good.items() if k != "jti"} | {"exp": now + 600}), "token invalid"),
        "other tenant": (forge({**good, "tid": "someone-else", "exp": now + 600}), "API key unknown"),
        "garbage": ("not.a.token", "token invalid"),
    }
    async with httpx.AsyncClient(base_url=client.base_url, timeout=10) as anon:
        for name, (token, reason) in cases.items():
            r = await anon.get("/api/v1/messages", headers=auth(token))
            assert r.status_code == 401, name
            assert_401(r, reason)
        # The same claims, correctly signed, pass: the refusals above are about the token.
        r = await anon.get("/api/v1/messages", headers=auth(forge({**good, "exp": now + 600})))
        assert r.status_code == 200, r.text


async def test_refresh_in_the_last_minutes_revokes_the_old_token(client: httpx.AsyncClient) -> None:
    key = await make_key(client, ["read"])
    async with httpx.AsyncClient(base_url=client.base_url, timeout=10) as anon:
        r = await anon.post("/api/v1/auth/refresh", headers=auth(key["token"]))
        assert r.status_code == 400 and "last 300 s" in r.json()["message"]

        now = int(time.time())
        ending = forge({"iss": "herald", "sub": key["api_key"], "tid": "default", "jti": uniq(), "iat": now - 3400,
                        "exp": now + 200})  # fmt: skip
        assert (await anon.get("/api/v1/messages", headers=auth(ending))).status_code == 200
        r = await anon.post("/api/v1/auth/refresh", headers=auth(ending))
        assert r.status_code == 200, r.text
        fresh = r.json()["data"]["access_token"]
        access.ISSUED.append(fresh)
        assert fresh != ending and r.json()["data"]["expires_in"] == 3600
        assert_401(await anon.get("/api/v1/messages", headers=auth(ending)), "token revoked")
        assert_401(await anon.post("/api/v1/auth/refresh", headers=auth(ending)), "token revoked")
        assert (await anon.get("/api/v1/messages", headers=auth(fresh))).status_code == 200

        # Sign-out: the token dies, other tokens of the key live on.
        assert (await anon.post("/api/v1/auth/revoke", headers=auth(fresh))).status_code == 200
        assert_401(await anon.get("/api/v1/messages", headers=auth(fresh)), "token revoked")
        assert (await anon.get("/api/v1/messages", headers=auth(key["token"]))).status_code == 200


@pytest.fixture(scope="module")
async def replica(pipeline: Pipeline) -> AsyncIterator[str]:
    """A second ingest on the same database and Redis: changes made through one replica must
    reach the other's caches."""
    log_dir = pipeline.backing.tmp / "replica"
    log_dir.mkdir(exist_ok=True)
    services = await asyncio.to_thread(start_services, pipeline.backing.env, log_dir, ["ingest"])
    yield services["ingest"].url
    await asyncio.to_thread(stop_services, services)


async def test_disabling_or_deleting_a_key_stops_its_tokens_on_every_replica_at_once(
    client: httpx.AsyncClient, replica: str
) -> None:
    key = await make_key(client, ["read"])
    async with httpx.AsyncClient(base_url=replica, timeout=10, headers=auth(key["token"])) as other:
        assert (await other.get("/api/v1/messages")).status_code == 200  # the replica caches the key now
        r = await client.post(f"{KEYS}/{key['id']}/disable")
        assert r.status_code == 200 and r.json()["data"]["is_active"] is False
        # The key cache holds states for 60 s; the NOTIFY must beat that by far.
        started = time.monotonic()
        while (r := await other.get("/api/v1/messages")).status_code == 200:
            assert time.monotonic() - started < 2, "the replica still accepts a disabled key's token"
            await asyncio.sleep(0.02)
        assert_401(r, "API key disabled")
        assert_401(await client.get("/api/v1/messages", headers=auth(key["token"])), "API key disabled")
        r = await client.post(TOKEN, json={"api_key": key["api_key"], "api_secret": key["api_secret"]})
        assert r.status_code == 401 and "disabled" in r.json()["message"]

        assert (await client.post(f"{KEYS}/{key['id']}/enable")).status_code == 200
        started = time.monotonic()
        while (await other.get("/api/v1/messages")).status_code != 200:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)

        # Narrowing scopes applies to tokens already issued.
        assert (await client.patch(f"{KEYS}/{key['id']}", json={"scopes": ["send"]})).status_code == 200
        started = time.monotonic()
        while (r := await other.get("/api/v1/messages")).status_code == 200:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)
        assert r.status_code == 403 and r.json()["code"] == 1003

        assert (await client.delete(f"{KEYS}/{key['id']}")).status_code == 200
        started = time.monotonic()
        while (r := await other.post(SEND, json={})).status_code != 401:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)
        assert (await client.get(f"{KEYS}/{key['id']}")).status_code == 404

    # A token revoked on one replica is refused by the other.
    key = await make_key(client, ["read"])
    async with httpx.AsyncClient(base_url=replica, timeout=10, headers=auth(key["token"])) as other:
        assert (await other.get("/api/v1/messages")).status_code == 200
        assert (await client.post("/api/v1/auth/revoke", headers=auth(key["token"]))).status_code == 200
        started = time.monotonic()
        while (r := await other.get("/api/v1/messages")).status_code == 200:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)
        assert_401(r, "token revoked")


async def test_a_suspended_tenants_keys_stop_at_once(pipeline: Pipeline) -> None:
    env = pipeline.backing.env
    tenant = uniq("s-")
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Suspended {tenant}")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=tenant)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=10, headers=headers) as c:
        assert (await c.get("/api/v1/messages")).status_code == 200
        await asyncio.to_thread(access.admin, env, "set-status", tenant, "suspended")
        started = time.monotonic()  # the NOTIFY travels on its own connection: a few ms at most
        while (r := await c.get("/api/v1/messages")).status_code == 200:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)
        assert_401(r, "tenant suspended")
        await asyncio.to_thread(access.admin, env, "set-status", tenant, "active")
        assert (await c.get("/api/v1/messages")).status_code == 200


async def test_key_expiry_and_bad_key_requests(client: httpx.AsyncClient) -> None:
    key = await make_key(client, ["read"])
    r = await client.patch(f"{KEYS}/{key['id']}", json={"expire_at": "2020-01-01T00:00:00Z"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "expire_at"
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    assert (await client.patch(f"{KEYS}/{key['id']}", json={"expire_at": soon})).status_code == 200
    await asyncio.sleep(2.5)
    assert_401(await client.get("/api/v1/messages", headers=auth(key["token"])), "API key expired")

    bad = [
        ({"key_name": "x", "scopes": ["root"]}, "scopes"),
        ({"key_name": "x", "scopes": []}, "scopes"),
        ({"key_name": "x", "scopes": ["read"], "tier": "platinum"}, "tier"),
        ({"scopes": ["read"]}, "key_name"),
        ({"key_name": "x", "scopes": ["read"], "api_secret": "mine"}, "api_secret"),
    ]
    before = (await client.get(KEYS, params={"page_size": 1})).json()["data"]["total"]
    for body, field in bad:
        r = await client.post(KEYS, json=body)
        assert r.status_code == 400 and r.json()["code"] == 1001, body
        assert r.json()["errors"][0]["field"] == field, r.text
    assert (await client.get(KEYS, params={"page_size": 1})).json()["data"]["total"] == before


# --- scopes ------------------------------------------------------------------------------------------

# Every route and the scope it needs (None: any valid token). A route missing here fails
# test_every_route_is_in_the_scope_table, so a new endpoint cannot ship unscoped by accident.
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    ("POST", "/api/v1/messages/email/send"): "send",
    ("POST", "/api/v1/messages/email/send/scheduled"): "send",
    ("GET", "/api/v1/messages/scheduled"): "read",
    ("POST", "/api/v1/messages/{message_id}/cancel"): "send",
    ("POST", "/api/v1/messages/{message_id}/reschedule"): "send",
    ("POST", "/api/v1/attachments/upload"): "send",
    ("GET", "/api/v1/messages"): "read",
    ("GET", "/api/v1/messages/{message_id}"): "read",
    ("GET", "/api/v1/messages/{message_id}/timeline"): "read",
    ("POST", "/api/v1/messages/batch/query"): "read",
    ("POST", "/api/v1/messages/batch"): "send",
    ("POST", "/api/v1/batches/{batch_id}/cancel"): "send",
    ("GET", "/api/v1/batches"): "read",
    ("GET", "/api/v1/batches/{batch_id}"): "read",
    ("GET", "/api/v1/batches/{batch_id}/messages"): "read",
    ("GET", "/api/v1/dead-letters"): "read",
    ("GET", "/api/v1/dead-letters/{letter_id}"): "read",
    ("POST", "/api/v1/dead-letters/{letter_id}/replay"): "config",
    ("POST", "/api/v1/dead-letters/replay"): "config",
    ("GET", "/api/v1/templates"): "read",
    ("GET", "/api/v1/templates/{template_id}"): "read",
    ("GET", "/api/v1/templates/{template_id}/history"): "read",
    ("POST", "/api/v1/templates"): "templates",
    ("PUT", "/api/v1/templates/{template_id}"): "templates",
    ("POST", "/api/v1/templates/{template_id}/rollback"): "templates",
    ("DELETE", "/api/v1/templates/{template_id}"): "templates",
    ("POST", "/api/v1/templates/preview"): "templates",
    ("GET", "/api/v1/tenants/{tenant_key}"): "read",
    ("POST", "/api/v1/messages/send"): "send",
    ("POST", "/api/v1/messages/wechat-mp/send"): "send",
    ("GET", "/api/v1/providers/catalogue"): "read",
    ("POST", "/api/v1/providers"): "config",
    ("GET", "/api/v1/providers"): "config",
    ("GET", "/api/v1/providers/{provider_id}"): "config",
    ("PATCH", "/api/v1/providers/{provider_id}"): "config",
    ("DELETE", "/api/v1/providers/{provider_id}"): "config",
    ("POST", "/api/v1/frequency-caps"): "config",
    ("GET", "/api/v1/frequency-caps"): "config",
    ("GET", "/api/v1/frequency-caps/{cap_id}"): "config",
    ("PATCH", "/api/v1/frequency-caps/{cap_id}"): "config",
    ("DELETE", "/api/v1/frequency-caps/{cap_id}"): "config",
    ("POST", "/api/v1/digest-rules"): "config",
    ("GET", "/api/v1/digest-rules"): "config",
    ("GET", "/api/v1/digest-rules/{rule_id}"): "config",
    ("PATCH", "/api/v1/digest-rules/{rule_id}"): "config",
    ("DELETE", "/api/v1/digest-rules/{rule_id}"): "config",
    ("POST", "/api/v1/routing/rules"): "config",
    ("GET", "/api/v1/routing/rules"): "config",
    ("GET", "/api/v1/routing/rules/{rule_id}"): "config",
    ("PATCH", "/api/v1/routing/rules/{rule_id}"): "config",
    ("DELETE", "/api/v1/routing/rules/{rule_id}"): "config",
    ("GET", "/api/v1/routing/policy"): "config",
    ("PUT", "/api/v1/routing/policy"): "config",
    # Recipient profiles are contact data: config, not read or send (services/ingest/routes/recipients.py).
    ("GET", "/api/v1/recipients"): "config",
    ("GET", "/api/v1/recipients/{user_id}"): "config",
    ("PUT", "/api/v1/recipients/{user_id}"): "config",
    ("PATCH", "/api/v1/recipients/{user_id}"): "config",
    ("DELETE", "/api/v1/recipients/{user_id}"): "config",
    ("PATCH", "/api/v1/tenants/{tenant_key}"): "config",
    ("GET", "/api/v1/email-accounts"): "config",
    ("POST", "/api/v1/email-accounts"): "config",
    ("GET", "/api/v1/email-accounts/{account_id}"): "config",
    ("PATCH", "/api/v1/email-accounts/{account_id}"): "config",
    ("POST", "/api/v1/email-accounts/{account_id}/enable"): "config",
    ("POST", "/api/v1/email-accounts/{account_id}/disable"): "config",
    ("DELETE", "/api/v1/email-accounts/{account_id}"): "config",
    ("GET", "/api/v1/schemas/{name}"): "read",
    ("GET", "/api/v1/api-keys"): "admin",
    ("POST", "/api/v1/api-keys"): "admin",
    ("GET", "/api/v1/api-keys/{key_id}"): "admin",
    ("PATCH", "/api/v1/api-keys/{key_id}"): "admin",
    ("POST", "/api/v1/api-keys/{key_id}/enable"): "admin",
    ("POST", "/api/v1/api-keys/{key_id}/disable"): "admin",
    ("DELETE", "/api/v1/api-keys/{key_id}"): "admin",
    ("GET", "/api/v1/audit-logs"): "admin",
    # Status callbacks (issue 11): endpoints and secrets are config, the delivery log read.
    ("POST", "/api/v1/webhooks"): "config",
    ("GET", "/api/v1/webhooks"): "read",
    ("GET", "/api/v1/webhooks/{webhook_id}"): "read",
    ("PUT", "/api/v1/webhooks/{webhook_id}"): "config",
    ("DELETE", "/api/v1/webhooks/{webhook_id}"): "config",
    ("POST", "/api/v1/webhooks/{webhook_id}/rotate-secret"): "config",
    ("POST", "/api/v1/webhooks/signing-secret"): "config",
    ("GET", "/api/v1/webhooks/deliveries"): "read",
    ("GET", "/api/v1/statistics/summary"): "read",
    ("GET", "/api/v1/statistics/breakdown"): "read",
    ("GET", "/api/v1/statistics/archive"): "read",
    ("POST", "/api/v1/statistics/archive"): "admin",
    ("POST", "/api/v1/auth/refresh"): None,
    ("POST", "/api/v1/auth/revoke"): None,
}
OPEN_ROUTES = {("POST", "/api/v1/auth/token"), ("GET", "/health"), ("GET", "/health/live"),
               ("GET", "/health/ready"), ("GET", "/metrics")}  # fmt: skip
PATH_VALUES = {"message_id": "msg_nothing", "letter_id": "987654321", "template_id": "987654321",
               "tenant_key": "default", "account_id": "987654321", "name": "notify.request.v1",
               "key_id": "987654321", "batch_id": "bat_nothing",
               "cap_id": "987654321", "rule_id": "987654321", "provider_id": "987654321",
               "user_id": "scope-probe-987654321", "webhook_id": "987654321"}  # fmt: skip


async def test_every_route_is_in_the_scope_table(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes - OPEN_ROUTES == set(ROUTE_SCOPES), routes.symmetric_difference(set(ROUTE_SCOPES) | OPEN_ROUTES)


async def test_each_route_refuses_a_key_without_its_scope_and_admits_one_with_it(client: httpx.AsyncClient) -> None:
    scopes = ["send", "read", "templates", "config", "admin"]
    only = {s: await make_key(client, [s]) for s in scopes}
    all_but = {s: await make_key(client, [o for o in scopes if o != s]) for s in scopes}
    for (method, path), scope in ROUTE_SCOPES.items():
        if scope is None or path.startswith("/api/v1/auth/"):
            continue
        url = path.format(**PATH_VALUES)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        r = await client.request(method, url, json=body, headers=auth(all_but[scope]["token"]))
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["code"] == 1003 and scope in r.json()["message"]
        r = await client.request(method, url, json=body, headers=auth(only[scope]["token"]))
        assert r.status_code not in (401, 403), (method, path, r.text)


# --- tenant isolation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def other_tenant(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    tenant = uniq("t-")
    await asyncio.to_thread(access.admin, pipeline.backing.env, "create-tenant", tenant, "--name", f"Tenant {tenant}")
    headers = await asyncio.to_thread(access.admin_headers, pipeline.backing.env, pipeline.ingest_url, tenant=tenant)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as c:
        c.tenant = tenant  # type: ignore[attr-defined]
        yield c


async def test_another_tenants_resources_answer_404_and_never_appear_in_lists(
    client: httpx.AsyncClient, other_tenant: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mine = other_tenant
    # Tenant A's resources, one of each type.
    subject = uniq("isolation ")
    r = await client.post(SEND, json={"to": "a@example.com", "subject": subject, "content": "<p>A</p>"})
    message_id = r.json()["data"]["message_id"]
    r = await client.post(SEND, json={"to": "a@example.com", "subject": uniq("later "), "content": "x", "delay": "1h"})
    scheduled_id = r.json()["data"]["message_id"]
    r = await client.post("/api/v1/templates", json={"template_name": uniq("tpl-"), "template_type": "email",
                                                     "subject": "Hi", "content": "<p>{{ name }}</p>"})  # fmt: skip
    assert r.status_code == 201, r.text
    template_id = r.json()["data"]["id"]
    r = await client.post("/api/v1/email-accounts", json={"email": f"{uniq()}@example.com", "smtp_host": "127.0.0.1",
                                                          "smtp_port": 2525, "is_active": False})  # fmt: skip
    assert r.status_code == 201, r.text
    account_id = r.json()["data"]["id"]
    r = await client.post("/api/v1/attachments/upload", files=[("file", ("a.txt", b"hello"))])
    assert r.status_code == 200, r.text
    attachment_id = r.json()["data"][0]["attachment_id"]
    letter_id = await db.fetchval(
        """INSERT INTO dead_letters (tenant_id, source_topic, partition, "offset", service, reason, payload,
               occurred_at)
           VALUES ('default', 'notify.request', 0, 0, 'router', 'test', '{}', now()) RETURNING id"""
    )
    key_id = (await make_key(client, ["read"]))["id"]

    reads = [
        f"/api/v1/messages/{message_id}",
        f"/api/v1/messages/{message_id}/timeline",
        f"/api/v1/templates/{template_id}",
        f"/api/v1/templates/{template_id}/history",
        f"/api/v1/email-accounts/{account_id}",
        f"/api/v1/dead-letters/{letter_id}",
        f"/api/v1/api-keys/{key_id}",
        "/api/v1/tenants/default",
    ]
    for url in reads:
        assert (await client.get(url)).status_code == 200, url
        r = await mine.get(url)
        assert r.status_code == 404, (url, r.text)
        assert r.json()["data"] is None
    writes = [
        ("PUT", f"/api/v1/templates/{template_id}", {"content": "<p>taken</p>"}),
        ("POST", f"/api/v1/templates/{template_id}/rollback", {"version": 1}),
        ("DELETE", f"/api/v1/templates/{template_id}", None),
        ("POST", "/api/v1/templates/preview", {"template_id": template_id, "template_vars": {"name": "x"}}),
        ("PATCH", f"/api/v1/email-accounts/{account_id}", {"daily_limit": 1}),
        ("POST", f"/api/v1/email-accounts/{account_id}/enable", None),
        ("DELETE", f"/api/v1/email-accounts/{account_id}", None),
        ("POST", f"/api/v1/dead-letters/{letter_id}/replay", None),
        ("PATCH", f"/api/v1/api-keys/{key_id}", {"scopes": ["admin"]}),
        ("POST", f"/api/v1/api-keys/{key_id}/disable", None),
        ("DELETE", f"/api/v1/api-keys/{key_id}", None),
        ("PATCH", "/api/v1/tenants/default", {"dedup_window_s": 1}),
        ("POST", f"/api/v1/messages/{scheduled_id}/cancel", None),
        ("POST", f"/api/v1/messages/{scheduled_id}/reschedule", {"delay": "1m"}),
        ("POST", SEND, {"to": "b@example.com", "subject": "x", "content": "y", "attachment_ids": [attachment_id]}),
        ("POST", SEND, {"to": "b@example.com", "template_id": template_id, "template_vars": {"name": "x"}}),
    ]
    for method, url, body in writes:
        r = await mine.request(method, url, json=body)
        assert r.status_code == 404, (method, url, r.text)
    # ... and nothing of A's changed.
    assert (await client.get(f"/api/v1/templates/{template_id}")).json()["data"]["version"] == 1
    assert (await client.get(f"/api/v1/email-accounts/{account_id}")).json()["data"]["daily_limit"] == 500
    assert (await client.get(f"/api/v1/api-keys/{key_id}")).json()["data"]["scopes"] == ["read"]

    r = await mine.post("/api/v1/messages/batch/query", json={"message_ids": [message_id]})
    assert r.status_code == 200 and message_id not in r.text
    scheduled = (await client.get(f"/api/v1/messages/{scheduled_id}")).json()["data"]
    assert scheduled["state"] == "scheduled" and scheduled["scheduled_at"] is not None
    assert (await client.post(f"/api/v1/messages/{scheduled_id}/cancel")).status_code == 200
    for url in ("/api/v1/messages", "/api/v1/templates", "/api/v1/email-accounts", "/api/v1/dead-letters",
                "/api/v1/api-keys", "/api/v1/audit-logs", "/api/v1/messages/scheduled"):  # fmt: skip
        r = await mine.get(url)
        assert r.status_code == 200, url
        text = r.text
        for foreign in (message_id, scheduled_id, subject, f'"id":{template_id},', f'"id":{account_id},',
                        f'"id":{letter_id},'):  # fmt: skip
            assert foreign not in text, (url, foreign)
    # B's own message is B's alone.
    r = await mine.post(SEND, json={"to": "b@example.com", "subject": uniq(), "content": "<p>B</p>"})
    assert r.status_code == 202, r.text
    assert (await client.get(f"/api/v1/messages/{r.json()['data']['message_id']}")).status_code == 404
    tenant = await db.fetchval(
        "SELECT tenant_id FROM message_records WHERE message_id = $1", r.json()["data"]["message_id"]
    )
    assert tenant == mine.tenant  # type: ignore[attr-defined]


# --- quotas and rate limits --------------------------------------------------------------------------


async def test_monthly_email_quota_is_enforced_per_tenant(pipeline: Pipeline, db: asyncpg.Pool) -> None:
    env = pipeline.backing.env
    tenant = uniq("q-")
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Quota {tenant}")
    await asyncio.to_thread(access.admin, env, "set-quota", tenant, "email", "3")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=tenant)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as c:
        first = {"to": "q@example.com", "subject": "one", "content": "<p>1</p>"}
        assert (await c.post(SEND, json=first)).status_code == 202
        assert (await c.post(SEND, json=first)).status_code == 409  # a duplicate uses no quota
        for i in (2, 3):
            r = await c.post(SEND, json={**first, "subject": f"n{i}", "idempotency_key": f"k{i}"})
            assert r.status_code == 202, r.text
        # A replayed idempotency key is not a new message either (answered with the first one).
        again = await c.post(SEND, json={**first, "subject": "n3", "idempotency_key": "k3"})
        assert again.status_code == 202 and again.json()["data"]["message_id"] == r.json()["data"]["message_id"]
        r = await c.post(SEND, json={**first, "subject": "four"})
        assert r.status_code == 429, r.text
        body = r.json()
        assert body["code"] == 1008 and "monthly email quota of 3" in body["message"] and "renews at" in body["message"]
        assert await db.fetchval("SELECT count(*) FROM message_records WHERE tenant_id = $1", tenant) == 3
        data = (await c.get(f"/api/v1/tenants/{tenant}")).json()["data"]
        assert data["quotas"]["email"] == 3 and data["email_quota"] == 3 and data["usage"]["used"]["email"] == 3
        # Redis losing the counter does not hand out a fresh month: it is counted again from the records.
        redis = Redis.from_url(pipeline.backing.redis_url)
        assert await redis.delete(f"herald:quota:{tenant}:email:{data['usage']['month']}") == 1
        await redis.aclose()
        r = await c.post(SEND, json={**first, "subject": "four again"})
        assert r.status_code == 429 and r.json()["code"] == 1008

    # Raising the quota takes effect within the settings cache's 5 s.
    await asyncio.to_thread(access.admin, env, "set-quota", tenant, "email", "unlimited")
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as c:
        started = time.monotonic()
        while (r := await c.post(SEND, json={**first, "subject": "five"})).status_code == 429:
            assert time.monotonic() - started < 8
            await asyncio.sleep(0.5)
        assert r.status_code == 202


async def test_per_ip_limit_on_requests_without_a_valid_token(pipeline: Pipeline) -> None:
    # A loopback address of its own, so this bucket is not the rest of the suite's.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.77")
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=10, transport=transport) as c:
        for i in range(100):
            r = await c.get("/api/v1/messages", headers=auth(f"guess-{i}"))
            assert r.status_code == 401, (i, r.text)
            assert r.headers["ratelimit-limit"] == "100"
            assert r.headers["ratelimit-remaining"] == str(99 - i)
            assert r.headers["ratelimit-policy"] == "100;w=60"
        r = await c.post(TOKEN, json={"api_key": "noti_x", "api_secret": "y"})
        assert r.status_code == 429, r.text
        assert r.json()["code"] == 1007 and "client address" in r.json()["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["ratelimit-remaining"] == "0"
        # Health checks are never limited.
        assert (await c.get("/health")).status_code == 200
    # A valid token is limited by its key, not by the address.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.77")
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=10, transport=transport) as c:
        assert (await c.get("/api/v1/messages", headers=pipeline.headers)).status_code == 200


async def test_per_key_limit_by_tier(client: httpx.AsyncClient) -> None:
    tiny = await make_key(client, ["read"], tier="tiny")  # 5 a minute in the suite
    other = await make_key(client, ["read"], tier="standard")
    for i in range(5):
        r = await client.get("/api/v1/messages", headers=auth(tiny["token"]))
        assert r.status_code == 200, r.text
        assert (r.headers["ratelimit-limit"], r.headers["ratelimit-remaining"]) == ("5", str(4 - i))
        assert 0 <= int(r.headers["ratelimit-reset"]) <= 60
    r = await client.get("/api/v1/messages", headers=auth(tiny["token"]))
    assert r.status_code == 429 and r.json()["code"] == 1007 and "this API key" in r.json()["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    r = await client.get("/api/v1/messages", headers=auth(other["token"]))
    assert r.status_code == 200 and r.headers["ratelimit-limit"] == "6000"


# --- audit -----------------------------------------------------------------------------------------------


async def test_admin_and_config_actions_are_audited(client: httpx.AsyncClient, pipeline: Pipeline) -> None:
    key = await make_key(client, ["read"])
    await client.post(f"{KEYS}/{key['id']}/disable")
    r = await client.post("/api/v1/templates", json={"template_name": uniq("aud-"), "template_type": "email",
                                                     "subject": "s", "content": "c"})  # fmt: skip
    template_id = r.json()["data"]["id"]
    r = await client.post("/api/v1/email-accounts", json={"email": f"{uniq()}@example.com", "smtp_host": "127.0.0.1",
                                                          "smtp_port": 2525, "smtp_password": "audit-pw-77",
                                                          "is_active": False})  # fmt: skip
    account_id = r.json()["data"]["id"]
    access.ISSUED.append("audit-pw-77")
    r = await client.patch("/api/v1/tenants/default", json={"dedup_window_s": None})
    request_id = r.headers["x-request-id"]
    me = jwt.decode(pipeline.headers["Authorization"].split()[1], options={"verify_signature": False})["sub"]

    entries = (await client.get(AUDIT, params={"page_size": 50})).json()["data"]["items"]
    seen = {(e["action"], e["target_id"]) for e in entries}
    for expected in [
        ("api_key.create", str(key["id"])),
        ("api_key.disable", str(key["id"])),
        ("template.create", str(template_id)),
        ("email_account.create", str(account_id)),
        ("tenant.update", "default"),
    ]:
        assert expected in seen, expected
    tenant_entry = next(e for e in entries if e["action"] == "tenant.update")
    assert tenant_entry["actor"] == me and tenant_entry["source_ip"] == "127.0.0.1"
    assert tenant_entry["request_id"] == request_id and tenant_entry["created_at"].endswith("Z")
    account_entry = next(e for e in entries if e["action"] == "email_account.create")
    assert account_entry["details"]["smtp_password"] == "<set>" and "audit-pw-77" not in str(entries)
    assert all(key["api_secret"] not in str(e) for e in entries)
    r = await client.get(AUDIT, params={"action": "api_key.disable"})
    assert {e["action"] for e in r.json()["data"]["items"]} == {"api_key.disable"}

    # The operator's command is audited too, as cli:<user>.
    await asyncio.to_thread(access.admin, pipeline.backing.env, "disable-key", key["api_key"])
    entries = (await client.get(AUDIT, params={"action": "api_key.disable"})).json()["data"]["items"]
    assert entries[0]["actor"].startswith("cli:") and entries[0]["details"]["api_key"] == key["api_key"]

    reader = await make_key(client, ["read", "config", "templates", "send"])
    r = await client.get(AUDIT, headers=auth(reader["token"]))
    assert r.status_code == 403 and r.json()["code"] == 1003


# --- secrets ---------------------------------------------------------------------------------------------


async def test_no_secret_reaches_the_logs_or_the_answers(client: httpx.AsyncClient, pipeline: Pipeline) -> None:
    """A key's secret and tokens, used rightly and wrongly, appear in no answer but the ones
    that hand them out and in no service log (the pipeline fixture searches the whole run's
    logs again, for every secret the suite was given, when the session ends)."""
    key = await make_key(client, ["send", "read"])
    secrets = [key["api_secret"], key["token"]]
    answers = []
    async with httpx.AsyncClient(base_url=client.base_url, timeout=10) as anon:
        answers.append(await anon.post(TOKEN, json={"api_key": key["api_key"], "api_secret": key["api_secret"][:-1]}))
        answers.append(await anon.get("/api/v1/messages", headers=auth(key["token"] + "x")))
        answers.append(await anon.get("/api/v1/messages", headers={"Authorization": f"Bearer {key['api_key']}:"
                                                                                  f"{key['api_secret']}"}))  # fmt: skip
        answers.append(await anon.post(SEND, json={"to": "not an address", "subject": "s", "content": "c"},
                                       headers=auth(key["token"])))  # fmt: skip
        answers.append(await anon.get(f"{KEYS}/{key['id']}", headers=pipeline.headers))
        answers.append(await anon.get(KEYS, headers=pipeline.headers))
        answers.append(await anon.get(AUDIT, headers=pipeline.headers))
    assert [a.status_code for a in answers] == [401, 401, 401, 400, 200, 200, 200]
    for answer in answers:
        assert not any(secret in answer.text for secret in secrets), answer.request.url
    await asyncio.sleep(0.5)  # the services' log lines of these requests are written
    logs = "".join(path.read_text(errors="replace") for path in pipeline.backing.tmp.rglob("*.log"))
    assert '"service":"ingest"' in logs and '"service":"router"' in logs  # the logs are there and read
    assert not any(secret in logs for secret in secrets)
