"""The detection loop on real brokers: events in, alerts, dead letters and checkpoints out.

Runs :class:`streams.detection.DetectionLoop` in the test's process against
both brokers (``broker`` fixture). Expected alerts come from running the
detector engine offline over the same events (see ``pipeline_support``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from pipeline_support import (
    TopicReader,
    alert_ids,
    codec,
    committed_offsets,
    create_topics,
    escalated,
    expected_alerts,
    make_settings,
    message_plan,
    produce_events,
    produce_raw,
    running_loop,
    sent_order,
    synthetic_events,
    wait_until,
    without_evidence,
)

from detectors.testing import event
from schemas.event import format_ts, parse_ts
from schemas.mynumber import contains_twelve_digits
from streams import metrics
from streams.brokers import BrokerProcess
from streams.detection import CHECKPOINT_META, USER_KEY_PREFIX, DetectionLoop

pytestmark = pytest.mark.timeout(240)


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers or ()}


def _records_view(records: list[Any]) -> list[tuple[bytes, bytes, str]]:
    return sorted((r.key, r.value, _headers(r)["revision"]) for r in records)


def _alerts_view(alerts: list[Any]) -> list[tuple[bytes, bytes, str]]:
    return sorted((a.alert_id.encode(), a.to_json(), str(a.revision)) for a in alerts)


class TestEventsToAlerts:
    """Events in, exactly the offline engine's alerts out, on leak-alerts and escalations."""

    @pytest.mark.parametrize("batch", [1, 25], ids=["single-event-messages", "array-messages"])
    async def test_expected_alerts_byte_for_byte(self, broker: BrokerProcess, batch: int) -> None:
        """Every expected alert arrives once, byte for byte, keyed by alert_id with a revision header."""
        settings = make_settings(broker, f"pipe{batch}")
        await create_topics(settings)
        events = synthetic_events()
        plan = message_plan(settings, events, batch)
        expected = expected_alerts(settings, sent_order(plan))
        expected_esc = escalated(settings, expected)
        assert len(expected) > 20 and expected_esc, "the synthetic scenarios should raise alerts"
        async with running_loop(settings) as loop:
            await produce_events(settings, plan=plan, batch=batch)
            async with TopicReader(settings, settings.topic_alerts) as alerts, TopicReader(settings, settings.topic_escalations) as esc:
                await alerts.until(lambda r: len(r) >= len(expected))
                await esc.until(lambda r: len(r) >= len(expected_esc))
                await wait_until(lambda: loop.stats.events == len(events), 30, "all events processed")
                await alerts.settle(1.0)
                await esc.settle(0.2)
        assert _records_view(alerts.records) == _alerts_view(expected)
        assert _records_view(esc.records) == _alerts_view(expected_esc)
        assert loop.stats.dead_letters == 0
        consumed = sum(
            metrics.REGISTRY.get_sample_value("leakwatch_events_consumed_total", {"topic": t}) or 0 for t in settings.input_topics
        )
        assert consumed == len(events)

    async def test_alerts_carry_no_personal_number(self, broker: BrokerProcess) -> None:
        """A 12-digit number in a subject is pseudonymised: the alert evidence has the token, not the number."""
        settings = make_settings(broker, "pii")
        await create_topics(settings)
        number = "1234 5678 9018"
        c = codec()
        raw = [
            orjson.dumps(
                {
                    "event_id": f"pii-{i}",
                    "ts": f"2024-11-19T10:{i:02d}:00+09:00",
                    "user": "u-pii",
                    "terminal": "172.16.1.10",
                    "action": "view",
                    "result": "success",
                    "mynumber_ref": True,
                    "subject": number,
                }
            )
            for i in range(12)
        ]
        async with running_loop(settings):
            await produce_raw(settings, settings.topic_access, [(b"u-pii", v) for v in raw])
            async with TopicReader(settings, settings.topic_alerts) as alerts:
                await alerts.until(lambda r: any(orjson.loads(x.value)["rule_id"] == "repeated_queries" for x in r))
                await alerts.settle(0.5)
        token = c.pseudonymizer.token(number)
        repeated = [orjson.loads(r.value) for r in alerts.records if orjson.loads(r.value)["rule_id"] == "repeated_queries"]
        assert repeated[0]["evidence"]["subjects"] == [token]
        for r in alerts.records:
            assert not contains_twelve_digits(r.value)
            assert number.replace(" ", "") not in r.value.decode()


