"""``make bench``: ingest and end-to-end throughput, each next to a baseline run in the same
process tree, written to ``bench/results/`` as JSON plus a short table.

Phases (each on servers this run starts; nothing is shared with a running ``make run``):
1. ingest: wrk at fixed concurrency against Herald's ingest (only ingest running) and against
   the floor (``bench/floor.py``: validate + acks=all send, nothing else); ratio Herald/floor.
   Herald is measured with a token of an unlimited-tier key (token check only), with a token of
   a rate-limited key (token check + the Redis rate-limit count), and, when ``BENCH_BASE_REF``
   names a commit (default: the last one before access control), that commit's ingest, which
   had no authentication: the authenticated figures next to the unauthenticated one. The
   server-side cost of a token check and of a rate-limit count is also timed in-process.
2. end to end: N messages posted as fast as ingest takes them, delivered by the whole pipeline
   to an SMTP sink in its own process; rate from first POST to last 'sent' record, latency
   sent_at - accepted_at, lost and duplicated deliveries counted at the sink; peak RSS and CPU
   seconds of every process.
3. baseline peer: the same N messages sent directly with Apprise (``json://`` to the webhook sink).
4. one sender process against a bare aiosmtplib loop.
6. webhook channel (issue 9): BENCH_WEBHOOK_N messages (N) through ``POST /api/v1/messages/send``
   on the ``webhook`` channel (a configured Standard Webhooks provider: signed, SSRF-guarded, paced)
   to the same webhook sink as phase 3; rate from first POST to last 'sent', lost and duplicated at
   the sink; ratio against Apprise's direct ``json://`` posts (phase 3).
5. scheduled: BENCH_SCHEDULED_N messages (5000) all scheduled for one instant a few seconds after
   they are posted: how late the scheduler released them (p50/p99/max of executed_at -
   scheduled_time), how late they were sent, and the rate of that burst from its time to the last
   'sent' against the rate of phase 2 (the same pipeline with messages sent at once).

7. routing (issue 10): the router's decision per record (bench/routing.py), without servers: an
   SMS ranked among three providers by cost and live quality, and a user's message that a rule
   sends to Feishu then SMS, against the same SMS decided without routing state (the baseline).
8. fold (issue 11): the tracker's fold of batches of events into PostgreSQL (bench/fold.py), with
   the delivery statistics' rollups against the same fold without them (the baseline).

Settings by environment: BENCH_N (20000), BENCH_DURATION (10 s), BENCH_CONCURRENCY ("50,200"),
BENCH_BASE_REF (f705016; "" skips it), BENCH_SCHEDULED_N (5000; 0 skips phase 5), BENCH_WEBHOOK_N (N;
0 skips phase 6), BENCH_ROUTING_N (20000; 0 skips phase 7), BENCH_FOLD_N (20000; 0 skips phase 8).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import httpx
import psutil

from bench.fold import FOLD_N, phase_fold
from bench.routing import ROUTING_N, phase_routing
from devstack import access, servers
from devstack.pipeline import ROOT, start_services, stop_services, wait_ready

RESULTS = ROOT / "bench" / "results"
N = int(os.environ.get("BENCH_N", "20000"))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
LEVELS = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "50,200").split(",")]
BASE_REF = os.environ.get("BENCH_BASE_REF", "f705016")
SCHEDULED_N = int(os.environ.get("BENCH_SCHEDULED_N", "5000"))
WEBHOOK_N = int(os.environ.get("BENCH_WEBHOOK_N", str(N)))


def log(text: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# --- phase 1: ingest vs floor ----------------------------------------------------------------


def wrk(url: str, concurrency: int, duration: int, token: str = "") -> dict:
    threads = min(2, concurrency)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench" / "post.lua"),
            url,
            "--",
            uuid.uuid4().hex[:12],  # this run's nonce: bodies never repeat an earlier run's
            token,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    seconds = data["duration_us"] / 1e6
    errors = sum(data["errors"].values())
    data["rps"] = round((data["requests"] - data["errors"]["status"]) / seconds, 1)
    data["error_count"] = errors
    return data


def start_base_ingest(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, Path] | None:
    """The ingest of ``BASE_REF`` (a git worktree), on the same servers, migrations left alone."""
    if not BASE_REF:
        return None
    tree = tmp / "base-tree"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BASE_REF],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        log(f"ingest: no base run ({BASE_REF} not checked out: {done.stderr.strip()[:200]})")
        return None
    port = servers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ingest"],
        cwd=tree,  # its own code first on sys.path
        env={**os.environ, **env, "HERALD_INGEST_PORT": str(port), "HERALD_RUN_MIGRATIONS": "false",
             "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "base-ingest.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, 120)
    return proc, f"http://127.0.0.1:{port}", tree


async def auth_cost(env: dict[str, str], api_key: str, limited_key: str) -> dict:
    """Server time of the access checks, in-process: a cached token check, and one rate-limit
    count (two Redis round trips)."""
    from services.ingest.auth import Authenticator, Tokens, signing_key
    from services.ingest.limits import RateLimiter
    from shared.settings import Settings

    saved = dict(os.environ)
    os.environ.update(env)  # the settings exactly as the services read them
    try:
        settings = Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    pool = await asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=2)
    try:
        tokens = Tokens(signing_key(settings), settings.jwt_ttl_s)
        auth = Authenticator(pool, tokens, settings)
        token, _ = tokens.issue(api_key, "default")
        await auth.authenticate(token)  # the first check reads the key; the rest are cached
        n = 100_000
        start = time.perf_counter()
        for _ in range(n):
            await auth.authenticate(token)
        check_us = (time.perf_counter() - start) / n * 1e6
        fresh = [tokens.issue(api_key, "default")[0] for _ in range(2000)]
        start = time.perf_counter()
        for t in fresh:
            await auth.authenticate(t)
        first_us = (time.perf_counter() - start) / len(fresh) * 1e6
        limiter = RateLimiter(settings)
        item = limiter.tier_item("limited")
        await limiter.take(item, "key", limited_key)
        start = time.perf_counter()
        for _ in range(2000):
            await limiter.take(item, "key", limited_key)
        limit_us = (time.perf_counter() - start) / 2000 * 1e6
    finally:
        await pool.close()
    return {
        "cached_token_check_us": round(check_us, 2),
        "first_check_of_a_token_us": round(first_us, 1),
        "rate_limit_count_us": round(limit_us, 1),
    }


def phase_ingest(tmp: Path, env: dict[str, str]) -> dict:
    path = "/api/v1/messages/email/send"
    services = start_services(env, tmp, ["ingest"])
    url = services["ingest"].url
    access.admin(env, "set-quota", "default", "email", "unlimited")
    unlimited_key = access.new_key(env, tier="unlimited", name="bench")
    limited_key = access.new_key(env, tier="limited", name="bench-limited")
    tokens = {"herald": access.token_for(url, *unlimited_key), "herald-limited": access.token_for(url, *limited_key)}
    floor_port = servers.free_port()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--port", str(floor_port)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "floor.log", "wb"),
    )
    base = None
    try:
        wait_ready(f"http://127.0.0.1:{floor_port}/health/ready", floor, 60)
        targets = {
            "floor": f"http://127.0.0.1:{floor_port}{path}",
            "herald": url + path,
            "herald-limited": url + path,
        }
        base = start_base_ingest(tmp, env)
        if base is not None:
            targets["base-unauthenticated"] = base[1] + path
        for name, target in targets.items():  # warm-up: connection pools, caches
            wrk(target, 20, 2, tokens.get(name, ""))
        results: dict = {"base_ref": BASE_REF if base else None}
        for c in LEVELS:
            for name, target in targets.items():
                log(f"ingest: {name} at {c} concurrent for {DURATION}s")
                results.setdefault(str(c), {})[name] = wrk(target, c, DURATION, tokens.get(name, ""))
            r = results[str(c)]
            r["ratio"] = round(r["herald"]["rps"] / r["floor"]["rps"], 3) if r["floor"]["rps"] else None
        results["keys"] = [unlimited_key[0], limited_key[0]]
        return results
    finally:
        floor.terminate()
        floor.wait(10)
        if base is not None:
            base[0].terminate()
            base[0].wait(15)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base[2])], check=False)
        stop_services(services)


# --- phase 2: end to end ---------------------------------------------------------------------


class Sampler:
    """Peak RSS and CPU seconds of each process (and its children) while a phase runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.cpu_start = {name: self._cpu(p) for name, p in self.procs.items()}
        self.cpu_end: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    @staticmethod
    def _tree(p: psutil.Process) -> list[psutil.Process]:
        try:
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return [p]

    def _cpu(self, p: psutil.Process) -> float:
        total = 0.0
        for q in self._tree(p):
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _rss(self, p: psutil.Process) -> int:
        total = 0
        for q in self._tree(p):
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        return total

    async def _run(self) -> None:
        while True:
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], self._rss(p))
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> dict:
        if self._task:
            self._task.cancel()
        return {
            name: {
                "peak_rss_mb": round(self.peak[name] / 2**20, 1),
                "cpu_s": round(self._cpu(p) - self.cpu_start[name], 2),
            }
            for name, p in self.procs.items()
        }


