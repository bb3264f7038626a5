"""The detection host: decoding, validation and engines per partition, in process and in a child process."""

from __future__ import annotations

import os
import signal

import orjson
import pytest

from detectors.engine import Engine, EngineSettings
from detectors.rules import load_rules
from detectors.testing import event
from schemas.event import Event, EventCodec
from schemas.mynumber import Pseudonymizer
from streams.engines import BatchResult, DetectionHost, DetectionProcessError, PartitionEngines

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
            results = await host.collect()
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