class TestDeadLetters:
    """Malformed and late events go to the dead-letter topic with their original bytes; the loop keeps going."""

    async def test_malformed_and_late_events(self, broker: BrokerProcess) -> None:
        """Bad JSON, missing field, wrong type, a personal number as timestamp, bad array elements, late and wrong-clock events: all dead-lettered."""
        settings = make_settings(broker, "dlq")
        await create_topics(settings)

        def doc(i: int, minute: int, **changes: Any) -> dict[str, Any]:
            base: dict[str, Any] = {
                "event_id": f"d{i}",
                "ts": f"2024-11-19T13:{minute:02d}:00+09:00",
                "user": "u-dlq",
                "terminal": "172.16.1.20",
                "action": "view",
                "result": "success",
                "mynumber_ref": True,
                "subject": "r-abc",
            }
            base.update(changes)
            return {k: v for k, v in base.items() if v is not None}

        missing = doc(3, 3, terminal=None)
        bad_messages: list[tuple[bytes | None, str, str, str]] = [
            # (value, code, field, reason prefix)
            (b'{"event_id": "d2", "ts": ', "json", "$", "invalid JSON"),
            (orjson.dumps(missing), "terminal.required", "terminal", "required field is missing"),
            (orjson.dumps(doc(4, 4, mynumber_ref="yes")), "mynumber_ref.must", "mynumber_ref", "must be true or false"),
            (orjson.dumps(doc(5, 5, ts="123456789012")), "ts.not", "ts", "not an RFC 3339 timestamp: 'mn_"),
            (b"42", "$.an", "$", "an event must be a JSON object"),
            (orjson.dumps(doc(6, 6, surname="x")), "unknown_field", "surname", "unknown field"),
            (None, "$.empty", "$", "empty message"),
        ]
        array_message = orjson.dumps([doc(7, 7), doc(8, 8, result="maybe")])
        late_message = orjson.dumps(doc(9, 0, ts="2024-11-19T09:00:00+09:00"))  # 4 h behind the user's newest event
        messages: list[bytes | None] = [orjson.dumps(doc(1, 1))]
        messages += [m[0] for m in bad_messages]
        # Years after the message's Kafka timestamp (now): a wrong clock.
        ahead_message = orjson.dumps(doc(11, 0, ts=f"{datetime.now(UTC).year + 5}-01-01T10:00:00+09:00"))
        messages += [array_message, orjson.dumps(doc(10, 10, ts="2024-11-19T13:10:00+09:00")), late_message, ahead_message]
        # Ten more look-ups of the same record afterwards: the loop still detects.
        messages += [orjson.dumps(doc(20 + i, 20 + i, ts=f"2024-11-19T13:{20 + i:02d}:00+09:00")) for i in range(10)]

        invalid_before = {
            code: metrics.REGISTRY.get_sample_value("leakwatch_events_invalid_total", {"reason": code}) or 0
            for code in {b[1] for b in bad_messages} | {"result.must", "late", "ts.ahead"}
        }
        async with running_loop(settings) as loop:
            await produce_raw(settings, settings.topic_access, [(b"u-dlq", m) for m in messages])
            async with TopicReader(settings, settings.topic_dlq) as dlq, TopicReader(settings, settings.topic_alerts) as alerts:
                await dlq.until(lambda r: len(r) >= len(bad_messages) + 3)
                await alerts.until(lambda r: any(orjson.loads(x.value)["rule_id"] == "repeated_queries" for x in r))
                await dlq.settle(0.5)
            assert loop.running

        by_offset = {int(_headers(r)["source_offset"]): r for r in dlq.records}
        assert len(by_offset) == len(dlq.records) == len(bad_messages) + 3
        partition = {int(_headers(r)["source_partition"]) for r in dlq.records}
        assert len(partition) == 1
        for offset, (value, code, fieldname, reason) in enumerate(bad_messages, start=1):
            record = by_offset[offset]
            h = _headers(record)
            assert record.value == value
            assert record.key == b"u-dlq"
            assert (h["code"], h["field"], h["source_topic"]) == (code, fieldname, settings.topic_access)
            assert h["reason"].startswith(reason)
        array = by_offset[len(bad_messages) + 1]
        assert array.value == array_message
        assert (_headers(array)["index"], _headers(array)["field"]) == ("1", "result")
        late = by_offset[len(bad_messages) + 3]
        assert late.value == late_message
        assert _headers(late)["reason"] == "late: beyond allowed lateness"
        assert _headers(late)["event_id"] == "d9"
        ahead = by_offset[len(bad_messages) + 4]
        assert ahead.value == ahead_message
        assert (_headers(ahead)["code"], _headers(ahead)["field"], _headers(ahead)["event_id"]) == ("ts.ahead", "ts", "d11")
        assert metrics.REGISTRY.get_sample_value("leakwatch_events_invalid_total", {"reason": "ts.ahead"}) == invalid_before["ts.ahead"] + 1
        for record in dlq.records:
            for _, v in record.headers:
                assert not contains_twelve_digits(v)
        assert metrics.REGISTRY.get_sample_value("leakwatch_events_invalid_total", {"reason": "late"}) == invalid_before["late"] + 1
        counts = Counter(b[1] for b in bad_messages)
        for code, n in counts.items():
            assert metrics.REGISTRY.get_sample_value("leakwatch_events_invalid_total", {"reason": code}) == invalid_before[code] + n