async def post_all(
    url: str, n: int, token: str, concurrency: int = 64, extra: dict | None = None, body_of=None
) -> tuple[float, list[str], int]:
    """POST n distinct messages (``extra`` fields in each body, or ``body_of(i)``); returns (time
    of first POST, accepted ids, failures)."""
    ids: list[str] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    first = time.time()
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as session:

        async def worker() -> None:
            nonlocal failures
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = body_of(i) if body_of else {
                    "to": f"e2e-{i}@example.com", "subject": f"e2e {i}", "content": f"<p>message {i}</p>",
                    **(extra or {}),
                }  # fmt: skip
                for _ in range(3):
                    try:
                        async with session.post(url, json=body) as resp:
                            data = await resp.json()
                            if resp.status == 202:
                                ids.append(data["data"]["message_id"])
                                break
                    except aiohttp.ClientError:
                        pass
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return first, ids, failures


async def phase_e2e(tmp: Path, env: dict[str, str], backing: dict, sink_url: str) -> dict:
    services = start_services(env, tmp)
    pids = {name: s.process.pid for name, s in services.items()}
    pids.update({f"{k} (backing)": v.process.pid for k, v in backing.items()})
    sampler = Sampler(pids)
    sampler.start()
    pool = await asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=2)
    try:
        log(f"e2e: posting {N} messages")
        token = access.token_for(services["ingest"].url, *access.new_key(env, tier="unlimited", name="bench-e2e"))
        first, ids, failures = await post_all(services["ingest"].url + "/api/v1/messages/email/send", N, token)
        posted = time.time()
        log(f"e2e: {len(ids)} accepted in {posted - first:.1f}s ({failures} failed); waiting for delivery")
        last_count, last_change = -1, time.time()
        while True:
            sent = await pool.fetchval("SELECT count(*) FROM message_records WHERE state = 'sent'")
            if sent >= len(ids):
                break
            if sent != last_count:
                last_count, last_change = sent, time.time()
            elif time.time() - last_change > 60:
                log(f"e2e: stalled at {sent} sent for 60 s; giving up waiting")
                break
            await asyncio.sleep(0.5)
        resources = sampler.stop()
        row = await pool.fetchrow(
            """SELECT count(*) AS sent, max(sent_at) AS last_sent,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) AS p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) AS p99
               FROM message_records WHERE state = 'sent'"""
        )
        async with httpx.AsyncClient(timeout=30) as client:
            stats = (await client.get(f"{sink_url}/stats")).json()["smtp"]
        accepted = set(ids)
        received = set(stats["ids"])
        elapsed = row["last_sent"].timestamp() - first if row["last_sent"] else None
        return {
            "messages": N,
            "accepted": len(ids),
            "post_failures": failures,
            "ingest_seconds": round(posted - first, 2),
            "sent_records": row["sent"],
            "seconds": round(elapsed, 2) if elapsed else None,
            "rate_per_s": round(row["sent"] / elapsed, 1) if elapsed else None,
            "latency_p50_ms": round(row["p50"] * 1000, 1) if row["p50"] is not None else None,
            "latency_p99_ms": round(row["p99"] * 1000, 1) if row["p99"] is not None else None,
            "sink_received": stats["received"],
            "lost": len(accepted - received),
            "duplicated": stats["duplicates"],
            "unexpected": len(received - accepted),
            "resources": resources,
        }
    finally:
        await pool.close()
        stop_services(services)


