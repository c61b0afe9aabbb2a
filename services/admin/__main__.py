"""``python -m services.admin``: the operator's commands, run where ``HERALD_DATABASE_URL`` points
at Herald's database (they talk to PostgreSQL directly, not to the API):

    create-key     a key for a tenant (the first admin key of a fresh install comes from here);
                   prints the key and its secret once
    list-keys      a tenant's keys (never their secrets)
    disable-key    / enable-key: a disabled key's tokens stop working at once
    create-tenant  a new tenant
    set-quota      a tenant's monthly quota for a channel ("unlimited" removes it)
    set-status     active | suspended | closed (a suspended tenant's keys stop working)
    migrate        apply the pending migrations and exit (whatever HERALD_RUN_MIGRATIONS says):
                   the Kubernetes migration Job (deploy/k8s), run before a rollout

Every command that changes something writes an audit entry with actor ``cli:<os user>``.
``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

import asyncpg
import orjson

from services.ingest.auth import ALL_SCOPES, notify
from services.ingest.keys import COLUMNS, create_key, key_out
from shared.db import _init_connection, create_pool, migrate
from shared.retention import archive
from shared.settings import Settings


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name (containers)
        return "cli:unknown"


async def _audit(conn: asyncpg.Connection, tenant: str, action: str, target_type: str, target: str, details: dict):
    await conn.execute(
        """INSERT INTO audit_log (tenant_id, actor, action, target_type, target_id, details)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        tenant,
        _actor(),
        action,
        target_type,
        target,
        details,
    )


async def _tenant_exists(conn: asyncpg.Connection, tenant: str) -> None:
    if not await conn.fetchval("SELECT true FROM tenants WHERE tenant_key = $1", tenant):
        raise SystemExit(f"herald admin: no tenant {tenant!r} (create it with create-tenant)")


async def create_key_cmd(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    if unknown := sorted(set(scopes) - set(ALL_SCOPES)) or (not scopes and ["(none)"]):
        raise SystemExit(f"herald admin: unknown scope {unknown[0]}; scopes are {', '.join(ALL_SCOPES)}")
    tier = args.tier or settings.default_key_tier
    if tier not in settings.rate_limit_tiers:
        raise SystemExit(f"herald admin: unknown tier {tier}; tiers are {', '.join(settings.rate_limit_tiers)}")
    async with conn.transaction():
        await _tenant_exists(conn, args.tenant)
        key, secret = await create_key(
            conn,
            tenant=args.tenant,
            name=args.name,
            scopes=scopes,
            tier=tier,
            rounds=settings.api_secret_bcrypt_rounds,
            description=args.description,
            created_by=_actor(),
        )
        await _audit(conn, args.tenant, "api_key.create", "api_key", str(key["id"]),
                     {"api_key": key["api_key"], "scopes": key["scopes"], "tier": tier})  # fmt: skip
    return {**key, "api_secret": secret}


async def list_keys_cmd(conn: asyncpg.Connection, args: argparse.Namespace, _: Settings) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM api_keys WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY id", args.tenant
    )
    return [key_out(r) for r in rows]


async def set_key_active(conn: asyncpg.Connection, api_key: str, active: bool) -> dict[str, Any]:
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE api_keys SET is_active = $2, updated_at = now() WHERE api_key = $1 AND deleted_at IS NULL "
            f"RETURNING {COLUMNS}",
            api_key,
            active,
        )
        if row is None:
            raise SystemExit(f"herald admin: no API key {api_key}")
        await notify(conn, f"key:{api_key}")
        action = "api_key.enable" if active else "api_key.disable"
        await _audit(conn, row["tenant_id"], action, "api_key", str(row["id"]), {"api_key": api_key})
    return key_out(row)


async def create_tenant_cmd(conn: asyncpg.Connection, args: argparse.Namespace, _: Settings) -> dict[str, Any]:
    async with conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO tenants (tenant_key, tenant_name) VALUES ($1, $2) "
                "RETURNING tenant_key, tenant_name, status, quotas",
                args.tenant,
                args.name,
            )
        except asyncpg.UniqueViolationError:
            raise SystemExit(f"herald admin: a tenant {args.tenant!r} or named {args.name!r} exists") from None
        await _audit(conn, args.tenant, "tenant.create", "tenant", args.tenant, {"tenant_name": args.name})
    return dict(row)


