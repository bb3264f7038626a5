"""Helpers for the streaming pipeline tests (imported by the test modules; no tests here).

Every test gets its own topics and consumer group (a unique suffix), so the
session-wide brokers can be shared. Expected alerts are computed offline by
running :class:`detectors.engine.Engine` over the same events, one engine per
(topic, partition) exactly as the worker partitions them: detection is
deterministic, so the stream must produce the same alerts, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import fields
from datetime import date
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from detectors.engine import Engine, EngineSettings, calendar_from_rules
from detectors.rules import Rule
from schemas.alert import SEVERITY_RANK, Alert
from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.brokers import BrokerProcess, free_port
from streams.config import Settings, load_settings
from streams.detection import DetectionLoop, load_rules_for
from streams.produce import KeyedSender, partition_for
from streams.worker import ensure_topics

PSEUDONYM_KEY = "pipeline-test-pseudonym-key-0001"
PARTITIONS = 4
#: Actions shipped on the operation topic; the rest go to the access topic.
OPERATION_ACTIONS = frozenset({"login", "logout", "usb_connect", "usb_write", "file_copy", "print_screen"})


def make_settings(broker: BrokerProcess, tag: str, **overrides: Any) -> Settings:
    """Settings with topics and group unique to one test."""
    suffix = f"{tag}-{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "brokers": broker.bootstrap,
        "group_id": f"lw-{suffix}",
        "topic_access": f"access-{suffix}",
        "topic_operation": f"operation-{suffix}",
        "topic_dlq": f"dlq-{suffix}",
        "topic_alerts": f"alerts-{suffix}",
        "topic_escalations": f"escalations-{suffix}",
        "topic_acks": f"acks-{suffix}",
        "topic_audit": f"audit-{suffix}",
        "topic_checkpoints": f"checkpoints-{suffix}",
        "partitions": PARTITIONS,
        "checkpoint_interval": 0.2,
        "pseudonym_key": PSEUDONYM_KEY,
        "session_timeout": 3.0,
        "web_port": free_port(),
        "worker_name": f"test-{suffix}",
        "log_level": "warning",
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(Settings, env={}, overrides=values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that configures ``leakwatch worker`` with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKWATCH_")}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        env[f"LEAKWATCH_{f.name.upper()}"] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return env


async def create_topics(settings: Settings) -> None:
    """All the test's topics, as the worker creates them."""
    await ensure_topics(settings)


def codec() -> EventCodec:
    """The codec producers and the offline expectation use (same key as the worker)."""
    return EventCodec(Pseudonymizer(PSEUDONYM_KEY.encode()))


def topic_of(settings: Settings, ev: Event, split: bool = False) -> str:
    """Which input topic an event is shipped on: with ``split``, operations go to the operation topic."""
    return settings.topic_operation if split and ev.action in OPERATION_ACTIONS else settings.topic_access


def synthetic_events(seed: int = 3, days: int = 5, staff: int = 30, start: date = date(2024, 11, 18)) -> list[Event]:
    """A few days of the synthetic municipality with every leak scenario injected."""
    from load_tests.generator import generate

    return list(generate(seed=seed, start=start, days=days, staff=staff, scenarios="all"))


def expected_alerts(settings: Settings, events: Iterable[Event], rules: Sequence[Rule] | None = None) -> list[Alert]:
    """The alerts a worker must publish for ``events`` (offline, one engine per partition number).

    Exact when every event of a partition arrives in ``events`` order, i.e.
    when they are all shipped on one topic.
    """
    rules = list(rules) if rules is not None else load_rules_for(settings)
    from detectors.base import parse_duration

    engine_settings = EngineSettings(lateness_ms=parse_duration(settings.lateness))
    calendar = calendar_from_rules([r for r in rules if r.enabled])
    engines: dict[int, Engine] = {}
    out: list[Alert] = []
    for ev in events:
        key = partition_for(ev.user.encode(), settings.partitions)
        engine = engines.get(key)
        if engine is None:
            engine = engines[key] = Engine(rules, engine_settings, calendar)
        engine.process(ev)
        out.extend(engine.drain())
    return out


def escalated(settings: Settings, alerts: Iterable[Alert]) -> list[Alert]:
    """The alerts that also go to the escalation topic."""
    rank = SEVERITY_RANK[settings.escalation_severity]
    return [a for a in alerts if SEVERITY_RANK[a.severity] >= rank]