# --- phase 5: scheduled burst ---------------------------------------------------------------


async def wait_sent(pool: asyncpg.Pool, n: int, where: str = "true", stall_s: float = 60) -> int:
    """Wait until ``n`` records matching ``where`` are 'sent' (or no progress for ``stall_s``)."""
    last_count, last_change = -1, time.time()
    while True:
        sent = await pool.fetchval(f"SELECT count(*) FROM message_records WHERE state = 'sent' AND {where}")
        if sent >= n:
            return sent
        if sent != last_count:
            last_count, last_change = sent, time.time()
        elif time.time() - last_change > stall_s:
            log(f"stalled at {sent} sent for {stall_s:.0f} s; giving up waiting")
            return sent
        await asyncio.sleep(0.5)


async def phase_scheduled(tmp: Path, env: dict[str, str]) -> dict:
    services = start_services(env, tmp)
    pool = await asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=2)
    try:
        token = access.token_for(services["ingest"].url, *access.new_key(env, tier="unlimited", name="bench-sched"))
        # Posting takes a few seconds; the instant is far enough ahead that all are waiting by then.
        due = datetime.now(UTC) + timedelta(seconds=max(10.0, SCHEDULED_N / 500))
        log(f"scheduled: posting {SCHEDULED_N} messages, all due at {due:%H:%M:%S.%f}")
        stamp = due.isoformat().replace("+00:00", "Z")
        _, ids, failures = await post_all(services["ingest"].url + "/api/v1/messages/email/send", SCHEDULED_N, token,
                                          extra={"scheduled_time": stamp, "dedup": False})  # fmt: skip
        posted_before_due = (due - datetime.now(UTC)).total_seconds()
        log(f"scheduled: {len(ids)} waiting ({failures} failed), {posted_before_due:.1f} s before their time")
        await wait_sent(pool, len(ids), "scheduled_at IS NOT NULL")
        row = await pool.fetchrow(
            """SELECT count(*) AS n,
                 percentile_cont(0.5) WITHIN GROUP (ORDER BY r) AS r50,
                 percentile_cont(0.99) WITHIN GROUP (ORDER BY r) AS r99, max(r) AS rmax, min(r) AS rmin,
                 percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS s50,
                 percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS s99,
                 max(sent_at) AS last_sent, min(sent_at) AS first_sent
               FROM (SELECT extract(epoch FROM t.executed_at - t.scheduled_time)::float8 AS r,
                            extract(epoch FROM m.sent_at - t.scheduled_time)::float8 AS s, m.sent_at
                     FROM scheduled_tasks t JOIN message_records m USING (message_id)
                     WHERE m.state = 'sent') AS late"""
        )
        span = row["last_sent"].timestamp() - due.timestamp() if row["last_sent"] else None
        return {
            "messages": SCHEDULED_N,
            "waiting_before_due": len(ids),
            "posted_s_before_due": round(posted_before_due, 1),
            "sent": row["n"],
            "sent_before_due": await pool.fetchval(
                "SELECT count(*) FROM message_records WHERE scheduled_at IS NOT NULL AND sent_at < scheduled_at"
            ),
            "release_late_p50_s": round(row["r50"], 3) if row["r50"] is not None else None,
            "release_late_p99_s": round(row["r99"], 3) if row["r99"] is not None else None,
            "release_late_max_s": round(row["rmax"], 3) if row["rmax"] is not None else None,
            "release_early_min_s": round(row["rmin"], 3) if row["rmin"] is not None else None,
            "sent_late_p50_s": round(row["s50"], 3) if row["s50"] is not None else None,
            "sent_late_p99_s": round(row["s99"], 3) if row["s99"] is not None else None,
            "burst_seconds": round(span, 2) if span else None,
            "burst_rate_per_s": round(row["n"] / span, 1) if span else None,
        }
    finally:
        await pool.close()
        stop_services(services)


