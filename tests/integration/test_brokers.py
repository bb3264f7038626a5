"""Integration tests of the real brokers leakwatch runs on: Apache Kafka and tansu.

Each behaviour the streaming pipeline relies on is checked against both brokers
through the ``broker`` fixture (see ``conftest.py``): topic creation, keyed
produce/consume, consumer groups with committed offsets, consumer lag from
end offsets, and rebalancing when a second worker joins. Log compaction is
checked on Apache Kafka only: tansu (memory engine) accepts
``cleanup.policy=compact`` but never compacts, which ``TestCompaction`` pins
down so that a tansu upgrade that changes it gets noticed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import OffsetAndMetadata, RecordMetadata

from streams.brokers import (
    ApacheKafkaBroker,
    BrokerProcess,
    TansuBroker,
    TopicSpec,
    create_topics,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4

#: Consumer group timings that keep rebalances quick on both brokers. tansu
#: answers a JoinGroup only after about half the session timeout, and keeps a
#: member that sent LeaveGroup until its session expires, so a short session
#: timeout matters there. (The apache_kafka fixture lowers Kafka's
#: group.min.session.timeout.ms from 6 s to 1 s to allow it.)
GROUP_SETTINGS: dict[str, int] = {
    "session_timeout_ms": 3000,
    "heartbeat_interval_ms": 300,
    "rebalance_timeout_ms": 6000,
}


def unique(prefix: str) -> str:
    """A topic or group name no other test uses (the brokers are session-wide)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]
) -> list[RecordMetadata]:
    """Send keyed records one by one (so per-key order is the send order)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        return [await producer.send_and_wait(topic, value, key=key) for key, value in records]
    finally:
        await producer.stop()


async def poll_until(
    consumer: AIOKafkaConsumer, count: int, timeout: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Poll *consumer* until it has returned *count* records (or fail)."""
    got: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)}/{count} records in {timeout}s"
        batches = await consumer.getmany(timeout_ms=200)
        for batch in batches.values():
            got.extend(batch)
    return got


async def read_all(bootstrap: str, topic: str, partition: int = 0) -> list[tuple[bytes, bytes]]:
    """Every (key, value) currently in one partition, from the log start to the end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 30
        while await consumer.position(tp) < end:
            assert time.monotonic() < deadline, "could not read to the end of the log"
            for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                assert record.key is not None and record.value is not None
                out.append((record.key, record.value))
        return out
    finally:
        await consumer.stop()


def group_consumer(bootstrap: str, group: str, *topics: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **GROUP_SETTINGS,
    )


def partitions_of(consumer: AIOKafkaConsumer) -> set[int]:
    return {tp.partition for tp in consumer.assignment()}


class TestTopics:
    """Topic creation through the admin API, as leakwatch's bootstrap does it."""

    async def test_create_topic_with_four_partitions(self, broker: BrokerProcess) -> None:
        """A topic created with 4 partitions has 4 partitions, each with a leader."""
        topic = unique("create")
        counts = await create_topics(broker.bootstrap, [TopicSpec(topic, PARTITIONS)])
        assert counts == {topic: PARTITIONS}

        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        assert described["error_code"] == 0
        assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2, 3]
        assert all(p["leader"] >= 0 for p in described["partitions"])

    async def test_create_topics_tolerates_existing_topic(self, broker: BrokerProcess) -> None:
        """Creating the same topics twice (tuple specs) is not an error."""
        topic = unique("again")
        specs: Sequence[tuple[str, int]] = [(topic, PARTITIONS)]
        assert await create_topics(broker.bootstrap, specs) == {topic: PARTITIONS}
        assert await create_topics(broker.bootstrap, specs) == {topic: PARTITIONS}