async def producer_for(settings: Settings) -> AIOKafkaProducer:
    """A started producer (caller stops it)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.brokers, acks="all", linger_ms=5)
    await producer.start()
    return producer


def message_plan(settings: Settings, events: Iterable[Event], batch: int = 1, split: bool = False) -> list[tuple[str, list[Event]]]:
    """The messages ``produce_events`` sends: (topic, events of one message), in send order.

    With ``batch > 1`` each message holds up to ``batch`` events of one user,
    which changes the interleaving of users within a partition; expected
    alerts must then be computed over :func:`sent_order`.
    """
    from streams.produce import _group_by_user

    if batch <= 1:
        return [(topic_of(settings, ev, split), [ev]) for ev in events]
    by_topic: dict[str, list[Event]] = {t: [] for t in settings.input_topics}
    for ev in events:
        by_topic[topic_of(settings, ev, split)].append(ev)
    return [(topic, group) for topic, evs in by_topic.items() for group in _group_by_user(evs, batch)]


def sent_order(plan: Iterable[tuple[str, list[Event]]]) -> list[Event]:
    """The events of a message plan in the order they reach the partitions."""
    return [ev for _, group in plan for ev in group]


async def produce_events(
    settings: Settings,
    events: Iterable[Event] | None = None,
    batch: int = 1,
    *,
    split: bool = False,
    plan: list[tuple[str, list[Event]]] | None = None,
    ends: dict[TopicPartition, int] | None = None,
) -> int:
    """Ship events keyed by user, as ``leakwatch produce`` does; returns messages sent.

    ``ends`` is updated with the end offset of each partition written to, from
    the produce responses (tansu's ListOffsets answer is too low after
    multi-record batches, so tests do not ask the broker).
    """
    if plan is None:
        assert events is not None
        plan = message_plan(settings, events, batch, split)
    producer = await producer_for(settings)
    c = codec()
    try:
        senders = {t: await KeyedSender.create(producer, t) for t in settings.input_topics}
        for topic, group in plan:
            value = c.encode(group[0]) if len(group) == 1 and batch <= 1 else c.encode_batch(group)
            await senders[topic].add(group[0].user.encode(), value)
        for sender in senders.values():
            await sender.flush()
            if ends is not None:
                for p, end in sender.end_offsets.items():
                    tp = TopicPartition(sender.topic, p)
                    ends[tp] = max(ends.get(tp, 0), end)
        return sum(s.messages for s in senders.values())
    finally:
        await producer.stop()


async def produce_raw(
    settings: Settings, topic: str, items: Iterable[tuple[bytes | None, bytes | None]], ends: dict[TopicPartition, int] | None = None
) -> None:
    """Send raw (key, value) messages one after the other (per-key order kept)."""
    producer = await producer_for(settings)
    try:
        for key, value in items:
            meta = await producer.send_and_wait(topic, value, key=key)
            if ends is not None:
                tp = TopicPartition(topic, meta.partition)
                ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    finally:
        await producer.stop()


class TopicReader:
    """Reads a topic from the beginning, without a group, collecting every record."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.records: list[Any] = []
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.brokers, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
        )

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Fetch what is there; returns how many records were new."""
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        n = 0
        for records in batch.values():
            self.records.extend(records)
            n += len(records)
        return n

    async def until(self, predicate: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
        """Poll until ``predicate(records)`` holds; raises AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {self.topic}: {len(self.records)} records so far")
            await self.poll()
        return self.records

    async def settle(self, quiet: float = 1.5) -> list[Any]:
        """Poll until nothing new arrives for ``quiet`` seconds."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if await self.poll(200):
                last = time.monotonic()
        return self.records


def alert_ids(records: Iterable[Any]) -> list[tuple[str, int]]:
    """(alert_id, revision) of each published alert record, in order."""
    out = []
    for r in records:
        doc = orjson.loads(r.value)
        out.append((doc["alert_id"], doc["revision"]))
    return out


def without_evidence(doc: dict[str, Any]) -> dict[str, Any]:
    """An alert document minus the evidence lists (they may be shorter after a restore)."""
    return {k: v for k, v in doc.items() if k != "evidence"}


async def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll a condition every 50 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_loop(settings: Settings, **kwargs: Any) -> AsyncIterator[DetectionLoop]:
    """A DetectionLoop running in this process until the block ends (graceful stop)."""
    loop = DetectionLoop(settings, poll_timeout_ms=50, **kwargs)
    task = asyncio.ensure_future(loop.run())
    try:
        await wait_until(lambda: loop.assigned or task.done(), 60, "partition assignment")
        if task.done():
            task.result()
        yield loop
    finally:
        loop.request_stop()
        await asyncio.wait_for(task, 60)


async def committed_offsets(settings: Settings) -> dict[TopicPartition, int]:
    """The group's committed offsets on the input topics (partitions without a commit left out)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.brokers, group_id=settings.group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for topic in settings.input_topics:
            for p in range(settings.partitions):
                tp = TopicPartition(topic, p)
                offset = await consumer.committed(tp)
                if offset is not None and offset >= 0:
                    out[tp] = offset
        return out
    finally:
        await consumer.stop()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; connection errors give status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""