# --- phase 6: the webhook channel through the pipeline ---------------------------------------


async def phase_webhook(tmp: Path, env: dict[str, str], sink_url: str) -> dict:
    """Signed webhooks (a configured ``webhook`` provider) to the sink Apprise posts to."""
    async with httpx.AsyncClient(timeout=30) as client:
        await client.post(f"{sink_url}/reset")
    services = start_services(env, tmp)
    pool = await asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=2)
    try:
        url = services["ingest"].url
        token = access.token_for(url, *access.new_key(env, tier="unlimited", name="bench-webhook"))
        # The sink counts deliveries by a top-level "title": the body template puts it there.
        config = {"url": f"{sink_url}/hook", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                  "body_template": {"title": "{{ title }}", "message_id": "{{ message_id }}", "body": "{{ content }}"}}
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
            r = await client.post(f"{url}/api/v1/providers", json={"channel": "webhook", "provider": "webhook",
                                                                   "name": "bench-sink", "config": config})
            r.raise_for_status()
        log(f"webhook: posting {WEBHOOK_N} messages")

        def body_of(i: int) -> dict:
            return {"channel": "webhook", "to": "bench-sink", "title": f"herald {i}", "content": f"message {i}"}

        first, ids, failures = await post_all(f"{url}/api/v1/messages/send", WEBHOOK_N, token, body_of=body_of)
        log(f"webhook: {len(ids)} accepted ({failures} failed); waiting for delivery")
        await wait_sent(pool, len(ids), "message_type = 'webhook'")
        row = await pool.fetchrow(
            """SELECT count(*) AS sent, max(sent_at) AS last_sent,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) AS p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) AS p99
               FROM message_records WHERE state = 'sent' AND message_type = 'webhook'"""
        )
        async with httpx.AsyncClient(timeout=30) as client:
            stats = (await client.get(f"{sink_url}/stats")).json()["webhook"]
        expected = {f"herald {i}" for i in range(WEBHOOK_N)}
        elapsed = row["last_sent"].timestamp() - first if row["last_sent"] else None
        return {
            "messages": WEBHOOK_N,
            "accepted": len(ids),
            "post_failures": failures,
            "sent_records": row["sent"],
            "seconds": round(elapsed, 2) if elapsed else None,
            "rate_per_s": round(row["sent"] / elapsed, 1) if elapsed else None,
            "latency_p50_ms": round(row["p50"] * 1000, 1) if row["p50"] is not None else None,
            "latency_p99_ms": round(row["p99"] * 1000, 1) if row["p99"] is not None else None,
            "sink_received": stats["received"],
            "lost": len(expected - set(stats["ids"])),
            "duplicated": stats["duplicates"],
        }
    finally:
        await pool.close()
        stop_services(services)


