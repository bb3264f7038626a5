"""The detection host: decoding, validation and engines per partition, in process and in a child process."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import orjson
import pytest
from leakcheck import WRITTEN_FORMS

from detectors.engine import Engine, EngineSettings
from detectors.rules import load_rules
from detectors.testing import event
from schemas.event import Event, EventCodec, parse_ts
from schemas.mynumber import MYNUMBER_PATTERN, Pseudonymizer
from streams.engines import (
    BatchResult,
    DetectionHost,
    DetectionPool,
    DetectionProcessError,
    PartitionEngines,
)

KEY = b"test-engines-pseudonym-key-000000"
TOPIC = "access-events"


def _values() -> list[bytes | None]:
    """A night-time look-up sequence (off_hours fires), with every kind of bad message among it."""
    codec = EventCodec(Pseudonymizer(KEY))
    good = [codec.encode(event(f"2024-11-16T22:{m:02d}:00+09:00", user="night01", subject=f"r{m}", event_id=f"ev{m}")) for m in range(5)]
    array = orjson.dumps([orjson.loads(good[3]), {"user": "x"}])
    late = codec.encode(event("2024-11-16T19:00:00+09:00", user="night01", event_id="late1"))
    return [good[0], b"", b"{not json", b"[1]", b"42", good[1], good[2], array, good[4], late, None]


def _summary(results: list[BatchResult]) -> list[object]:
    return [(r.events, r.invalid, r.skipped, r.users, r.dead, r.actions, [a.to_json() for a in r.alerts]) for r in results]


class TestPartitionEngines:
    """One partition's raw values in, alerts and dead-letter rows out."""

    def test_dead_rows_name_record_element_and_reason(self) -> None:
        """Empty, non-JSON, non-object, invalid array elements and late events each get a row; good events are processed."""
        host = PartitionEngines(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY)
        host.restore(0, [], {}, None)
        values = _values()
        res = host.process(0, TOPIC, list(range(100, 100 + len(values))), values)
        rows = {(i, j, code) for i, j, code, _reason, _field, _eid in res.dead}
        assert (1, None, "$.empty") in rows
        assert (2, None, "json") in rows
        assert (3, 0, "$.an") in rows  # [1]: its element is not an object
        assert (4, None, "$.an") in rows  # 42
        assert (7, 1, "ts.required") in rows  # the array's second element
        assert (9, None, "late") in rows
        assert (10, None, "$.empty") in rows  # a tombstone
        assert res.events == 6 and res.invalid == 6
        assert {a.rule_id for a in res.alerts} == {"off_hours"}
        late = [r for r in res.dead if r[2] == "late"]
        assert late[0][5] == "late1" and late[0][4] == "ts"

    @pytest.mark.parametrize("ensure_ascii", [False, True], ids=["utf-8", "escaped"])
    def test_every_written_form_is_pseudonymised(self, ensure_ascii: bool) -> None:
        """Full-width, ideographically spaced or \\u-escaped numbers reach neither alerts nor checkpoints."""
        codec = EventCodec(Pseudonymizer(KEY))
        host = PartitionEngines(load_rules(), EngineSettings(), KEY)
        host.restore(0, [], {}, None)
        values: list[bytes | None] = []
        for m, form in enumerate(sorted(WRITTEN_FORMS)):
            doc = orjson.loads(codec.encode(event(f"2024-11-16T22:{m:02d}:00+09:00", user="night01", event_id=f"ev{m}")))
            doc["subject"] = f"番号{WRITTEN_FORMS[form]}"
            values.append(json.dumps(doc, ensure_ascii=ensure_ascii).encode())
        res = host.process(0, TOPIC, list(range(len(values))), values)
        assert res.events == len(WRITTEN_FORMS) and not res.dead
        last = max(res.alerts, key=lambda a: a.count)
        subjects = orjson.loads(last.to_json())["evidence"]["subjects"]
        token = Pseudonymizer(KEY).token("123456789018")
        assert subjects == [f"番号{token}"], "one number, one token, whatever its form"
        dumps, _, _ = host.checkpoint(0)
        for text in [a.to_json().decode() for a in res.alerts] + [d.decode() for _, d in dumps if d is not None]:
            assert not MYNUMBER_PATTERN.search(text)

    def test_event_far_ahead_of_its_message_is_dead_lettered(self) -> None:
        """An event more than ``max_ahead_ms`` after its Kafka timestamp is a ``ts.ahead`` dead letter and leaves the engine's time alone."""
        codec = EventCodec(Pseudonymizer(KEY))
        sent = parse_ts("2024-11-16T22:30:00+09:00")
        values: list[bytes | None] = [
            codec.encode(event("2024-11-16T22:00:00+09:00", user="a", event_id="ok-past")),
            codec.encode(event("2024-11-17T21:00:00+09:00", user="b", event_id="ok-ahead-22h30m")),
            codec.encode(event("2031-01-01T10:00:00+09:00", user="c", event_id="wrong-clock")),
            orjson.dumps([orjson.loads(codec.encode(event("2024-11-16T22:10:00+09:00", user="d", event_id="in-array"))),
                          orjson.loads(codec.encode(event("2024-11-18T22:10:00+09:00", user="d", event_id="array-ahead")))]),
            codec.encode(event("2031-01-01T10:00:00+09:00", user="e", event_id="no-timestamp")),
        ]  # fmt: skip
        stamps = [sent, sent, sent, sent, -1]
        host = PartitionEngines(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY, max_ahead_ms=86_400_000)
        host.restore(0, [], {}, None)
        res = host.process(0, TOPIC, list(range(len(values))), values, stamps)
        assert [(i, j, code, field, eid) for i, j, code, _r, field, eid in res.dead] == [
            (2, None, "ts.ahead", "ts", "wrong-clock"),
            (3, 1, "ts.ahead", "ts", "array-ahead"),
        ]
        assert res.dead[0][3] == "ahead: more than 1d after its Kafka message's timestamp (a wrong clock?)"
        assert res.events == 4 and res.invalid == 2
        assert host.slots[0].engine.max_ts == parse_ts("2031-01-01T10:00:00+09:00")  # unknown timestamp (-1): not checked
        off = PartitionEngines(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY)  # max_ahead_ms=0: no check
        off.restore(0, [], {}, None)
        assert off.process(0, TOPIC, list(range(len(values))), values, stamps).dead == []
        checked = PartitionEngines(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY, max_ahead_ms=86_400_000)
        checked.restore(0, [], {}, None)
        checked.process(0, TOPIC, list(range(4)), values[:4], stamps[:4])
        assert checked.slots[0].engine.max_ts == parse_ts("2024-11-17T21:00:00+09:00")

    def test_detector_bug_dead_letters_the_event(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An exception inside the detectors dead-letters that event (type and place, never its content) and the batch goes on."""
        real = Engine.process

        def buggy(self: Engine, ev: Event) -> None:
            if ev.event_id == "ev1":
                raise KeyError("4-secret-subject")
            real(self, ev)

        monkeypatch.setattr(Engine, "process", buggy)
        host = PartitionEngines(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY)
        host.restore(0, [], {}, None)
        values = _values()
        res = host.process(0, TOPIC, list(range(len(values))), values)
        (row,) = [r for r in res.dead if r[2] == "internal"]
        assert row[0] == 5 and row[5] == "ev1" and row[4] == "$"
        assert "KeyError at test_engines.py:" in row[3] and "secret" not in row[3]
        assert res.events == 5 and {a.rule_id for a in res.alerts} == {"off_hours"}

    def test_checkpoint_and_restore(self) -> None:
        """Dirty users' states dump, restore into a fresh host, and replayed events below ``asof`` are skipped."""
        rules = load_rules()
        settings = EngineSettings(lateness_ms=3_600_000)
        first = PartitionEngines(rules, settings, KEY)
        first.restore(3, [], {}, None)
        values = _values()
        first.process(3, TOPIC, list(range(len(values))), values)
        dumps, max_ts, users = first.checkpoint(3)
        assert users == 1 and [u for u, _ in dumps] == ["night01"] and max_ts > 0
        assert first.checkpoint(3)[0] == []  # nothing dirty any more
        second = PartitionEngines(rules, settings, KEY)
        res = second.restore(3, [(u, d, {TOPIC: len(values)}) for u, d in dumps], {TOPIC: 5}, max_ts)
        assert (res.users, res.unreadable, res.users_ahead, res.skip_max) == (1, 0, 1, {TOPIC: len(values)})
        replay = second.process(3, TOPIC, list(range(5, len(values))), values[5:])
        assert replay.skipped == 5 and replay.alerts == []  # every good event of the replay, the late one too

    def test_unreadable_state_is_reported(self) -> None:
        """A state that does not load is counted and named; the others load."""
        host = PartitionEngines(load_rules(), EngineSettings(), KEY)
        res = host.restore(0, [("bad", b"\x00garbage", {}), ("gone", None, {})], {}, None)
        assert (res.users, res.unreadable, res.unreadable_users) == (0, 1, ["bad"])
        assert res.errors


class TestDetectionHost:
    """The same results in process and in a child process; a dead child stops the worker."""

    async def _run(self, in_child: bool) -> list[object]:
        host = DetectionHost(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY, in_child=in_child)
        await host.start()
        try:
            assert (host.pid is not None) is in_child
            await host.restore(0, [], {}, None)
            await host.restore(1, [], {}, None)
            values = _values()
            host.submit([(0, TOPIC, list(range(len(values))), values), (1, TOPIC, [7], [values[0]])])
            assert host.busy
            with pytest.raises(RuntimeError):
                await host.checkpoint(0)  # the submitted batch must be collected first
            results = (await host.collect()).results
            dumps, _max_ts, users = await host.checkpoint(0)
            await host.drop([1])
            return [*_summary(results), users, [u for u, _ in dumps]]
        finally:
            await host.close()

    async def test_child_matches_in_process(self) -> None:
        """Alerts, dead rows, counts and checkpoints are identical either way."""
        local = await self._run(in_child=False)
        child = await self._run(in_child=True)
        assert child == local
        assert local[0][6]  # alerts were produced

    async def test_dead_child_raises(self) -> None:
        """If the child is killed, the next request fails with DetectionProcessError, not a hang."""
        host = DetectionHost(load_rules(), EngineSettings(), KEY, in_child=True)
        await host.start()
        try:
            assert host.pid is not None
            os.kill(host.pid, signal.SIGKILL)
            with pytest.raises(DetectionProcessError):
                await host.restore(0, [], {}, None)
        finally:
            await host.close()


def _night_batches(users: int, per_user: int, batches: int, pad: int = 0) -> list[list[tuple[int, str, list[int], list[bytes | None]]]]:
    """``batches`` batches of look-ups, each by ``users`` users with ``per_user`` events, over partitions 0-2.

    ``pad`` adds that many characters to each event's ``system`` field (to make batches megabytes).
    """
    codec = EventCodec(Pseudonymizer(KEY))
    out = []
    offset = {0: 0, 1: 0, 2: 0}
    for b in range(batches):
        jobs: dict[int, list[bytes | None]] = {0: [], 1: [], 2: []}
        for u in range(users):
            for k in range(per_user):
                minute = b * per_user + k
                ev = event(f"2024-11-16T22:{minute // 60 % 60:02d}:{minute % 60:02d}+09:00", user=f"u{u}", subject=f"r{k}", event_id=f"e{b}-{u}-{k}")
                value = codec.encode(ev) if not pad else orjson.dumps({**orjson.loads(codec.encode(ev)), "system": "s" * pad})
                jobs[u % 3].append(value)
        batch = []
        for number, values in jobs.items():
            batch.append((number, TOPIC, list(range(offset[number], offset[number] + len(values))), values))
            offset[number] += len(values)
        out.append(batch)
    return out


class TestPipelining:
    """Several batches submitted before the first is collected; checkpoints carried with a batch."""

    async def _run(self, children: int, batches: list[list[tuple[int, str, list[int], list[bytes | None]]]], depth: int) -> list[object]:
        rules, settings = load_rules(), EngineSettings(lateness_ms=3_600_000)
        pool = DetectionPool([DetectionHost(rules, settings, KEY, in_child=children > 0) for _ in range(max(children, 1))])
        await pool.start()
        out: list[object] = []
        try:
            for number in (0, 1, 2):
                await pool.restore(number, [], {}, None)
            pending = 0
            for i, batch in enumerate(batches):
                # a checkpoint with every third batch; the batch after one of them leaves partition 1 out
                jobs = [j for j in batch if not (i % 3 == 1 and j[0] == 1)]
                pool.submit(jobs, checkpoint=i % 3 == 0)
                pending += 1
                if pending == depth:
                    got = await pool.collect()
                    out.append((_summary(got.results), sorted((n, sorted(u for u, _ in d), ts, users) for n, (d, ts, users) in got.checkpoints.items())))
                    pending -= 1
            while pool.busy:
                got = await pool.collect()
                out.append((_summary(got.results), sorted((n, sorted(u for u, _ in d), ts, users) for n, (d, ts, users) in got.checkpoints.items())))
            for n in (0, 1, 2):
                out.append((n, sorted(u for u, _ in (await pool.checkpoint(n))[0])))
            return out
        finally:
            await pool.close()

    async def test_queued_batches_match_one_at_a_time(self) -> None:
        """Two or three batches in flight, on one or two children, give the results and checkpoints of one batch at a time in process."""
        batches = _night_batches(users=12, per_user=4, batches=7)
        reference = await self._run(0, batches, depth=1)
        assert any(c for _, c in reference[:-1])  # checkpoints did ride along
        assert any(r[6] for s, _ in reference[:-1] for r in s)  # and alerts were raised
        for children, depth in ((1, 2), (2, 2), (2, 3), (0, 3)):
            assert await self._run(children, batches, depth) == reference, (children, depth)

    async def test_checkpoint_with_batch_equals_separate_checkpoint(self) -> None:
        """A checkpoint carried with a batch holds what checkpoint() right after the batch would."""
        batch = _night_batches(users=5, per_user=3, batches=1)[0]
        a, b = PartitionEngines(load_rules(), EngineSettings(), KEY), PartitionEngines(load_rules(), EngineSettings(), KEY)
        for host in (a, b):
            for number in (0, 1, 2):
                host.restore(number, [], {}, None)
        carried = a.process_many(batch, checkpoint=True)
        b.process_many(batch)
        assert carried.checkpoints == {n: b.checkpoint(n) for n in (0, 1, 2)}
        assert a.process_many([], checkpoint=True).checkpoints == {n: ([], b.checkpoint(n)[1], b.checkpoint(n)[2]) for n in (0, 1, 2)}

    async def test_ready_says_when_results_wait(self) -> None:
        """``ready()`` is false with nothing submitted and true once the oldest batch's results are back, in process or in children."""
        batch = _night_batches(users=6, per_user=2, batches=1)[0]
        for children in (0, 2):
            pool = DetectionPool([DetectionHost(load_rules(), EngineSettings(), KEY, in_child=children > 0) for _ in range(max(children, 1))])
            await pool.start()
            try:
                for number in (0, 1, 2):
                    await pool.restore(number, [], {}, None)
                assert not pool.ready()
                pool.submit(batch)
                pool.submit(batch[:1])
                for _ in range(600):
                    if pool.ready():
                        break
                    await asyncio.sleep(0.05)
                assert pool.ready()
                assert len((await pool.collect()).results) == 3
                assert len((await pool.collect()).results) == 1
                assert not pool.ready()
            finally:
                await pool.close()

    async def test_close_with_batches_in_flight(self) -> None:
        """Closing a host with uncollected batches lets the child finish them and stop; nothing is left running."""
        batches = _night_batches(users=100, per_user=4, batches=2, pad=400)
        host = DetectionHost(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY, in_child=True)
        await host.start()
        pid = host.pid
        assert pid is not None
        for number in (0, 1, 2):
            await host.restore(number, [], {}, None)
        for batch in batches:
            host.submit(batch, checkpoint=True)
        await asyncio.wait_for(host.close(), 60)
        assert not host.busy and host.pid is None
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid, 0)  # until it is reaped
                await asyncio.sleep(0.05)

    async def test_megabyte_batches_and_replies_do_not_deadlock(self) -> None:
        """Batches and checkpoint replies far larger than the pipe's buffer, three in flight, all come back in order.

        Were requests written from the event loop itself, the worker would block
        writing the second batch while the child blocks writing the first reply.
        """
        batches = _night_batches(users=300, per_user=6, batches=3, pad=500)
        assert sum(len(v or b"") for j in batches[0] for v in j[3]) > 1_000_000
        host = DetectionHost(load_rules(), EngineSettings(lateness_ms=3_600_000), KEY, in_child=True)
        await host.start()
        try:
            for number in (0, 1, 2):
                await host.restore(number, [], {}, None)
            for batch in batches:
                host.submit(batch, checkpoint=True)
            assert host.submitted == 3
            got = [await asyncio.wait_for(host.collect(), 120) for _ in batches]
            assert [sum(r.events for r in g.results) for g in got] == [1800] * 3
            assert [len(g.checkpoints[0][0]) for g in got] == [100] * 3  # every user of partition 0 changed in every batch
            assert not host.busy
        finally:
            await host.close()