class TestRebalance:
    """Two workers in one group, the second joining while events flow."""

    async def test_second_worker_joins_mid_stream(self, broker: BrokerProcess) -> None:
        """Every expected alert appears; duplicates from replays are identical per (alert_id, revision)."""
        settings = make_settings(broker, "rebal")
        await create_topics(settings)
        events = synthetic_events(seed=3, days=10, staff=30)
        expected = expected_alerts(settings, events)
        want = {(a.alert_id, a.revision): without_evidence(a.to_dict()) for a in expected}
        third = len(events) // 3
        async with running_loop(settings) as first:
            await produce_events(settings, events[:third])
            feeding = asyncio.ensure_future(produce_events(settings, events[third:]))
            async with running_loop(settings) as second:
                await feeding
                async with TopicReader(settings, settings.topic_alerts) as alerts:
                    await alerts.until(lambda r: set(alert_ids(r)) >= set(want), timeout=120)
                    await wait_until(lambda: first.assigned and second.assigned, 60, "the rebalance to settle")
                    owned_first = {tp for part in first.parts.values() for tp in part.tps}
                    owned_second = {tp for part in second.parts.values() for tp in part.tps}
                    await alerts.settle(1.0)
        all_tps = {TopicPartition(t, p) for t in settings.input_topics for p in range(settings.partitions)}
        assert owned_first and owned_second, "both workers own partitions after the rebalance"
        assert owned_first.isdisjoint(owned_second) and owned_first | owned_second == all_tps
        for owned in (owned_first, owned_second):  # co-partitioned: both topics' partition p together
            assert {(t, tp.partition) for tp in owned for t in settings.input_topics} == {(tp.topic, tp.partition) for tp in owned}
        got: dict[tuple[str, int], dict[str, Any]] = {}
        for r in alerts.records:
            doc = orjson.loads(r.value)
            ident = (doc["alert_id"], doc["revision"])
            assert ident in want, f"unexpected alert revision {ident}: {without_evidence(doc)}"
            assert without_evidence(doc) == want[ident]
            got[ident] = doc
        assert set(got) == set(want)