# --- phase 3: Apprise, straight to the webhook sink -----------------------------------------


def phase_apprise(sink_url: str) -> dict:
    import apprise

    httpx.post(f"{sink_url}/reset")
    target = sink_url.replace("http://", "json://") + "/hook"
    apobj = apprise.Apprise()
    apobj.add(target)
    failures = 0
    start = time.time()
    for i in range(N):
        if not apobj.notify(title=f"apprise {i}", body=f"message {i}"):
            failures += 1
    elapsed = time.time() - start
    stats = httpx.get(f"{sink_url}/stats", timeout=30).json()["webhook"]
    expected = {f"apprise {i}" for i in range(N)}
    return {
        "messages": N,
        "seconds": round(elapsed, 2),
        "rate_per_s": round(N / elapsed, 1),
        "failures": failures,
        "sink_received": stats["received"],
        "lost": len(expected - set(stats["ids"])),
        "duplicated": stats["duplicates"],
        "mode": "sequential apprise.notify() calls, json:// to the webhook sink",
    }


# --- phase 4: one sender process against the SMTP floor -------------------------------------


async def smtp_floor(port: int, n: int, connections: int) -> float:
    """emails/s of a bare aiosmtplib loop: prebuilt bytes, `connections` reused sessions."""
    import aiosmtplib

    from services.senders.email.mime import build_message
    from shared.events import DispatchV1

    data = build_message(
        DispatchV1(dispatch_id="m:1", message_id="msg_20260101_floor", tenant_id="default", channel="email",
                   to=["floor@example.com"], subject="floor", content="<p>floor</p>"),
        "bench@example.org", "Bench", "example.org",
    ).data  # fmt: skip
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            await client.sendmail("bench@example.org", ["floor@example.com"], data)
        await client.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return n / (time.perf_counter() - start)


