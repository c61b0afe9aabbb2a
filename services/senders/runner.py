"""The sender loop of one channel: consume → claim → provider.send → record the outcome →
publish it → commit.

Each dispatch's progress is kept in Redis under ``herald:done:<dispatch_id>``:

``claim:<owner>``
    set (only if absent) before delivering. A second copy of the command (a router replay, a
    rebalance that hands the partition to another sender while the first still works on it)
    finds the claim of a live owner and waits for its outcome instead of sending again. The
    claim of a dead owner (``kill -9``: its ``herald:sender:alive:<owner>`` key lapsed) is
    taken over and the dispatch delivered.
``handed:<owner>``
    written in the same event-loop step as the message leaves for the provider (SMTP: the
    content and its final dot; :mod:`services.senders.ledger`), so a crash leaves both or
    neither. A dead owner's handed dispatch is **not sent again**: the provider has the
    message and only its answer was never read; it is recorded as ``sent`` with
    ``unconfirmed: true`` (wrong only if the provider refused the message in that very
    moment). A dead owner's mere claim is delivered again: nothing had left.
``done:<records>``
    the outcome, written as soon as the provider answers and before anything is published,
    with the records it produces (events, retry, dead letter). A command redelivered after a
    crash publishes those again (ids are deterministic, consumers dedup) and sends nothing.
``1:<state>``
    the same once the offset is committed: the records are on the broker, only the outcome's
    state is kept (7 days). A command redelivered later (a router replay, the sweeper) sends
    nothing and publishes that state's event again. (``1``: the same, written by older
    versions.)

The offset is committed once the records of every dispatch before it are on the broker.
Without Redis none of this can be known and the sender delivers anyway (at least once beats
dropping); the same when a message did not leave in one write (larger than the socket's
buffer): no hand-off is marked and a crash before the outcome means a second send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.senders import registry
from services.senders.base import Deferred, DeliveryError, Permanent, Provider, Retryable, Unavailable
from services.senders.ledger import Ledger
from shared.errors import field_errors
from shared.events import DeadLetterV1, DispatchV1, EventV1, ProviderHealthV1, State, event_id, utcnow
from shared.health import HealthServer
from shared.ids import new_request_id
from shared.kafka import (
    Topics,
    Trace,
    ensure_topics,
    keep_topics,
    make_consumer,
    make_producer,
    message_key,
    stop_quietly,
)
from shared.logging import log_event, request_id_var, traceparent_var
from shared.metrics import (
    CONSUMER_LAST_PROGRESS,
    MESSAGES_REJECTED,
    MESSAGES_SENT,
    RETRIES_SCHEDULED,
    SEND_DURATION,
)
from shared.redis_scripts import RELEASE_IF_OWNER
from shared.settings import Settings

log = logging.getLogger("herald.sender")

# SIGTERM: deliveries already talking to the provider get this long to finish (a rolling
# update must not cut an SMTP transaction in half); the ones not started are left to the next
# owner of the partition. Keeps the whole shutdown well inside Kubernetes' 30 s and our 10 s.
_STOP_GRACE_S = 5.0
# A claim outlives any one delivery (3 mailboxes x the SMTP timeout); it only guards against
# a live owner, so its expiry is garbage collection, not a decision.
_CLAIM_TTL_S = 600
# Every sender says it is alive under herald:sender:alive:<owner>; a claim whose owner has not
# said so for this long belongs to a dead process (kill -9, OOM, lost node).
_ALIVE_TTL_S = 5
_ALIVE_EVERY_S = 1.0
# Waits while the sender's own database is down (first, longest), and polls while a live
# owner finishes a dispatch.
_UNAVAILABLE_WAIT_S = (0.5, 5.0)
_OWNER_POLL_S = 0.25

_CLAIM = b"claim:"
_HANDED = b"handed:"
_DONE = b"done:"
_COMPACT = b"1:"  # + the outcome's state: done, and its records are known to be on the broker
_STATES = frozenset(s.value for s in State)

# Replace a claim only if it is still the one we read (a dead owner's).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
end
return 0
"""


@dataclass(slots=True)
class _Out:
    """One record to publish (kept as text so an outcome can be stored and published again)."""

    topic: str
    key: str | None
    value: str
    headers: list[tuple[str, str]]

    @classmethod
    def of(cls, topic: str, key: bytes | None, value: bytes, headers: list) -> _Out:
        return cls(topic, key.decode() if key else None, value.decode(), [(k, v.decode()) for k, v in headers])