class TestDetectionPool:
    """Partitions spread over several children; results as from one host."""

    async def _run(self, children: int) -> list[object]:
        rules, settings = load_rules(), EngineSettings(lateness_ms=3_600_000)
        pool = DetectionPool([DetectionHost(rules, settings, KEY, in_child=children > 0) for _ in range(max(children, 1))])
        await pool.start()
        try:
            assert len(pool.pids) == children
            for number in (0, 1, 2):
                await pool.restore(number, [], {}, None)
            values = _values()
            other = [codec_value(m) for m in range(3)]
            pool.submit([(2, TOPIC, [0, 1, 2], other), (0, TOPIC, list(range(len(values))), values), (1, TOPIC, [7], [values[0]])])
            assert pool.busy
            with pytest.raises(RuntimeError):
                await pool.checkpoint(0)
            results = (await pool.collect()).results
            assert not pool.busy
            dumps = [await pool.checkpoint(n) for n in (0, 1, 2)]
            await pool.drop([1, 2])
            await pool.restore(3, [], {}, None)  # placed where the dropped ones left room
            return [*_summary(results), [(sorted(u for u, _ in d), users) for d, _ts, users in dumps]]
        finally:
            await pool.close()

    async def test_two_children_match_in_process(self) -> None:
        """Jobs for partitions on different children come back in submission order, identical to one in-process host."""
        local = await self._run(0)
        assert await self._run(2) == local
        assert local[0][0] == 3 and local[1][0] == 6  # the jobs' own results, in order

    async def test_least_loaded_placement(self) -> None:
        """A new partition goes to the child holding the fewest; a dropped one frees its place."""
        pool = DetectionPool([DetectionHost(load_rules(), EngineSettings(), KEY, in_child=False) for _ in range(2)])
        for number in (0, 1, 2):
            await pool.restore(number, [], {}, None)
        assert pool._placed == {0: 0, 1: 1, 2: 0}
        await pool.drop([0, 2])
        await pool.restore(5, [], {}, None)
        assert pool._placed == {1: 1, 5: 0}


def codec_value(minute: int) -> bytes:
    """One night-time look-up of another user (for a second partition)."""
    return EventCodec(Pseudonymizer(KEY)).encode(event(f"2024-11-16T23:{minute:02d}:00+09:00", user="night02", subject="r9", event_id=f"o{minute}"))