async def phase_sender(tmp: Path, env: dict[str, str], sink_url: str, smtp_port: int) -> dict:
    """Dispatch commands published straight to notify.dispatch.email, drained by one sender
    process (no ingest, router or tracker running): emails/s per sender process."""
    from aiokafka import AIOKafkaProducer

    from shared.events import DispatchV1

    n = int(os.environ.get("BENCH_EMAIL_N", "10000"))
    async with httpx.AsyncClient(timeout=30) as client:
        await client.post(f"{sink_url}/reset")
    floor = await smtp_floor(smtp_port, n, 16)
    async with httpx.AsyncClient(timeout=30) as client:
        await client.post(f"{sink_url}/reset")
    producer = AIOKafkaProducer(bootstrap_servers=env["HERALD_KAFKA_BOOTSTRAP_SERVERS"], acks="all", linger_ms=20)
    await producer.start()
    for i in range(n):
        mid = f"msg_20260101_sender{i:09d}"
        d = DispatchV1(dispatch_id=f"{mid}:1", message_id=mid, tenant_id="default", channel="email",
                       to=[f"s{i}@example.com"], subject=f"sender {i}", content=f"<p>sender {i}</p>")  # fmt: skip
        await producer.send("notify.dispatch.email", d.to_bytes(), key=f"default:s{i}".encode())
    await producer.flush()
    await producer.stop()
    services = start_services(env, tmp, ["sender-email"])
    try:
        start = time.time()
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                stats = (await client.get(f"{sink_url}/stats")).json()["smtp"]
                if stats["unique"] >= n or time.time() - start > 600:
                    break
                await asyncio.sleep(0.25)
        # From the first delivery to the last: the consumer group join before it is start-up.
        elapsed = (stats["last"] - stats["first"]) if stats["first"] else 0
        rate = (stats["unique"] - 1) / elapsed if elapsed > 0 else None
    finally:
        stop_services(services)
    return {
        "emails": n,
        "delivered": stats["unique"],
        "duplicated": stats["duplicates"],
        "sender_rate_per_s": round(rate, 1) if rate else None,
        "smtp_floor_per_s": round(floor, 1),
        "ratio": round(rate / floor, 3) if rate else None,
        "note": "timed from the first delivery to the last; the group join before it is excluded",
    }


# --- orchestration ---------------------------------------------------------------------------