class TestCheckpoints:
    """State goes to the compacted checkpoint topic and comes back on the next assignment."""

    async def test_restart_restores_state_and_offsets(self, broker: BrokerProcess) -> None:
        """A threshold crossed by look-ups split across a restart fires once, with the right count."""
        settings = make_settings(broker, "ckpt")
        await create_topics(settings)
        first = [event(f"2024-11-19T10:{i:02d}:00+09:00", user="u-ckpt", action="view", subject="r-1", event_id=f"c{i}") for i in range(6)]
        second = [event(f"2024-11-19T10:{i:02d}:00+09:00", user="u-ckpt", action="view", subject="r-1", event_id=f"c{i}") for i in range(6, 12)]
        async with running_loop(settings) as loop:
            await produce_events(settings, first)
            await wait_until(lambda: loop.stats.events == 6, 30, "first look-ups")
        assert loop.stats.checkpoints >= 1
        async with TopicReader(settings, settings.topic_checkpoints) as ckpt:
            await ckpt.until(lambda r: any(x.key == CHECKPOINT_META.encode() for x in r))
        keys = {r.key for r in ckpt.records}
        assert USER_KEY_PREFIX + b"u-ckpt" in keys
        meta = [orjson.loads(r.value) for r in ckpt.records if r.key == CHECKPOINT_META.encode()]
        assert meta[-1]["offsets"] == {settings.topic_access: 6}
        async with running_loop(settings) as again:
            assert again.stats.restored_users == 1
            await produce_events(settings, second)
            async with TopicReader(settings, settings.topic_alerts) as alerts:
                await alerts.until(lambda r: len(r) >= 1)
                await wait_until(lambda: again.stats.events == 6, 30, "second look-ups")
                await alerts.settle(0.5)
            assert again.stats.events == 6, "the first look-ups were not replayed"
        docs = [orjson.loads(r.value) for r in alerts.records if orjson.loads(r.value)["rule_id"] == "repeated_queries"]
        assert [(d["revision"], d["count"]) for d in docs] == [(1, 12)]  # the default threshold, crossed by the last look-up
        assert docs[0]["last_ts"] == format_ts(parse_ts("2024-11-19T10:11:00+09:00"))


    async def test_failed_checkpoint_delivery_stops_the_loop(self, broker: BrokerProcess) -> None:
        """A periodic checkpoint that cannot be delivered (in the background) stops the loop with the error, and nothing past the last delivered one is committed."""
        settings = make_settings(broker, "ckfail", checkpoint_interval=0.0)  # every batch carries a checkpoint
        await create_topics(settings)
        first = [event(f"2024-11-19T10:{i:02d}:00+09:00", user="u-ckfail", action="view", subject="r-1", event_id=f"f{i}") for i in range(4)]
        later = [event(f"2024-11-19T11:{i:02d}:00+09:00", user="u-ckfail", action="view", subject="r-2", event_id=f"g{i}") for i in range(4)]
        loop = DetectionLoop(settings, poll_timeout_ms=50)
        task = asyncio.ensure_future(loop.run())
        try:
            await wait_until(lambda: loop.assigned or task.done(), 60, "partition assignment")
            await produce_events(settings, first)
            for _ in range(300):
                if sum((await committed_offsets(settings)).values()) == len(first):
                    break
                await asyncio.sleep(0.1)
            committed = await committed_offsets(settings)
            assert sum(committed.values()) == len(first)

            assert loop.producer is not None
            real_send_batch = loop.producer.send_batch
            failures: list[int] = []

            async def broken(*args: Any, **kwargs: Any) -> Any:
                # Fails once: a transient failure must still stop the loop, since
                # the failed checkpoint's user states were taken out of the engine's dirty set.
                if not failures:
                    failures.append(1)
                    raise KafkaError("injected: checkpoint topic unwritable")
                return await real_send_batch(*args, **kwargs)

            loop.producer.send_batch = broken  # type: ignore[method-assign]
            await produce_events(settings, later)
            with pytest.raises(KafkaError, match="injected"):
                await asyncio.wait_for(asyncio.shield(task), 60)
            assert loop.stats.events == len(first) + len(later)  # the later events were processed, their checkpoint failed
            assert await committed_offsets(settings) == committed
        finally:
            loop.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)


class TestReadiness:
    """The loop reports ready only while it owns restored partitions and the broker answers."""

    async def test_ready_lifecycle(self, broker: BrokerProcess) -> None:
        """Not ready before start, ready once assigned, not ready after stop."""
        settings = make_settings(broker, "ready")
        await create_topics(settings)
        loop = DetectionLoop(settings, poll_timeout_ms=50)
        assert not loop.ready and loop.readiness()["ready"] is False
        task = asyncio.ensure_future(loop.run())
        await wait_until(lambda: loop.ready, 60, "ready")
        state = loop.readiness()
        assert state["broker_reachable"] and len(state["partitions"]) == 2 * settings.partitions
        loop.request_stop()
        await asyncio.wait_for(task, 30)
        assert not loop.ready and loop.readiness()["partitions"] == []