async def set_quota_cmd(conn: asyncpg.Connection, args: argparse.Namespace, _: Settings) -> dict[str, Any]:
    if args.limit == "unlimited":
        change, value = "quotas - $2::text", None
    else:
        if not args.limit.isdigit():
            raise SystemExit("herald admin: the limit is a whole number of messages a month, or 'unlimited'")
        change, value = "jsonb_set(quotas, ARRAY[$2::text], to_jsonb($3::int))", int(args.limit)
    async with conn.transaction():
        await _tenant_exists(conn, args.tenant)
        params = [args.tenant, args.channel] + ([value] if value is not None else [])
        row = await conn.fetchrow(
            f"UPDATE tenants SET quotas = {change}, updated_at = now() WHERE tenant_key = $1 "
            "RETURNING tenant_key, quotas",
            *params,
        )
        await _audit(conn, args.tenant, "tenant.set_quota", "tenant", args.tenant,
                     {"channel": args.channel, "limit": value})  # fmt: skip
    return dict(row)


async def set_status_cmd(conn: asyncpg.Connection, args: argparse.Namespace, _: Settings) -> dict[str, Any]:
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE tenants SET status = $2, updated_at = now() WHERE tenant_key = $1 RETURNING tenant_key, status",
            args.tenant,
            args.status,
        )
        if row is None:
            raise SystemExit(f"herald admin: no tenant {args.tenant!r}")
        await notify(conn, f"tenant:{args.tenant}")
        await _audit(conn, args.tenant, "tenant.set_status", "tenant", args.tenant, {"status": args.status})
    return dict(row)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.admin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-key", help="create an API key; prints its secret once")
    p.add_argument("--tenant", default="default")
    p.add_argument("--name", default="admin")
    p.add_argument("--scopes", default=",".join(ALL_SCOPES), help=f"comma-separated; default all: {ALL_SCOPES}")
    p.add_argument("--tier", default=None)
    p.add_argument("--description", default=None)
    p = sub.add_parser("list-keys", help="a tenant's keys")
    p.add_argument("--tenant", default="default")
    for name in ("disable-key", "enable-key"):
        p = sub.add_parser(name, help=f"{name.split('-')[0]} an API key")
        p.add_argument("api_key")
    p = sub.add_parser("create-tenant", help="a new tenant")
    p.add_argument("tenant", help="its key, e.g. acme")
    p.add_argument("--name", required=True)
    p = sub.add_parser("set-quota", help="monthly quota of a channel")
    p.add_argument("tenant")
    p.add_argument("channel", help="email, sms, ...")
    p.add_argument("limit", help="messages a month, or 'unlimited'")
    p = sub.add_parser("set-status", help="activate or suspend a tenant")
    p.add_argument("tenant")
    p.add_argument("status", choices=["active", "suspended", "closed"])
    p = sub.add_parser("archive", help="archive records past retention now (every tenant's, or one's)")
    p.add_argument("--tenant", default=None)
    sub.add_parser("migrate", help="apply the pending migrations and exit")
    return parser


async def run(argv: list[str]) -> Any:
    args = _parser().parse_args(argv)
    settings = Settings(service_name="admin")
    if args.command == "migrate":
        # Under yoyo's lock, so safe beside services that still migrate at start-up.
        return args, {"applied": await migrate(settings)}
    if settings.run_migrations:
        await migrate(settings)
    if args.command == "archive":
        # What the tracker does every HERALD_ARCHIVE_INTERVAL_S, on demand (shared/retention.py).
        pool = await create_pool(settings)
        try:
            return args, (await archive(pool, settings, tenant_id=args.tenant, trigger="manual")).as_dict()
        finally:
            await pool.close()
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    await _init_connection(conn)
    try:
        if args.command == "create-key":
            result = await create_key_cmd(conn, args, settings)
        elif args.command == "list-keys":
            result = await list_keys_cmd(conn, args, settings)
        elif args.command in ("disable-key", "enable-key"):
            result = await set_key_active(conn, args.api_key, args.command == "enable-key")
        elif args.command == "create-tenant":
            result = await create_tenant_cmd(conn, args, settings)
        elif args.command == "set-quota":
            result = await set_quota_cmd(conn, args, settings)
        else:
            result = await set_status_cmd(conn, args, settings)
    finally:
        await conn.close()
    return args, result


def main() -> None:
    args, result = asyncio.run(run(sys.argv[1:]))
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if args.command == "create-key":
        print(f"API key:    {result['api_key']}")
        print(f"API secret: {result['api_secret']}")
        print(f"tenant {result['tenant_id']}, scopes {','.join(result['scopes'])}, tier {result['tier']}")
        print("The secret is shown this once. Exchange the pair for a token:")
        print("  curl -s -X POST http://127.0.0.1:8000/api/v1/auth/token -H 'Content-Type: application/json' \\")
        print(f'       -d \'{{"api_key": "{result["api_key"]}", "api_secret": "<the secret>"}}\'')
        return
    if args.command == "migrate":
        applied = result["applied"]
        print(f"applied migrations: {', '.join(applied)}" if applied else "migrations: up to date")
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