class TestProduceConsume:
    """Keyed records through a consumer group, with committed offsets and lag."""

    async def test_keyed_messages_round_trip(self, broker: BrokerProcess) -> None:
        """Keyed records all come back, per-key order kept, one partition per key."""
        topic, group = unique("keyed"), unique("g")
        await create_topics(broker.bootstrap, [(topic, PARTITIONS)])
        keys = [f"staff-{i}".encode() for i in range(8)]
        sent = [(k, f"{k.decode()}:{n}".encode()) for n in range(5) for k in keys]
        meta = await produce(broker.bootstrap, topic, sent)

        partition_of_key: dict[bytes, int] = {}
        for (key, _), md in zip(sent, meta, strict=True):
            assert partition_of_key.setdefault(key, md.partition) == md.partition
        assert len(set(partition_of_key.values())) > 1, "8 keys all hashed to one partition"

        consumer = group_consumer(broker.bootstrap, group, topic)
        await consumer.start()
        try:
            got = await poll_until(consumer, len(sent))
        finally:
            await consumer.stop()
        assert sorted((r.key, r.value) for r in got) == sorted(sent)
        for record in got:
            assert record.key is not None
            assert record.partition == partition_of_key[record.key]
        for key in keys:
            values = [r.value for r in got if r.key == key]
            assert values == [v for k, v in sent if k == key]

    async def test_committed_offsets_resume_the_group(self, broker: BrokerProcess) -> None:
        """After a commit, the next member of the group only sees newer records."""
        topic, group = unique("commit"), unique("g")
        await create_topics(broker.bootstrap, [(topic, PARTITIONS)])
        first = [(f"k{i}".encode(), b"old") for i in range(12)]
        await produce(broker.bootstrap, topic, first)

        consumer = group_consumer(broker.bootstrap, group, topic)
        await consumer.start()
        try:
            await poll_until(consumer, len(first))
            await consumer.commit()
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            end = await consumer.end_offsets(tps)
            for tp in tps:
                assert await consumer.committed(tp) == end[tp]
        finally:
            await consumer.stop()

        second = [(f"k{i}".encode(), b"new") for i in range(4)]
        await produce(broker.bootstrap, topic, second)
        consumer = group_consumer(broker.bootstrap, group, topic)
        await consumer.start()
        try:
            got = await poll_until(consumer, len(second))
            await asyncio.sleep(0.5)
            got += [r for b in (await consumer.getmany(timeout_ms=500)).values() for r in b]
        finally:
            await consumer.stop()
        assert sorted((r.key, r.value) for r in got) == sorted(second)

    async def test_consumer_lag_from_end_offsets(self, broker: BrokerProcess) -> None:
        """Lag = end offset - committed offset, read with list_offsets and OffsetFetch."""
        topic, group = unique("lag"), unique("g")
        await create_topics(broker.bootstrap, [(topic, PARTITIONS)])
        await produce(broker.bootstrap, topic, [(f"k{i}".encode(), b"v") for i in range(40)])
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

        consumer = group_consumer(broker.bootstrap, group, topic)
        await consumer.start()
        try:
            await poll_until(consumer, 40)
            end = await consumer.end_offsets(tps)
            assert sum(end.values()) == 40
            # Commit only half of each partition: the group lags by the other half.
            await consumer.commit({tp: OffsetAndMetadata(end[tp] // 2, "") for tp in tps})
        finally:
            await consumer.stop()

        # What a lag exporter does: no group membership, just offsets.
        watcher = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await watcher.start()
        await admin.start()
        try:
            begin = await watcher.beginning_offsets(tps)
            end = await watcher.end_offsets(tps)
            # Explicit partitions: tansu cannot answer the "all partitions" form.
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        finally:
            await admin.close()
            await watcher.stop()
        assert all(begin[tp] == 0 for tp in tps)
        lag = {tp: end[tp] - committed[tp].offset for tp in tps}
        assert lag == {tp: end[tp] - end[tp] // 2 for tp in tps}
        assert sum(lag.values()) == sum(end[tp] - end[tp] // 2 for tp in tps)


class TestRebalance:
    """Consumer group rebalancing between two workers of the same group."""

    async def test_second_consumer_splits_partitions(self, broker: BrokerProcess) -> None:
        """A second member triggers a rebalance; the 4 partitions split 2/2, then rejoin 4/0."""
        topic, group = unique("rebalance"), unique("g")
        await create_topics(broker.bootstrap, [(topic, PARTITIONS)])
        first = group_consumer(broker.bootstrap, group, topic)
        second = group_consumer(broker.bootstrap, group, topic)
        await first.start()
        try:
            deadline = time.monotonic() + 30
            while partitions_of(first) != {0, 1, 2, 3}:
                assert time.monotonic() < deadline, "first member never got all partitions"
                await first.getmany(timeout_ms=200)

            await second.start()
            deadline = time.monotonic() + 45
            while True:
                # Both members must keep polling so both take part in the rebalance.
                await asyncio.gather(first.getmany(timeout_ms=200), second.getmany(timeout_ms=200))
                a, b = partitions_of(first), partitions_of(second)
                if a and b and not a & b and a | b == {0, 1, 2, 3}:
                    break
                assert time.monotonic() < deadline, f"no split after 45s: {a} / {b}"
            assert len(a) == len(b) == 2

            await second.stop()
            deadline = time.monotonic() + 45
            while partitions_of(first) != {0, 1, 2, 3}:
                assert time.monotonic() < deadline, "partitions not taken back after leave"
                await first.getmany(timeout_ms=200)
        finally:
            await second.stop()
            await first.stop()


COMPACT_CONFIG = {
    "cleanup.policy": "compact",
    # Roll segments fast and clean eagerly so the test sees compaction in seconds.
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "100",
}


async def produce_rounds(bootstrap: str, topic: str, keys: int, rounds: int) -> None:
    """*rounds* values for each of *keys* keys, a segment roll apart, then a roll marker."""
    for n in range(rounds):
        await produce(
            bootstrap, topic, [(f"user-{k}".encode(), f"v{n}".encode()) for k in range(keys)]
        )
        await asyncio.sleep(0.15)
    # One more append after segment.ms so the last round leaves the active segment.
    await produce(bootstrap, topic, [(b"roll", b"-")])


class TestCompaction:
    """Compacted topics (Faust table changelogs): Apache Kafka compacts, tansu does not."""

    KEYS, ROUNDS = 4, 6

    async def test_compacted_topic_keeps_latest_value_per_key(
        self, apache_kafka: ApacheKafkaBroker
    ) -> None:
        """Kafka's log cleaner leaves exactly the latest value of every key."""
        topic = unique("compact")
        await create_topics(apache_kafka.bootstrap, [(topic, 1, COMPACT_CONFIG)])
        await produce_rounds(apache_kafka.bootstrap, topic, self.KEYS, self.ROUNDS)
        latest = {f"user-{k}".encode(): f"v{self.ROUNDS - 1}".encode() for k in range(self.KEYS)}

        deadline = time.monotonic() + 60
        while True:
            records = [
                (k, v) for k, v in await read_all(apache_kafka.bootstrap, topic) if k != b"roll"
            ]
            if len(records) == self.KEYS:
                break
            assert time.monotonic() < deadline, f"not compacted after 60s: {len(records)} records"
            await asyncio.sleep(1)
        assert dict(records) == latest

    async def test_tansu_accepts_compact_config_but_keeps_every_record(
        self, tansu: TansuBroker
    ) -> None:
        """tansu stores cleanup.policy=compact but never drops superseded values."""
        topic = unique("compact")
        await create_topics(tansu.bootstrap, [(topic, 1, COMPACT_CONFIG)])
        admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
        finally:
            await admin.close()
        entries = {e[0]: e[1] for e in response.resources[0][4]}
        assert entries.get("cleanup.policy") == "compact"

        await produce_rounds(tansu.bootstrap, topic, self.KEYS, self.ROUNDS)
        await asyncio.sleep(1.5)
        records = await read_all(tansu.bootstrap, topic)
        assert len(records) == self.KEYS * self.ROUNDS + 1