def summary(result: dict) -> str:
    lines = ["| measure | Herald | baseline | ratio |", "|---|---|---|---|"]
    for c, r in result["ingest"].items():
        if not c.isdigit():  # base_ref, access_cost
            continue
        h, f = r["herald"], r["floor"]
        lines.append(f"| ingest req/s at {c} concurrent | {h['rps']} | floor {f['rps']} | {r['ratio']} |")
        lines.append(
            f"| ingest p50/p95/p99 ms at {c} | {h['p50_ms']:.1f} / {h['p95_ms']:.1f} / {h['p99_ms']:.1f} "
            f"| floor {f['p50_ms']:.1f} / {f['p95_ms']:.1f} / {f['p99_ms']:.1f} | |"
        )
        lines.append(f"| ingest errors at {c} | {h['error_count']} | floor {f['error_count']} | |")
        if "herald-limited" in r:
            lim = r["herald-limited"]
            lines.append(f"| ingest req/s at {c}, rate-limited key | {lim['rps']} | floor {f['rps']} "
                         f"| {round(lim['rps'] / f['rps'], 3) if f['rps'] else None} |")  # fmt: skip
        if "base-unauthenticated" in r:
            b = r["base-unauthenticated"]
            lines.append(f"| ingest req/s at {c}, {result['ingest']['base_ref']} (no auth) | {b['rps']} "
                         f"| floor {f['rps']} | {round(b['rps'] / f['rps'], 3) if f['rps'] else None} |")  # fmt: skip
    cost = result["ingest"].get("access_cost")
    if cost:
        lines.append(f"| server time of a cached token check / first check of a token / rate-limit count (µs) "
                     f"| {cost['cached_token_check_us']} / {cost['first_check_of_a_token_us']} / "
                     f"{cost['rate_limit_count_us']} | | |")  # fmt: skip
    e, a = result["e2e"], result["apprise"]
    ratio = round(e["rate_per_s"] / a["rate_per_s"], 2) if e.get("rate_per_s") and a["rate_per_s"] else None
    lines.append(
        f"| end to end messages/s (N={e['messages']}) | {e['rate_per_s']} "
        f"| Apprise direct {a['rate_per_s']} | {ratio} |"
    )
    lines.append(f"| sent_at - accepted_at p50 / p99 ms | {e['latency_p50_ms']} / {e['latency_p99_ms']} | | |")
    lines.append(
        f"| lost / duplicated at the sink | {e['lost']} / {e['duplicated']} "
        f"| Apprise {a['lost']} / {a['duplicated']} | |"
    )
    w = result.get("webhook")
    if w:
        ratio = round(w["rate_per_s"] / a["rate_per_s"], 2) if w.get("rate_per_s") and a["rate_per_s"] else None
        lines.append(f"| webhook channel end to end messages/s (N={w['messages']}, signed, through the pipeline) "
                     f"| {w['rate_per_s']} | Apprise direct {a['rate_per_s']} | {ratio} |")  # fmt: skip
        lines.append(f"| webhook: sent_at - accepted_at p50 / p99 ms; lost / duplicated at the sink "
                     f"| {w['latency_p50_ms']} / {w['latency_p99_ms']}; {w['lost']} / {w['duplicated']} "
                     "| | |")  # fmt: skip
    s = result.get("sender")
    if s:
        lines.append(
            f"| emails/s of one sender process (N={s['emails']}) | {s['sender_rate_per_s']} "
            f"| aiosmtplib loop {s['smtp_floor_per_s']} | {s['ratio']} |"
        )
    d = result.get("scheduled")
    if d:
        ratio = (
            round(d["burst_rate_per_s"] / e["rate_per_s"], 2)
            if d.get("burst_rate_per_s") and e.get("rate_per_s")
            else None
        )
        lines.append(f"| scheduled burst (N={d['messages']} due at one instant) messages/s from the instant "
                     f"| {d['burst_rate_per_s']} | sent at once (phase 2) {e['rate_per_s']} | {ratio} |")  # fmt: skip
        lines.append(f"| scheduled: released late p50 / p99 / max s | {d['release_late_p50_s']} / "
                     f"{d['release_late_p99_s']} / {d['release_late_max_s']} | | |")  # fmt: skip
        lines.append(f"| scheduled: sent late p50 / p99 s; sent before their time | {d['sent_late_p50_s']} / "
                     f"{d['sent_late_p99_s']}; {d['sent_before_due']} | | |")  # fmt: skip
    r = result.get("routing")
    if r:
        lines.append(f"| router decisions/s, an SMS ranked among 3 providers by cost and quality (N={r['records']}) "
                     f"| {r['ranked_per_s']} | unranked {r['baseline_per_s']} | {r['ranked_ratio']} |")  # fmt: skip
        lines.append(f"| router decisions/s, a user's message by rule: Feishu then SMS, both ranked "
                     f"| {r['rule_chain_per_s']} | unranked SMS {r['baseline_per_s']} "
                     f"| {r['rule_chain_ratio']} |")  # fmt: skip
    f = result.get("fold")
    if f:
        lines.append(f"| tracker fold events/s with the statistics' rollups (N={f['events']}) "
                     f"| {f['with_rollups_per_s']} | without {f['baseline_per_s']} | {f['ratio']} |")  # fmt: skip
    lines.append("")
    lines.append("| process (end-to-end phase) | peak RSS MB | CPU s |")
    lines.append("|---|---|---|")
    for name, r in e["resources"].items():
        lines.append(f"| {name} | {r['peak_rss_mb']} | {r['cpu_s']} |")
    return "\n".join(lines)


