"""A message recorded as accepted but lost by the broker is published again by the sweeper.
The services sweep every second for messages stalled 5 s (tests/conftest.py)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from services.ingest.sweeper import attempt_to_dispatch
from shared.events import Channel, RequestV1
from tests.conftest import Pipeline
from tests.e2e.helpers import by_message_id, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]


def test_which_attempt_a_stalled_message_gets() -> None:
    assert attempt_to_dispatch("accepted", 0) == 1
    assert attempt_to_dispatch("routed", 0) == 1
    assert attempt_to_dispatch("sending", 2) == 2  # same attempt: its outcome may exist
    assert attempt_to_dispatch("retrying", 2) == 3  # its delay record was lost


async def test_an_accepted_message_the_broker_lost_is_published_again(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # A record exactly as ingest writes it, whose request never reached the broker.
    now = datetime.now(UTC) - timedelta(seconds=30)
    message_id = f"msg_{now:%Y%m%d}_{uuid.uuid4().hex[:16]}"
    request = RequestV1(
        message_id=message_id, channel=Channel.EMAIL, to=["lost@example.com"], subject="lost by the broker",
        content="<p>found again</p>", accepted_at=now, recorded=True,
    )  # fmt: skip
    await db.execute(
        """INSERT INTO message_records (message_id, tenant_id, message_type, recipient, recipients, subject, content,
               content_type, status, state, request, created_at, updated_at)
           VALUES ($1, 'default', 'email', 'lost@example.com', '{"to": ["lost@example.com"]}', 'lost by the broker',
               '<p>found again</p>', 'html', 'pending', 'accepted', $2::jsonb, $3, $3)""",
        message_id, request.to_bytes().decode(), now,
    )  # fmt: skip
    started = time.monotonic()
    await wait_for_mail(pipeline, by_message_id(message_id), timeout=30)
    record = await wait_for_state(client, message_id, "sent")
    assert record["attempt"] == 1
    assert await db.fetchval("SELECT republished FROM message_records WHERE message_id=$1", message_id) >= 1
    assert sum(1 for m in pipeline.backing.smtp.messages if m.parsed()["X-Herald-Message-ID"] == message_id) == 1
    print(f"sweeper: lost message delivered {time.monotonic() - started:.1f} s later")