@dataclass(slots=True)
class _Result:
    """What handling one record left to do: futures of its published records, the dispatch
    whose outcome was recorded (to compact after the commit), whether it was abandoned."""

    futures: list[asyncio.Future] = field(default_factory=list)
    recorded: tuple[str, str] | None = None  # (dispatch id, state of its outcome)
    abandoned: bool = False


@dataclass(slots=True)
class _Claim:
    go: bool = False  # deliver it (the claim is ours)
    outputs: list[_Out] | None = None  # already done: publish these again
    state: str | None = None  # already done, records compacted: its outcome's state
    abandoned: bool = False  # stopping while waiting for another owner
    handed_by: str | None = None  # a dead owner handed it to the provider: do not send again


class SenderRunner:
    """Consumes ``notify.dispatch.<channel>`` and delivers through the channel's provider."""

    def __init__(
        self,
        settings: Settings,
        channel: str,
        provider: Provider,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        redis: Redis,
        ledger: Ledger,
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.provider = provider
        self.consumer = consumer
        self.producer = producer
        self.redis = redis
        self.ledger = ledger
        self.service = f"sender-{channel}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._owner = self.owner.encode()
        self._slots = asyncio.Semaphore(settings.sender_concurrency)
        self._stopping = asyncio.Event()
        self._delivering: set[str] = set()
        self._take_over = redis.register_script(_TAKE_OVER)
        self._release_claim = redis.register_script(RELEASE_IF_OWNER)  # a claim only if still ours

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        alive = asyncio.create_task(self._say_alive())
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.kafka_max_batch)
                if not batches:
                    continue
                work = asyncio.ensure_future(
                    asyncio.gather(*(self._partition(tp, records) for tp, records in batches.items()))
                )
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    # Stopping mid-batch: records not started are abandoned (not committed,
                    # so the next owner delivers them); those in flight get a grace period.
                    finished, _ = await asyncio.wait({work}, timeout=_STOP_GRACE_S)
                    if not finished:
                        log.warning("deliveries still in flight after %.0fs; stopping anyway", _STOP_GRACE_S)
                        work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    return
                work.result()
        finally:
            stop.cancel()
            alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await alive
            with contextlib.suppress(RedisError):  # our claims are free to take at once
                await self.redis.delete(self._alive_key(self.owner))

    def stop(self) -> None:
        self._stopping.set()

    async def _say_alive(self) -> None:
        while True:
            try:
                await self.redis.set(self._alive_key(self.owner), b"1", ex=_ALIVE_TTL_S)
            except RedisError:
                pass  # claims are not taken without Redis either
            await asyncio.sleep(_ALIVE_EVERY_S)

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        # Records of one partition are delivered concurrently (bounded). A dispatch repeated
        # within the batch (a router replay) is handled once, by its first copy. The offset
        # committed is the one after the last record before the first abandoned one, once the
        # records every dispatch produced are on the broker.
        parsed = [_parse(r) for r in records]
        seen: set[str] = set()
        firsts = []
        for d in parsed:
            first = not isinstance(d, DispatchV1) or d.dispatch_id not in seen
            if isinstance(d, DispatchV1):
                seen.add(d.dispatch_id)
            firsts.append(first)
        results = await asyncio.gather(
            *(self._one(r, d, f) for r, d, f in zip(records, parsed, firsts, strict=True)), return_exceptions=True
        )
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        try:
            if failed is not None:
                raise failed
            await asyncio.gather(*(f for r in results for f in r.futures))  # type: ignore[union-attr]
            commit_to = next(
                (rec.offset for rec, r in zip(records, results, strict=True) if r.abandoned),  # type: ignore[union-attr]
                records[-1].offset + 1,
            )
            if commit_to > records[0].offset:
                await self.consumer.commit({tp: commit_to})
        except KafkaError as exc:
            # The broker did not take the outputs or the commit (down, or the partition moved
            # to another sender). Read the batch again: dispatches already recorded are not
            # sent again, their records are only published again.
            log.warning("batch of %s not committed (%s); reading it again", tp, exc.__class__.__name__)
            self._rewind(tp, records[0].offset)
            return
        await self._compact([r.recorded for r in results if r.recorded])  # type: ignore[union-attr]
        CONSUMER_LAST_PROGRESS.labels(self.service).set(time.time())

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)

    async def _one(self, record: ConsumerRecord, parsed: DispatchV1 | list[dict], first: bool) -> _Result:
        """Handle one record. Kafka errors propagate (the batch is read again); any other
        failure dead-letters the record, so one bad record never stops the channel."""
        trace = Trace.from_headers(record.headers)
        rid = request_id_var.set(trace.request_id or new_request_id())
        tp = traceparent_var.set(trace.traceparent)
        try:
            if not isinstance(parsed, DispatchV1):
                return _Result([await self._dead_letter(record, trace, "invalid_dispatch", parsed, None)])
            if not first:
                log_event(
                    log,
                    logging.INFO,
                    "dispatch repeated within the batch; handled once",
                    message_id=parsed.message_id,
                    dispatch_id=parsed.dispatch_id,
                )
                return _Result()
            if self._stopping.is_set():
                return _Result(abandoned=True)
            async with self._slots:
                if self._stopping.is_set():
                    return _Result(abandoned=True)
                return await self._handle(parsed, trace)
        except KafkaError:
            raise
        except Exception as exc:
            log.exception("unexpected failure; sending the record to the dead-letter topic")
            errors = [{"field": "body", "message": str(exc)[:200]}]
            if not isinstance(parsed, DispatchV1):
                return _Result([await self._dead_letter(record, trace, "sender_error", errors, None)])
            # The message ends 'failed' naming the error (not 'sending' for ever); replaying the
            # dead letter delivers it again.
            event = self._event(parsed, State.FAILED, error_code=5000, error=f"sender error: {str(exc)[:200]}",
                                detail={"dead_letter": "sender_error"})  # fmt: skip
            futures = await self._publish(
                [_Out.of(Topics.EVENTS, parsed.message_id.encode(), event.to_bytes(), trace.headers())]
            )
            letter = await self._dead_letter(record, trace, "sender_error", errors, parsed.message_id)
            return _Result([*futures, letter])
        finally:
            request_id_var.reset(rid)
            traceparent_var.reset(tp)

    async def _handle(self, dispatch: DispatchV1, trace: Trace) -> _Result:
        """Claim, deliver, record, publish."""
        claim = await self._claim(dispatch.dispatch_id)
        if claim.abandoned:
            return _Result(abandoned=True)
        if claim.outputs is not None:
            log_event(
                log,
                logging.INFO,
                "dispatch already completed; its outcome is published again, nothing is sent",
                message_id=dispatch.message_id,
                dispatch_id=dispatch.dispatch_id,
            )
            outputs = claim.outputs
            if not outputs and claim.state in _STATES:
                # Compacted: only the outcome's state is left. Its event again (same id), so a
                # tracker that lost it (a broker that lost its data) still learns the outcome.
                event = self._event(dispatch, State(claim.state), detail={"replayed": True})
                outputs = [_Out.of(Topics.EVENTS, event.message_id.encode(), event.to_bytes(), trace.headers())]
            return _Result(await self._publish(outputs))
        self._delivering.add(dispatch.dispatch_id)
        try:
            headers = trace.headers()
            sending = _Out.of(
                Topics.EVENTS, dispatch.message_id.encode(), self._event(dispatch, State.SENDING).to_bytes(), headers
            )
            futures = await self._publish([sending])
            if claim.handed_by is not None:
                outcome = [self._unconfirmed(dispatch, claim.handed_by, headers)]
            else:
                delivered = await self._deliver(dispatch, trace)
                if delivered is None:  # stopping while the provider could not even start
                    await self._release(dispatch.dispatch_id)
                    return _Result(futures, abandoned=True)
                outcome = delivered
            await self._record(dispatch.dispatch_id, [sending, *outcome])
            futures.extend(await self._publish(outcome))
            return _Result(futures, recorded=(dispatch.dispatch_id, _outcome_state(outcome)))
        finally:
            self._delivering.discard(dispatch.dispatch_id)

    def _unconfirmed(self, dispatch: DispatchV1, owner: str, headers: list) -> _Out:
        """The outcome of a dispatch whose sender died between handing it to the provider and
        reading the answer: counted as sent, never sent a second time."""
        log_event(
            log,
            logging.WARNING,
            "sender died after handing the message to the provider; recorded as sent, not sent again",
            message_id=dispatch.message_id,
            dispatch_id=dispatch.dispatch_id,
            previous_owner=owner,
        )
        MESSAGES_SENT.labels(self.channel, "unconfirmed", getattr(self.provider, "name", "unknown")).inc()
        event = self._event(
            dispatch,
            State.SENT,
            detail={
                "unconfirmed": True,
                "reason": "the sender stopped after handing the message over, before the provider's answer",
            },
        )
        return _Out.of(Topics.EVENTS, event.message_id.encode(), event.to_bytes(), headers)

    async def _deliver(self, dispatch: DispatchV1, trace: Trace) -> list[_Out] | None:
        """One attempt through the provider; answers the records it produces (None when the
        sender is stopping while its own dependencies are down and nothing was attempted)."""
        headers = trace.headers()
        provider_name = getattr(self.provider, "name", "unknown")
        wait = _UNAVAILABLE_WAIT_S[0]
        marks: list[asyncio.Future[bool]] = []
        write_mark = self.ledger.prepare(self._done_key(dispatch.dispatch_id), _HANDED + self._owner, _CLAIM_TTL_S)

        def handoff() -> None:
            # Synchronous, built beforehand: the mark leaves right after the message.
            mark = write_mark()
            if mark is not None:
                marks.append(mark)

        while True:
            started = time.perf_counter()
            try:
                result = await self.provider.send(dispatch, handoff)
                await _settled(marks)
                break
            except Unavailable as exc:
                # The sender's own dependency (its database) is down: no attempt was made and
                # the dispatch is not at fault. Wait and try the same one again; nothing is
                # committed meanwhile, so the partition waits too (back-pressure, no loss).
                if marks:  # an earlier mailbox of this attempt failed after its hand-off
                    await _settled(marks)
                    marks.clear()
                    await self._reclaim(dispatch.dispatch_id)
                if self._stopping.is_set():
                    return None
                log_event(
                    log,
                    logging.WARNING,
                    "sender dependency unavailable; waiting",
                    message_id=dispatch.message_id,
                    retry_in_s=wait,
                    error=str(exc)[:200],
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                wait = min(wait * 2, _UNAVAILABLE_WAIT_S[1])
            except DeliveryError as exc:
                await _settled(marks)
                elapsed = time.perf_counter() - started
                SEND_DURATION.labels(self.channel, exc.provider or provider_name).observe(elapsed)
                outcome = "deferred" if isinstance(exc, Deferred) else "failed"
                MESSAGES_SENT.labels(self.channel, outcome, exc.provider or provider_name).inc()
                return self._failure(dispatch, exc, elapsed, headers)
        elapsed = time.perf_counter() - started
        provider_name = result.provider or provider_name
        SEND_DURATION.labels(self.channel, provider_name).observe(elapsed)
        MESSAGES_SENT.labels(self.channel, "success", provider_name).inc()
        detail = {
            **result.detail,
            "provider_message_id": result.provider_message_id,
            "duration_ms": round(elapsed * 1000, 1),
        }
        log_event(
            log,
            logging.INFO,
            "message sent",
            message_id=dispatch.message_id,
            recipient=dispatch.to[0],
            duration_ms=round(elapsed * 1000, 1),
        )
        event = self._event(dispatch, State.SENT, detail=detail, provider=provider_name)
        return [*self._failovers(dispatch, result.tries, headers),
                _Out.of(Topics.EVENTS, event.message_id.encode(), event.to_bytes(), headers)]  # fmt: skip

    def _failovers(self, dispatch: DispatchV1, tries: list[dict[str, Any]], headers: list) -> list[_Out]:
        """A 'retrying' event for each provider that failed before the next was tried within this
        attempt (its own id: the timeline keeps every try; the tracker counts it against the
        provider's quality unless it was a rate-limit wait)."""
        outs = []
        for n, tried in enumerate(tries, 1):
            detail = {**tried["detail"], "failover": True, "try": n}
            if tried["deferred"]:
                detail["deferred"] = True
            event = self._event(dispatch, State.RETRYING, provider=tried["provider"], error_code=tried["error_code"],
                                error=tried["error"], detail=detail)  # fmt: skip
            event = event.model_copy(update={"event_id": f"{event.event_id}.try{n}"})
            outs.append(_Out.of(Topics.EVENTS, event.message_id.encode(), event.to_bytes(), headers))
        if tries:
            log_event(log, logging.WARNING, "providers failed over within one attempt", message_id=dispatch.message_id,
                      attempt=dispatch.attempt, failed=[t["detail"].get("provider_name") for t in tries])  # fmt: skip
        return outs

    def _deferral(self, dispatch: DispatchV1, exc: Deferred, headers: list) -> list[_Out]:
        """The same attempt again after ``exc.retry_after`` (a rate limit's wait), through the
        shortest retry tier that covers it (a record due before the tier's delay never holds up
        the tier's partition; a longer wait comes back at the tier's delay and waits again),
        spread by up to 10 % so a backlog does not come back at once."""
        delays = self.settings.retry_delays[: len(Topics.RETRY)]
        tier = next((i for i, d in enumerate(delays) if d >= exc.retry_after), len(delays) - 1)
        wait = min(delays[tier], (exc.retry_after or 0) * random.uniform(1.0, 1.1))
        due = utcnow() + timedelta(seconds=wait)
        n = dispatch.deferrals + 1
        later = dispatch.model_copy(update={"dispatch_id": f"{dispatch.message_id}:{dispatch.attempt}.{n}",
                                            "deferrals": n, "not_before": due, "last_error": exc.message})  # fmt: skip
        topic = Topics.RETRY[tier]
        log_event(log, logging.INFO, "provider rate limit: dispatch deferred", message_id=dispatch.message_id,
                  wait_s=round(wait, 1), deferrals=n)  # fmt: skip
        event = self._event(
            dispatch,
            State.RETRYING,
            provider=exc.provider,
            error_code=exc.code,
            error=exc.message,
            detail={
                **exc.detail,
                "deferred": True,
                "deferrals": n,
                "next_attempt_at": due.isoformat(),
                "retry_topic": topic,
            },  # fmt: skip
        )
        return [
            _Out.of(Topics.EVENTS, dispatch.message_id.encode(), event.to_bytes(), headers),
            _Out.of(topic, message_key(dispatch.tenant_id, dispatch.to[0]), later.to_bytes(), headers),
        ]

    def _failure(self, dispatch: DispatchV1, exc: DeliveryError, elapsed: float, headers: list) -> list[_Out]:
        """A failed attempt's records (after the failover events of the providers tried before)."""
        return [*self._failovers(dispatch, exc.tries, headers), *self._failed(dispatch, exc, elapsed, headers)]

    def _failed(self, dispatch: DispatchV1, exc: DeliveryError, elapsed: float, headers: list) -> list[_Out]:
        """See :func:`next_step`; a rule's next channel takes over (:meth:`_fall_back`) when this
        one failed for good or would retry past its step's deadline."""
        step = next_step(exc, dispatch.attempt - dispatch.first_attempt + 1, self.settings.retry_delays)
        if dispatch.fallback is not None:
            retry_at = utcnow() + timedelta(seconds=exc.retry_after or 0 if isinstance(exc, Deferred) else
                                            step.retry_in or 0)  # fmt: skip
            late = dispatch.step_deadline is not None and retry_at > dispatch.step_deadline
            if step.retry_in is None or late:
                return self._fall_back(dispatch, exc, headers, "failed" if step.retry_in is None else "step_timeout")
        if isinstance(exc, Deferred):
            return self._deferral(dispatch, exc, headers)
        detail: dict[str, Any] = {
            **exc.detail,
            "permanent": isinstance(exc, Permanent),
            "duration_ms": round(elapsed * 1000, 1),
        }
        fields: dict[str, Any] = {"error_code": exc.code, "error": exc.message, "provider": exc.provider}
        key = dispatch.message_id.encode()
        if step.retry_in is not None:
            due = utcnow() + timedelta(seconds=step.retry_in)
            retry = dispatch.model_copy(
                update={
                    "attempt": dispatch.attempt + 1,
                    "dispatch_id": f"{dispatch.message_id}:{dispatch.attempt + 1}",
                    "not_before": due,
                    "last_error": exc.message,
                }
            )
            topic = Topics.RETRY[step.tier]
            RETRIES_SCHEDULED.labels(self.channel, topic).inc()
            log_event(
                log,
                logging.WARNING,
                "delivery failed; retry scheduled",
                message_id=dispatch.message_id,
                attempt=dispatch.attempt,
                retry_in_s=step.retry_in,
                error=exc.message,
            )
            event = self._event(
                dispatch,
                State.RETRYING,
                detail={**detail, "next_attempt_at": due.isoformat(), "retry_topic": topic},
                **fields,
            )
            return [
                _Out.of(Topics.EVENTS, key, event.to_bytes(), headers),
                _Out.of(topic, message_key(dispatch.tenant_id, dispatch.to[0]), retry.to_bytes(), headers),
            ]
        log_event(
            log,
            logging.ERROR,
            "delivery failed; no attempts left" if step.state is State.DEAD else "delivery failed permanently",
            message_id=dispatch.message_id,
            recipient=dispatch.to[0],
            attempt=dispatch.attempt,
            error=exc.message,
        )
        event = self._event(dispatch, step.state, detail={**detail, "attempts": dispatch.attempt}, **fields)
        letter = DeadLetterV1(
            source_topic=Topics.dispatch(self.channel),
            partition=-1,
            offset=-1,
            reason=step.reason,
            errors=[{"field": "delivery", "message": exc.message, "code": exc.code}],
            message_id=dispatch.message_id,
            tenant_id=dispatch.tenant_id,
            service=self.service,
            payload=dispatch.to_bytes().decode(),
            letter_id=f"{dispatch.dispatch_id}:{step.reason}",
        )
        return [
            _Out.of(Topics.EVENTS, key, event.to_bytes(), headers),
            _Out.of(Topics.DLQ, key, letter.to_bytes(), headers),
        ]

    def _fall_back(self, dispatch: DispatchV1, exc: DeliveryError, headers: list, why: str) -> list[_Out]:
        """A first_success rule's next channel: its dispatch (rendered and ranked by the router
        with this one) goes out now as the next attempt of the same message, and this channel's
        failure is recorded as a 'retrying' event naming the channel that takes over."""
        nxt = dispatch.fallback
        assert nxt is not None
        attempt = dispatch.attempt + 1
        later = nxt.model_copy(update={"attempt": attempt, "first_attempt": attempt, "created_at": utcnow(),
                                       "dispatch_id": f"{dispatch.message_id}:{attempt}",
                                       "last_error": exc.message})  # the step begins now  # fmt: skip
        detail = {**exc.detail, "permanent": isinstance(exc, Permanent),
                  "fallback": {"reason": why, "from": dispatch.channel.value, "to": nxt.channel.value,
                               "step": nxt.step, "attempt": attempt}}  # fmt: skip
        log_event(log, logging.WARNING, "channel failed; the rule's next channel takes over", reason=why,
                  message_id=dispatch.message_id, channel=self.channel, next_channel=nxt.channel.value)  # fmt: skip
        event = self._event(dispatch, State.RETRYING, error_code=exc.code, error=exc.message, provider=exc.provider,
                            detail=detail)  # fmt: skip
        return [
            _Out.of(Topics.EVENTS, dispatch.message_id.encode(), event.to_bytes(), headers),
            _Out.of(
                Topics.dispatch(nxt.channel.value), message_key(later.tenant_id, later.to[0]), later.to_bytes(), headers
            ),  # fmt: skip
        ]

    # --- pieces ----------------------------------------------------------------------------

    def _event(self, dispatch: DispatchV1, state: State, provider: str | None = None, **fields: Any) -> EventV1:
        eid = event_id(dispatch.message_id, dispatch.attempt, state)
        if dispatch.deferrals and state is State.RETRYING:
            # A run of the attempt after a rate-limit wait: its own 'retrying' (a failure, a
            # failover, another wait) is not the wait that deferred it.
            eid = f"{eid}.d{dispatch.deferrals}"
        return EventV1(
            event_id=eid,
            message_id=dispatch.message_id,
            tenant_id=dispatch.tenant_id,
            state=state,
            attempt=dispatch.attempt,
            occurred_at=utcnow(),
            service=self.service,
            channel=self.channel,
            provider=provider or getattr(self.provider, "name", None),
            request_id=dispatch.request_id,
            **fields,
        )

    async def _publish(self, outputs: list[_Out]) -> list[asyncio.Future]:
        return [
            await self.producer.send(
                o.topic,
                o.value.encode(),
                key=o.key.encode() if o.key is not None else None,
                headers=[(k, v.encode()) for k, v in o.headers],
            )
            for o in outputs
        ]

    # --- the dispatch's state in Redis -----------------------------------------------------

    @staticmethod
    def _done_key(dispatch_id: str) -> str:
        return f"herald:done:{dispatch_id}"

    @staticmethod
    def _alive_key(owner: str) -> str:
        return f"herald:sender:alive:{owner}"

    async def _claim(self, dispatch_id: str) -> _Claim:
        """Make this process the one delivering ``dispatch_id``, or learn its outcome.
        Without Redis nothing can be known: deliver (at least once beats dropping)."""
        key, mine = self._done_key(dispatch_id), _CLAIM + self._owner
        claimed = await self._write(key, mine, _CLAIM_TTL_S, only_new=True)
        if claimed is None:
            log.warning("redis unavailable; cannot check whether %s was already sent", dispatch_id)
            return _Claim(go=True)
        if claimed:
            return _Claim(go=True)
        try:
            while True:
                value = await self.redis.get(key)
                if value is None:  # expired or given up meanwhile
                    if await self.redis.set(key, mine, nx=True, ex=_CLAIM_TTL_S):
                        return _Claim(go=True)
                    continue
                kind = _CLAIM if value.startswith(_CLAIM) else _HANDED if value.startswith(_HANDED) else None
                if kind is None:
                    if value.startswith(_COMPACT):
                        return _Claim(outputs=[], state=value[len(_COMPACT) :].decode())
                    return _Claim(outputs=_decode_outputs(value))
                owner = value[len(kind) :].decode()
                busy = dispatch_id in self._delivering if owner == self.owner else await self._is_alive(owner)
                if busy:
                    # A live owner is on it (a rebalance, a replayed command): its outcome will
                    # be recorded in a moment.
                    if self._stopping.is_set():
                        return _Claim(abandoned=True)
                    await asyncio.sleep(_OWNER_POLL_S)
                    continue
                # Its owner died mid-delivery. Take the key over (unless another sender just did).
                if not await self._take_over(keys=[key], args=[value, mine, _CLAIM_TTL_S]):
                    continue
                if kind == _HANDED:
                    return _Claim(go=True, handed_by=owner)
                log_event(
                    log,
                    logging.WARNING,
                    "sender died before handing the dispatch over; delivering it",
                    dispatch_id=dispatch_id,
                    previous_owner=owner,
                )
                return _Claim(go=True)
        except RedisError:
            log.warning("redis unavailable; cannot check whether %s was already sent", dispatch_id)
            return _Claim(go=True)

    async def _reclaim(self, dispatch_id: str) -> None:
        """Back from handed to claimed: the hand-off's attempt failed, nothing was accepted."""
        if await self._write(self._done_key(dispatch_id), _CLAIM + self._owner, _CLAIM_TTL_S) is None:
            log.warning("redis unavailable; claim of %s not renewed", dispatch_id)

    async def _write(self, key: str, value: bytes, ttl: int, *, only_new: bool = False) -> bool | None:
        """``SET`` through the ledger's connection: whether it was set, None without Redis."""
        written = self.ledger.set(key, value, ttl, only_new=only_new)
        if written is None:
            return None
        try:
            return await written
        except ConnectionError:
            return None

    async def _is_alive(self, owner: str) -> bool:
        return bool(await self.redis.exists(self._alive_key(owner)))

    async def _record(self, dispatch_id: str, outputs: list[_Out]) -> None:
        """The outcome, right after the provider's answer and before anything is published."""
        value = _DONE + orjson.dumps([[o.topic, o.key, o.value, o.headers] for o in outputs])
        if await self._write(self._done_key(dispatch_id), value, self.settings.sender_done_ttl_s) is None:
            log.warning("redis unavailable; outcome of %s not recorded", dispatch_id)

    async def _release(self, dispatch_id: str) -> None:
        """Give up a claim on a dispatch that was not attempted."""
        with contextlib.suppress(RedisError):
            await self._release_claim(keys=[self._done_key(dispatch_id)], args=[_CLAIM + self._owner])

    async def _compact(self, done: list[tuple[str, str]]) -> None:
        """Once committed, a dispatch is never read again from this partition: its stored
        records (which may hold the whole message, for a retry) give way to its outcome's
        state, a few bytes kept for the 7 days."""
        ttl = self.settings.sender_done_ttl_s
        writes = [self.ledger.set(self._done_key(i), _COMPACT + state.encode(), ttl) for i, state in done]
        await _settled([w for w in writes if w is not None])

    async def _dead_letter(
        self, record: ConsumerRecord, trace: Trace, reason: str, errors: list, message_id: str | None
    ) -> asyncio.Future:
        letter = DeadLetterV1.of_record(
            record, reason=reason, errors=errors, service=self.service, message_id=message_id
        )
        MESSAGES_REJECTED.labels(self.service, reason).inc()
        log_event(log, logging.WARNING, "record rejected to the dead-letter topic", reason=reason, errors=errors[:5])
        return await self.producer.send(
            Topics.DLQ, letter.to_bytes(), key=message_id.encode() if message_id else None, headers=trace.headers()
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What follows a failed attempt."""

    state: State  # RETRYING, DEAD or FAILED
    reason: str  # the dead letter's reason ("" when retrying)
    retry_in: float | None = None  # seconds until the next attempt
    tier: int = 0  # index into Topics.RETRY


def next_step(exc: DeliveryError, attempt: int, delays: list[float]) -> Step:
    """A transient failure with attempts left is retried after ``delays[attempt - 1]`` (longer
    if the provider asked so with Retry-After) through the tier's delay topic; one with none
    left is ``dead``; a permanent one is ``failed`` at once. Both end in the dead-letter table."""
    if isinstance(exc, Retryable):
        if attempt <= len(delays):
            tier = attempt - 1
            delay = max(delays[tier], exc.retry_after or 0)
            return Step(State.RETRYING, "", delay, min(tier, len(Topics.RETRY) - 1))
        return Step(State.DEAD, "retries_exhausted")
    return Step(State.FAILED, "permanent_failure")


async def _settled(marks: list[asyncio.Future[bool]]) -> None:
    """Wait for the replies of ledger writes whose failure only leaves a mark absent."""
    for mark in marks:
        with contextlib.suppress(Exception):
            await mark


def _outcome_state(outputs: list[_Out]) -> str:
    """The state of the outcome event among a delivery's records: the last event (the failover
    events of providers tried before it come first)."""
    for o in reversed(outputs):
        if o.topic == Topics.EVENTS:
            return str(orjson.loads(o.value)["state"])
    return ""


def _decode_outputs(value: bytes) -> list[_Out]:
    """The records a completed dispatch produced ([] for an old-style "1" marker)."""
    if not value.startswith(_DONE):
        return []
    return [_Out(t, k, v, [(a, b) for a, b in h]) for t, k, v, h in orjson.loads(value[len(_DONE) :])]


def _parse(record: ConsumerRecord) -> DispatchV1 | list[dict]:
    """The dispatch a record carries, or the errors that make it unusable."""
    try:
        return DispatchV1.model_validate_json(record.value or b"")
    except ValidationError as exc:
        return field_errors(exc)


async def serve(settings: Settings, channels: list[str]) -> None:
    """Run the senders of ``channels`` until SIGTERM/SIGINT: one consumer (group
    ``herald-sender-<channel>``) and runner per channel, so a channel can as well run alone in
    its own deployment and scale there; the producer, Redis and the health port are shared."""
    classes = {channel: registry.load(channel) for channel in channels}
    for cls in classes.values():
        cls.check(settings)  # a bad configuration stops here, before any connection
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()

    async def publish_health(change: dict[str, Any]) -> None:
        record = ProviderHealthV1(**change)
        await producer.send_and_wait(Topics.PROVIDER_HEALTH, record.to_bytes(), key=record.identity.encode())

    providers = {channel: await cls.open(settings, publish_health) for channel, cls in classes.items()}
    redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
    ledger = Ledger(settings.redis_url.get_secret_value())
    ledger.start()
    await ledger.wait_connected(5)
    runners: list[SenderRunner] = []
    checks: dict[str, Any] = {}
    consumers = {
        channel: make_consumer(settings, [Topics.dispatch(channel)], group_id=f"herald-sender-{channel}")
        for channel in providers
    }
    # Started together: each start waits for its group's coordinator and first join (about 5 s on
    # Tansu), so one after the other sixteen channels took 80 s to start.
    await asyncio.gather(*(consumer.start() for consumer in consumers.values()))
    for channel, provider in providers.items():
        consumer = consumers[channel]
        runners.append(SenderRunner(settings, channel, provider, consumer, producer, redis, ledger))
        suffix = "" if len(providers) == 1 else f":{channel}"
        checks[f"kafka{suffix}"] = _assigned(consumer)
        checks[f"provider{suffix}"] = provider.ready

    async def redis_ready() -> None:
        await redis.ping()

    health = HealthServer("0.0.0.0", settings.sender_http_port, {**checks, "redis": redis_ready})
    await health.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [r.stop() for r in runners])
    for channel, provider in providers.items():
        log.info("sender for %s started (provider %s)", channel, provider.name)
    keeper = asyncio.create_task(keep_topics(settings))
    try:
        await asyncio.gather(*(r.run() for r in runners))
    finally:
        keeper.cancel()
        await health.stop()
        # Each of these can hang on a server that is down (aiokafka #1101, a pool whose
        # database went away): stopped together and each bounded, so SIGTERM ends in seconds.
        # A record not flushed is not lost: its dispatch's outcome is recorded and its offset
        # not committed, so the next owner publishes it again.
        await asyncio.gather(
            *(stop_quietly(r.consumer, 3) for r in runners),
            stop_quietly(producer, 3),
            *(_closed(p.close(), 3, f"{c} provider") for c, p in providers.items()),
        )
        await ledger.close()
        await redis.aclose()
    log.info("senders for %s stopped", ", ".join(channels))


def _assigned(consumer: AIOKafkaConsumer) -> Any:
    async def check() -> None:
        if not consumer.assignment():
            raise RuntimeError("no partitions assigned")

    return check


async def _closed(coro: Any, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as exc:  # shutting down: report, never hang or skip the rest
        log.warning("%s did not close cleanly: %s", what, exc.__class__.__name__)
