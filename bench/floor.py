"""The floor of the ingest benchmark: the least an HTTP-to-Kafka endpoint can do. It validates
the same body model as Herald's ingest and awaits an acks=all send to the same broker; no
database, no Redis, no envelope, no middleware.

``python -m bench.floor --port P`` (broker from ``HERALD_KAFKA_BOOTSTRAP_SERVERS``).
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import orjson
import uvicorn
from fastapi import FastAPI, Response

from services.ingest.routes.messages import EmailSendRequest
from shared.kafka import ensure_topics, make_producer
from shared.settings import Settings

TOPIC = "bench.floor"


def create_app(settings: Settings) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await ensure_topics(settings, [TOPIC])
        producer = make_producer(settings)
        await producer.start()
        state["producer"] = producer
        yield
        await producer.stop()

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/v1/messages/email/send", status_code=202)
    async def send(body: EmailSendRequest) -> Response:
        await state["producer"].send_and_wait(TOPIC, body.model_dump_json().encode(), key=b"k")
        return Response(orjson.dumps({"ok": True}), status_code=202, media_type="application/json")

    @app.get("/health/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings(service_name="floor")
    uvicorn.run(create_app(settings), host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
