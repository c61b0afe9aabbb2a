"""Templates in memory, fed by the compacted ``notify.config`` topic.

Ingest writes a template to PostgreSQL and then publishes it to ``notify.config``: one record
per version (key ``template:<tenant>:<id>:<version>``, never changed once written) and one
head (key ``template:<tenant>:<id>``: current version, name, active, deleted). Every router
and ingest replica reads the whole topic from the beginning at start-up (no consumer group:
each needs every partition) and follows it, so a send never costs a template query. A router
that meets a version it does not know yet (published a moment ago) waits until it has read up
to the topic's end before deciding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared.errors import ErrorCode
from shared.kafka import Topics
from shared.settings import Settings
from shared.templates import TemplateHead, TemplateProblem, TemplateVersion

log = logging.getLogger("herald.templates")


class TemplateStore:
    """Every template version and head known, by tenant."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, int, int], TemplateVersion] = {}
        self.heads: dict[tuple[str, int], TemplateHead] = {}
        self._names: dict[tuple[str, str], int] = {}

    def apply(self, value: bytes | None) -> None:
        """One record of the config topic (tombstones and other kinds are ignored)."""
        if not value:
            return
        data = orjson.loads(value)
        kind = data.get("schema") if isinstance(data, dict) else None
        if kind == "notify.config.template.v1":
            self.put_version(TemplateVersion.model_validate(data))
        elif kind == "notify.config.template-head.v1":
            self.put_head(TemplateHead.model_validate(data))

    def put_version(self, version: TemplateVersion) -> None:
        self.versions[(version.tenant_id, version.template_id, version.version)] = version

    def put_head(self, head: TemplateHead) -> None:
        key = (head.tenant_id, head.template_id)
        old = self.heads.get(key)
        if old is not None and head.revision < old.revision:
            return  # published late: a newer change is already known
        if old is not None and self._names.get((old.tenant_id, old.template_name)) == old.template_id:
            del self._names[(old.tenant_id, old.template_name)]
        self.heads[key] = head
        if not head.deleted:
            self._names[(head.tenant_id, head.template_name)] = head.template_id

    def version(self, tenant_id: str, template_id: int, version: int) -> TemplateVersion | None:
        return self.versions.get((tenant_id, template_id, version))

    def head(self, tenant_id: str, template_id: int | None, name: str | None) -> TemplateHead | None:
        if template_id is None and name is not None:
            template_id = self._names.get((tenant_id, name))
        return self.heads.get((tenant_id, template_id)) if template_id is not None else None

    def missing_for_good(self, tenant_id: str, template_id: int, version: int) -> bool:
        """Whether a version this store lacks will never come: its template is known and
        deleted, or its current version is older. Otherwise it may be on its way."""
        head = self.heads.get((tenant_id, template_id))
        return head is not None and (head.deleted or version > head.version)

    def for_send(
        self, tenant_id: str, template_id: int | None, name: str | None, version: int | None
    ) -> TemplateVersion | None:
        """The version a send uses: ``version`` when pinned, else the current one. None when
        this store does not know the template; :class:`TemplateProblem` (2003) when it is
        deleted, disabled or has no such version."""
        head = self.head(tenant_id, template_id, name)
        if head is None:
            return None
        label = template_id if template_id is not None else name
        if head.deleted or not head.is_active:
            state = "deleted" if head.deleted else "disabled"
            raise TemplateProblem(ErrorCode.TEMPLATE_NOT_FOUND, f"template {label} is {state}", "template_id")
        number = version or head.version
        found = self.version(tenant_id, head.template_id, number)
        if found is None:
            if number > head.version:
                raise TemplateProblem(
                    ErrorCode.TEMPLATE_NOT_FOUND, f"template {label} has no version {number}", "template_version"
                )
            return None  # an older version this store has not read (yet)
        return found


class ConfigStore(Protocol):
    """What keeps a kind of configuration from ``notify.config`` (templates, frequency rules):
    ``apply`` takes every record of the topic and ignores the kinds that are not its own."""

    def apply(self, value: bytes | None) -> None: ...


class ConfigFollower:
    """Reads ``notify.config`` (or another compacted topic: ``topic``) from the beginning into its
    stores and follows it."""

    def __init__(self, settings: Settings, *stores: ConfigStore, topic: str = Topics.CONFIG) -> None:
        self.settings = settings
        self.stores = stores
        self.topic = topic
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self.applied = 0
        self.loaded = asyncio.Event()  # read to the end once (or gave up waiting, with a warning)

    async def start(self, timeout: float = 30) -> None:
        """Assign every partition and read up to the end before answering; a consumer that
        cannot start is closed and the error raised (call again to retry)."""
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=int(s.kafka_metadata_max_age_s * 1000),
            client_id=f"herald-{s.service_name}-{self.topic.removeprefix('notify.')}",
        )
        try:
            await consumer.start()
            self.consumer = consumer
            await self._assign()
        except BaseException:
            self.consumer = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 3)
            raise
        self._task = asyncio.create_task(self._run(), name="config-follower")
        if not await self.sync(timeout):
            log.warning("config topic not read to its end within %.0fs; continuing", timeout)
        self.loaded.set()

    async def _assign(self) -> None:
        assert self.consumer is not None
        await self.consumer.topics()
        parts = self.consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        if tps:
            await self.consumer.seek_to_beginning(*tps)

    async def _run(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("config topic read failed (%s); retrying", exc.__class__.__name__)
                await asyncio.sleep(1)
                with contextlib.suppress(KafkaError):
                    await self._assign()
                continue
            for records in batches.values():
                for record in records:
                    try:
                        for store in self.stores:
                            store.apply(record.value)
                        self.applied += 1
                    except (ValidationError, orjson.JSONDecodeError, TypeError):
                        log.warning("unreadable record of %s at %s:%s skipped", self.topic, record.partition,
                                    record.offset)  # fmt: skip

    async def sync(self, timeout: float = 5) -> bool:
        """Wait until everything on the topic now has been read (answers whether it was)."""
        consumer = self.consumer
        if consumer is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            tps = list(consumer.assignment())
            if not tps:
                await self._assign()
                tps = list(consumer.assignment())
            ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout)
        except (KafkaError, TimeoutError):
            return False
        while time.monotonic() < deadline:
            try:
                if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                    return True
            except KafkaError:
                pass
            await asyncio.sleep(0.02)
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 3)
