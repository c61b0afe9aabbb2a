"""The observability metrics' own logic (issue 11), without servers: a topic's backlog from the
brokers' offsets (retention's deleted records and the retry tiers' waiting attempts left out; a
group whose offsets cannot be read leaves only its own topics out), the routing decision's labels,
and celery_tasks_total's outcomes.
tests/e2e/test_observability.py reads them from a real pipeline through a real Prometheus."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import GroupCoordinatorNotAvailableError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter

from services.router.routing import Routed, Routing, decision_labels, plan
from services.tracker.lag import RETRIES_WAITING, BacklogExporter, Lag, consuming_groups, is_retry_topic, lags
from shared.events import Channel, ProviderHealthV1
from shared.kafka import Topics
from shared.metrics import CONSUMER_LAG, QUEUE_LENGTH, _WorkerTasks
from shared.routing import HealthStore, Probes, ProviderRoute, RoutingStore

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def test_every_consumed_topic_has_one_group() -> None:
    groups = consuming_groups()
    assert (
        groups[Topics.REQUESTS] == "herald-router" and groups[Topics.EVENTS] == groups[Topics.DLQ] == "herald-tracker"
    )
    assert {groups[t] for t in Topics.RETRY} == {"herald-router-retry"}
    assert all(groups[Topics.dispatch(c)] == f"herald-sender-{c.value}" for c in Channel)
    assert Topics.CONFIG not in groups and Topics.PROVIDER_HEALTH not in groups  # read whole, no group


def test_lag_is_end_minus_committed_summed_over_partitions() -> None:
    t = Topics.REQUESTS
    tp = [TopicPartition(t, p) for p in range(3)]
    end = {tp[0]: 10, tp[1]: 7, tp[2]: 5}
    first = {tp[0]: 0, tp[1]: 2, tp[2]: 5}
    committed = {tp[0]: 4, tp[1]: -1}  # partition 1: nothing committed (from its first offset); 2: absent
    [lag] = lags({t: "herald-router"}, {t: [0, 1, 2]}, first, end, committed)
    assert (lag.group, lag.topic, lag.records) == ("herald-router", t, (10 - 4) + (7 - 2) + 0)
    # A topic the broker does not have is no backlog; a commit past the end (a broker that lost
    # its data) is none either.
    assert lags({"gone": "g"}, {}, {}, {}, {}) == []
    [caught_up] = lags({t: "g"}, {t: [0]}, {}, {tp[0]: 3}, {tp[0]: 9})
    assert caught_up.records == 0


def test_lag_does_not_count_records_retention_deleted() -> None:
    """A group whose committed offset retention has deleted past (it never read those records)
    resumes at the first record there is: only the records from there on are its backlog."""
    t = Topics.EVENTS
    tp = [TopicPartition(t, p) for p in range(3)]
    first = {tp[0]: 500, tp[1]: 40, tp[2]: 70}
    end = {tp[0]: 520, tp[1]: 50, tp[2]: 70}
    committed = {tp[0]: 100, tp[1]: 45, tp[2]: 10}  # 0: 400 deleted unread; 1: ahead of first; 2: all deleted
    [lag] = lags({t: "herald-tracker"}, {t: [0, 1, 2]}, first, end, committed)
    assert lag.records == (520 - 500) + (50 - 45) + 0
    # Nothing committed: from the first offset (not from 0, before retention's cut).
    [fresh] = lags({t: "g"}, {t: [0]}, {tp[0]: 500}, {tp[0]: 520}, {tp[0]: -1})
    assert fresh.records == 20


def test_retry_tiers_are_waiting_attempts_not_backlog() -> None:
    """notify.retry.* lag goes to herald_retries_waiting, never to queue_length (the backlog alert's
    measure); herald_consumer_lag keeps every group."""
    assert {t for t in consuming_groups() if is_retry_topic(t)} == set(Topics.RETRY)
    assert not is_retry_topic(Topics.REQUESTS) and not is_retry_topic(Topics.dispatch(Channel.EMAIL))
    exporter = BacklogExporter.__new__(BacklogExporter)  # _set_lags and clear need no connections
    try:
        found = [Lag("herald-router-retry", "notify.retry.5m", 4000), Lag("herald-router", Topics.REQUESTS, 7)]
        exporter._set_lags(found)

        def samples(gauge) -> dict[tuple[str, ...], float]:
            return {tuple(s.labels.values()): s.value for m in gauge.collect() for s in m.samples}

        assert samples(QUEUE_LENGTH) == {(Topics.REQUESTS,): 7}
        assert samples(RETRIES_WAITING) == {("notify.retry.5m",): 4000}
        assert samples(CONSUMER_LAG) == {("herald-router-retry", "notify.retry.5m"): 4000,
                                         ("herald-router", Topics.REQUESTS): 7}  # fmt: skip
        # A topic that disappears leaves both gauges.
        exporter._set_lags([Lag("herald-router", Topics.REQUESTS, 0)])
        assert samples(RETRIES_WAITING) == {} and samples(QUEUE_LENGTH) == {(Topics.REQUESTS,): 0}
        exporter._set_lags(found)
        exporter.clear()
        assert samples(RETRIES_WAITING) == samples(QUEUE_LENGTH) == samples(CONSUMER_LAG) == {}
    finally:
        CONSUMER_LAG.clear()
        QUEUE_LENGTH.clear()
        RETRIES_WAITING.clear()


def _samples(gauge) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for m in gauge.collect() for s in m.samples}


class _Brokers:
    """The two clients BacklogExporter.read_lags uses, answering from dicts: every topic one
    partition with 10 records, each group committed at 4 unless its OffsetFetch fails."""

    def __init__(self, topics: list[str]) -> None:
        self.topics_ = topics
        self.failing: dict[str, Exception] = {}
        self.asked: list[str] = []
        self.closed = False

    async def topics(self) -> set[str]:
        return set(self.topics_)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 10 for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    async def list_consumer_group_offsets(self, group: str, partitions: list[TopicPartition]):
        self.asked.append(group)
        if group in self.failing:
            raise self.failing[group]
        return {tp: OffsetAndMetadata(4, "") for tp in partitions}


class _Redis:
    connection_pool = SimpleNamespace(connection_kwargs={"host": "redis", "port": 6379, "db": 0})

    async def info(self, section: str) -> dict[str, int]:
        return {"used_memory": 123}


def test_one_group_that_cannot_be_read_leaves_out_only_its_topics() -> None:
    """OffsetFetch failing for one group (on Tansu, a group that never existed) clears that group's
    gauges only: every other topic keeps its backlog, so HeraldBacklogUnknown stays quiet and the
    backlog alert can still fire. Nothing readable at all clears everything, as before."""
    brokers = _Brokers([Topics.REQUESTS, "notify.retry.5m", Topics.dispatch(Channel.EMAIL), Topics.EVENTS])
    settings = SimpleNamespace(kafka_request_timeout_s=1.0, bootstrap_servers="kafka:9092", service_name="tracker")
    exporter = BacklogExporter(settings, _Redis(), lambda: True)  # type: ignore[arg-type]

    async def clients():
        return brokers, brokers

    async def close() -> None:
        brokers.closed = True

    exporter._clients = clients  # type: ignore[method-assign]
    exporter._close = close  # type: ignore[method-assign]
    everything = {(Topics.REQUESTS,): 6, (Topics.dispatch(Channel.EMAIL),): 6, (Topics.EVENTS,): 6}
    try:
        asyncio.run(exporter.poll())
        assert _samples(QUEUE_LENGTH) == everything
        assert _samples(RETRIES_WAITING) == {("notify.retry.5m",): 6}
        assert len(_samples(CONSUMER_LAG)) == 4

        # The retry relay's group cannot be read: its tier's gauges go, the rest stay (and are read).
        brokers.failing["herald-router-retry"] = GroupCoordinatorNotAvailableError("no such group")
        brokers.asked.clear()
        asyncio.run(exporter.poll())
        assert set(brokers.asked) == {"herald-router", "herald-router-retry", "herald-sender-email", "herald-tracker"}
        assert _samples(QUEUE_LENGTH) == everything
        assert _samples(RETRIES_WAITING) == {}
        assert ("herald-router-retry", "notify.retry.5m") not in _samples(CONSUMER_LAG)
        assert len(_samples(CONSUMER_LAG)) == 3
        assert "group herald-router-retry" in exporter._failing and "kafka" not in exporter._failing

        # The router's group fails too, with an error of the client's own (not a KafkaError).
        brokers.failing["herald-router"] = ValueError("could not decode the answer")
        asyncio.run(exporter.poll())
        assert _samples(QUEUE_LENGTH) == {k: v for k, v in everything.items() if k != (Topics.REQUESTS,)}

        # Readable again: back.
        brokers.failing.clear()
        asyncio.run(exporter.poll())
        assert _samples(QUEUE_LENGTH) == everything and _samples(RETRIES_WAITING) == {("notify.retry.5m",): 6}
        assert not exporter._failing

        # No group readable at all: as if the broker could not be asked (every gauge cleared).
        brokers.failing.update({g: GroupCoordinatorNotAvailableError() for g in brokers.asked})
        asyncio.run(exporter.poll())
        assert _samples(QUEUE_LENGTH) == _samples(RETRIES_WAITING) == _samples(CONSUMER_LAG) == {}
        assert "kafka" in exporter._failing and brokers.closed
    finally:
        exporter.clear()


def _routing() -> Routing:
    store = RoutingStore()
    for pid, name, cost in ((1, "dear", "0.05"), (2, "cheap", "0.03")):
        store.put_provider(ProviderRoute(provider_id=pid, tenant_id="acme", channel="sms", provider="aliyun",
                                         name=name, costs={"default": cost}))  # fmt: skip
    return Routing(store, HealthStore(), Probes(), random.Random(1))


def _plan(routing: Routing | None, **fields) -> Routed:
    body = {"tenant_id": "acme", "content": "hi", "content_type": "text", **fields}
    decision = plan(orjson.dumps(body), now=NOW, routing=routing)
    assert isinstance(decision, Routed), decision
    return decision


def test_routing_decision_labels() -> None:
    routing = _routing()
    sms = {"channel": "sms", "to": ["+8613800138000"]}
    assert decision_labels(_plan(routing, **sms)) == ("sms", "aliyun", "cheapest")
    assert decision_labels(_plan(routing, **sms, provider="dear")) == ("sms", "aliyun", "named")
    email = {"channel": "email", "to": ["a@example.com"], "subject": "s"}
    assert decision_labels(_plan(routing, **email)) == ("email", "smtp", "mailbox_pool")
    assert decision_labels(_plan(None, **sms)) == ("sms", "unknown", "sender_chooses")
    # Every provider below the quality threshold: the best success rate first.
    for pid in (1, 2):
        routing.health.by_provider[pid] = ProviderHealthV1(
            provider="aliyun", channel="sms", identity=f"provider:{pid}", state="degraded", provider_id=pid,
            breaker="closed", occurred_at=NOW, samples=50, success_rate=0.5,
        )  # fmt: skip
    assert decision_labels(_plan(routing, **sms)) == ("sms", "aliyun", "below_threshold")


def test_celery_tasks_counts_workers_and_reads_the_senders_attempts() -> None:
    attempts = Counter("messages_sent_total", "", ["type", "status", "provider"], registry=CollectorRegistry())
    tasks = _WorkerTasks(attempts)
    tasks.inc("router", "success", 3)
    tasks.inc("router", "rejected")
    tasks.inc("tracker", "success", 10)
    attempts.labels("email", "success", "smtp").inc(5)
    attempts.labels("sms", "unconfirmed", "aliyun").inc(1)
    attempts.labels("sms", "failed", "aliyun").inc(2)
    attempts.labels("sms", "deferred", "aliyun").inc(4)
    [family] = tasks.collect()
    assert family.name == "celery_tasks" and family.type == "counter"
    got = {(s.labels["service"], s.labels["status"]): s.value for s in family.samples if s.name == "celery_tasks_total"}
    assert got == {("router", "success"): 3, ("router", "rejected"): 1, ("tracker", "success"): 10,
                   ("sender", "success"): 6, ("sender", "failure"): 2, ("sender", "retry"): 4}  # fmt: skip
