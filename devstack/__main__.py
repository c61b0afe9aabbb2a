"""``python -m devstack <server>``: run one embedded server in the foreground (for the Procfile).

Servers: broker, postgres, redis, smtp-sink, banner. Data lives under ``$HERALD_DATA_DIR``
(default ``.data``). Ports come from the same ``HERALD_*`` variables the services read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from devstack import servers, sinks


def _port(url_var: str, default: int) -> int:
    value = os.environ.get(url_var)
    if not value:
        return default
    parsed = urlparse(value if "://" in value else f"tcp://{value.split(',')[0]}")
    return parsed.port or default


def _require_free(port: int, what: str) -> None:
    """Fail loudly when something else (often a previous run) still holds the port."""
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"[{what}] port {port} is already in use: is another `make run` still running?")


def _wait_forever(server: servers.Server | None = None) -> None:
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.is_set():
        if server is not None and server.process.poll() is not None:
            sys.exit(f"{server.name} exited with {server.process.returncode}")
        stop.wait(0.5)
    if server is not None:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    parser.add_argument("server", choices=["broker", "postgres", "redis", "smtp-sink", "webhook-sink", "banner"])
    args = parser.parse_args()
    data = Path(os.environ.get("HERALD_DATA_DIR", ".data")).resolve()

    if args.server == "broker":
        port = _port("HERALD_KAFKA_BOOTSTRAP_SERVERS", 9092)
        _require_free(port, "broker")
        server = servers.start_tansu(port, data / "tansu.log" if data.exists() else None)
        print(f"[broker] Tansu (Kafka protocol) on 127.0.0.1:{port}, memory storage", flush=True)
        _wait_forever(server)
    elif args.server == "postgres":
        port = _port("HERALD_DATABASE_URL", 5433)
        _require_free(port, "postgres")
        server = servers.start_postgres(data / "postgres", port)
        print(f"[postgres] PostgreSQL on 127.0.0.1:{port}, data in {data / 'postgres'}", flush=True)
        _wait_forever(server)
    elif args.server == "redis":
        port = _port("HERALD_REDIS_URL", 6380)
        _require_free(port, "redis")
        server = servers.start_redis(port, data / "redis")
        print(f"[redis] Redis on 127.0.0.1:{port}", flush=True)
        _wait_forever(server)
    elif args.server == "smtp-sink":
        port = int(os.environ.get("HERALD_SMTP_PORT", "1025"))
        _require_free(port, "smtp-sink")
        controller, _ = sinks.start_smtp_sink(port, data / "mail", echo=True)
        print(f"[smtp-sink] SMTP sink on 127.0.0.1:{port}, messages saved in {data / 'mail'}", flush=True)
        try:
            _wait_forever()
        finally:
            controller.stop()
    elif args.server == "webhook-sink":
        port = int(os.environ.get("HERALD_WEBHOOK_SINK_PORT", "8025"))
        _require_free(port, "webhook-sink")
        print(f"[webhook-sink] on http://127.0.0.1:{port}/, requests saved in {data / 'webhooks'}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sinks.run_webhook_sink(port, data / "webhooks")
    else:
        _banner()


def _banner() -> None:
    host = os.environ.get("HERALD_INGEST_HOST", "127.0.0.1")
    port = int(os.environ.get("HERALD_INGEST_PORT", "8000"))
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        print("[banner] ingest did not become ready in 180 s; see the logs above", flush=True)
    print(
        f"""
==========================================================================
 Herald is running.
   API docs:   {base}/docs
   Health:     {base}/health/ready
   Every API call needs a token. Create the first admin key (its secret is shown once):

   make admin-key        # = .venv/bin/python -m services.admin create-key --tenant default

   Exchange it for a token (valid 1 h) and send a first email (it lands in the SMTP sink,
   printed here and saved in .data/mail):

   TOKEN=$(curl -s -X POST {base}/api/v1/auth/token -H 'Content-Type: application/json' \\
        -d '{{"api_key": "noti_...", "api_secret": "..."}}' \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["access_token"])')
   curl -s -X POST {base}/api/v1/messages/email/send -H "Authorization: Bearer $TOKEN" \\
        -H 'Content-Type: application/json' \\
        -d '{{"to": "alice@example.com", "subject": "Hello from Herald", "content": "<h1>It works</h1>"}}'

   Then: curl -s -H "Authorization: Bearer $TOKEN" {base}/api/v1/messages/<message_id>

   Other channels (SMS, bots, push, webhooks): configure a provider, e.g. a signed webhook to the
   local webhook sink (it prints what it receives, saved in .data/webhooks):

   curl -s -X POST {base}/api/v1/providers -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
        -d '{{"channel": "webhook", "provider": "webhook", "name": "sink", "config":
             {{"url": "http://127.0.0.1:8025/hooks", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}}}'
   curl -s -X POST {base}/api/v1/messages/send -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
        -d '{{"channel": "webhook", "to": "sink", "content": "Hello from Herald"}}'
   Every channel and provider: {base}/api/v1/providers/catalogue
 Ctrl-C stops everything.
==========================================================================
""",
        flush=True,
    )
    _wait_forever()


if __name__ == "__main__":
    main()
