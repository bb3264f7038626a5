"""The Kafka feed of the synthetic municipality, against the session's embedded tansu broker."""

from __future__ import annotations

from datetime import date

import pytest
from aiokafka import AIOKafkaConsumer

from load_tests.feed import days_for, stream_to_kafka
from load_tests.generator import generate
from schemas.event import EventCodec
from schemas.mynumber import Pseudonymizer
from streams.brokers import TansuBroker, create_topics

CODEC = EventCodec(Pseudonymizer(b"feed-test-key-0123456789"))

pytestmark = pytest.mark.integration


async def consume(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of every message on ``topic`` until ``expected`` events were read (or 20 s)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[tuple[bytes, bytes]] = []
    events = 0
    try:
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    assert r.key is not None and r.value is not None
                    out.append((r.key, r.value))
                    events += len(CODEC.decode(r.value)[0])
            if events >= expected:
                break
    finally:
        await consumer.stop()
    return out


class TestDaysFor:
    """Enough days are generated for the requested volume."""

    def test_covers_volume(self) -> None:
        """The estimated range holds more events than rate x duration."""
        days = days_for(2000, 10, 40)
        log = generate(seed=1, start=date(2024, 11, 18), days=days, staff=40)
        assert sum(1 for _ in log) > 2000 * 10


class TestStreamToKafka:
    """Events arrive valid, keyed by user, at about the requested rate."""

    async def test_single_event_messages(self, tansu: TansuBroker) -> None:
        """One valid event per message, keyed by its user, paced to the rate."""
        await create_topics(tansu.bootstrap, [("feed-single", 3)])
        stats = await stream_to_kafka(tansu.bootstrap, "feed-single", rate=2000, duration=1.5, seed=1, staff=40)
        assert stats.events == 3000 and stats.messages == 3000 and stats.errors == 0
        assert stats.seconds >= 1.3
        messages = await consume(tansu.bootstrap, "feed-single", stats.events)
        assert len(messages) == stats.events
        for key, value in messages:
            (ev,), errors = CODEC.decode(value)
            assert not errors and ev.user.encode() == key and not ev.pii_scrubbed

    async def test_batches_of_one_user(self, tansu: TansuBroker) -> None:
        """With ``batch``, a message is a JSON array of up to that many events of its key's user."""
        await create_topics(tansu.bootstrap, [("feed-batch", 3)])
        stats = await stream_to_kafka(tansu.bootstrap, "feed-batch", rate=4000, duration=1.0, seed=2, batch=10, staff=40)
        assert stats.events == 4000 and stats.messages < stats.events
        messages = await consume(tansu.bootstrap, "feed-batch", stats.events)
        total = 0
        for key, value in messages:
            events, errors = CODEC.decode(value)
            assert not errors and 1 <= len(events) <= 10
            assert {e.user.encode() for e in events} == {key}
            total += len(events)
        assert total == stats.events

    async def test_bad_arguments(self, tansu: TansuBroker) -> None:
        """A non-positive rate is refused before anything is sent."""
        with pytest.raises(ValueError, match="rate"):
            await stream_to_kafka(tansu.bootstrap, "feed-x", rate=0, duration=1)