async def run() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    os.chmod(tmp, 0o755)
    kafka_port = servers.free_port()
    backing = {
        "tansu": servers.start_tansu(kafka_port, tmp / "tansu.log"),
        "postgres": servers.start_postgres(tmp / "pg", servers.free_port()),
        "redis": servers.start_redis(servers.free_port()),
    }
    smtp_port, sink_port = servers.free_port(), servers.free_port()
    sink = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "bench.sinks", "--smtp-port", str(smtp_port), "--http-port", str(sink_port)],
        cwd=ROOT,
    )
    sink_url = f"http://127.0.0.1:{sink_port}"
    servers.wait_for_port(sink_port, 30, sink)
    servers.wait_for_port(smtp_port, 30, sink)
    env = {
        "HERALD_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "HERALD_DATABASE_URL": backing["postgres"].extra["dsn"],
        "HERALD_REDIS_URL": f"redis://127.0.0.1:{backing['redis'].port}/0",
        "HERALD_SMTP_HOST": "127.0.0.1",
        "HERALD_SMTP_PORT": str(smtp_port),
        "HERALD_SMTP_FROM_ADDRESS": "bench@example.org",
        "HERALD_SMTP_TLS_MODE": "none",
        "HERALD_SMTP_DAILY_LIMIT": "100000000",
        "HERALD_ENCRYPTION_KEY": "YmVuY2gta2V5LWZvci1oZXJhbGQtMzItYnl0ZXMhISE=",
        "HERALD_DATA_DIR": str(tmp / "data"),
        "HERALD_LOG_LEVEL": "WARNING",
        "HERALD_RATE_LIMIT_TIERS": '{"unlimited": "", "limited": "100000000/minute"}',
        "HERALD_OUTBOUND_ALLOW": "127.0.0.1/32",  # the webhook sink of phase 6
    }
    result: dict = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"n": N, "duration_s": DURATION, "levels": LEVELS},
    }
    try:
        if ROUTING_N:
            log(f"routing: the router's decision for {ROUTING_N} records, with and without smart routing")
            result["routing"] = phase_routing()
        if FOLD_N:
            log(f"fold: {FOLD_N} events folded by the tracker, with and without the statistics' rollups")
            result["fold"] = await asyncio.to_thread(phase_fold, FOLD_N, backing["postgres"].extra["dsn"])
        result["ingest"] = phase_ingest(tmp, env)
        log("access: server time of token checks and rate-limit counts")
        result["ingest"]["access_cost"] = await auth_cost(env, *result["ingest"].pop("keys"))
        # A fresh broker and empty tables: the ingest phase's backlog is not the e2e run's.
        backing["tansu"].stop()
        backing["tansu"] = servers.start_tansu(kafka_port, tmp / "tansu.log")
        async with asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=1) as pool:
            await pool.execute("TRUNCATE message_records, message_events, dead_letters")
        result["e2e"] = await phase_e2e(tmp, env, backing, sink_url)
        log(f"apprise: {N} messages")
        result["apprise"] = phase_apprise(sink_url)
        if WEBHOOK_N:
            backing["tansu"].stop()
            backing["tansu"] = servers.start_tansu(kafka_port, tmp / "tansu.log")
            result["webhook"] = await phase_webhook(tmp, env, sink_url)
        log("sender: one sender process vs a bare aiosmtplib loop")
        result["sender"] = await phase_sender(tmp, env, sink_url, smtp_port)
        if SCHEDULED_N:
            backing["tansu"].stop()
            backing["tansu"] = servers.start_tansu(kafka_port, tmp / "tansu.log")
            async with asyncpg.create_pool(env["HERALD_DATABASE_URL"], min_size=1, max_size=1) as pool:
                await pool.execute("TRUNCATE message_records, message_events, dead_letters, scheduled_tasks")
            result["scheduled"] = await phase_scheduled(tmp, env)
    finally:
        sink.terminate()
        sink.wait(10)
        for server in backing.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (make bench installs it)")
    result = asyncio.run(run())
    table = summary(result)
    result["summary"] = table
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {RESULTS / f'bench-{stamp}.json'}")


if __name__ == "__main__":
    main()
