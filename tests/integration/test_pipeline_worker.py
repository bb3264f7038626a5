"""``leakwatch worker`` as a real process: HTTP endpoints, metrics, SIGTERM, kill -9 and restart.

The worker runs as ``python -m leakwatch worker`` configured through
``LEAKWATCH_*`` variables, against both brokers (``broker`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from pipeline_support import (
    TopicReader,
    alert_ids,
    committed_offsets,
    create_topics,
    escalated,
    expected_alerts,
    http_get,
    make_settings,
    produce_events,
    produce_raw,
    settings_env,
    synthetic_events,
    without_evidence,
)
from prometheus_client.parser import text_string_to_metric_families

from detectors.testing import event
from leakwatch import __version__
from schemas.mynumber import MYNUMBER_PATTERN, contains_twelve_digits
from streams.brokers import BrokerProcess
from streams.config import Settings
from streams.produce import partition_for

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


class Worker:
    """One ``leakwatch worker`` child process with its log in a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{settings.web_port}"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leakwatch", "worker"],
                env=settings_env(settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def log_tail(self, n: int = 40) -> str:
        """The last lines of the worker's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    async def wait_ready(self, timeout: float = 90.0) -> None:
        """Until /readyz answers 200 (fails with the log tail if the process dies)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = await asyncio.to_thread(http_get, self.base + "/readyz", 1.0)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.3)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: (sample name, sorted labels) -> value."""
        status, body = await asyncio.to_thread(http_get, self.base + "/metrics")
        assert status == 200, status
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker ignored SIGTERM for {timeout}s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """kill -9."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    """Worker processes started by a test; any still running are killed afterwards."""
    started: list[Worker] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def _sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


class TestWorkerProcess:
    """The worker's HTTP endpoints and metrics, and a graceful stop."""

    async def test_metrics_health_and_sigterm(self, broker: BrokerProcess, workers: list[Worker], tmp_path: Path) -> None:
        """/healthz and /readyz answer 200, counters move by the expected amounts, SIGTERM commits and exits 0."""
        settings = make_settings(broker, "proc", log_level="info")
        await create_topics(settings)
        worker = Worker(settings, tmp_path / "worker.log")
        workers.append(worker)
        await worker.wait_ready()
        status, body = await asyncio.to_thread(http_get, worker.base + "/healthz")
        assert status == 200 and orjson.loads(body)["status"] == "ok"
        ready = orjson.loads((await asyncio.to_thread(http_get, worker.base + "/readyz"))[1])
        assert ready["ready"] and ready["broker_reachable"] and len(ready["partitions"]) == 2 * settings.partitions

        events = synthetic_events(seed=3, days=4, staff=30)
        expected = expected_alerts(settings, events)
        before = await worker.metrics()
        ends: dict[Any, int] = {}
        await produce_events(settings, events, ends=ends)
        await produce_raw(settings, settings.topic_operation, [(b"u-x", b"{oops"), (b"u-x", b'{"event_id": "x"}')], ends=ends)
        async with TopicReader(settings, settings.topic_alerts) as alerts:
            await alerts.until(lambda r: len(r) >= len(expected))

        async def consumed() -> float:
            return _sum(await worker.metrics(), "leakwatch_events_consumed_total")

        deadline = time.monotonic() + 60
        while await consumed() < len(events) + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        await asyncio.sleep(5.5)  # one lag refresh
        after = await worker.metrics()

        def delta(name: str, **labels: str) -> float:
            return _sum(after, name, **labels) - _sum(before, name, **labels)

        assert delta("leakwatch_events_consumed_total", topic=settings.topic_access) == len(events)
        assert delta("leakwatch_events_consumed_total", topic=settings.topic_operation) == 2
        assert delta("leakwatch_events_invalid_total", reason="json") == 1
        assert delta("leakwatch_events_invalid_total", reason="ts.required") == 1
        assert delta("leakwatch_alerts_total") == len(expected)
        for (rule_id, severity), n in Counter((a.rule_id, a.severity) for a in expected).items():
            assert delta("leakwatch_alerts_total", rule_id=rule_id, severity=severity) == n
        assert delta("leakwatch_alerts_escalated_total") == len(escalated(settings, expected))
        assert delta("leakwatch_detector_events_total", detector="repeated_queries") > 0
        assert delta("leakwatch_batch_size_count") >= 1
        assert delta("leakwatch_detector_seconds_count", detector="all") >= 1
        assert delta("leakwatch_event_to_alert_latency_seconds_count") == len(expected)
        assert _sum(after, "leakwatch_build_info", version=__version__) == 1
        assert _sum(after, "leakwatch_users_tracked") > 0 and _sum(after, "leakwatch_state_bytes") > 0
        lag = {(dict(lbls)["topic"], dict(lbls)["partition"]) for (n, lbls), _ in after.items() if n == "leakwatch_consumer_lag"}
        assert lag == {(t, str(p)) for t in settings.input_topics for p in range(settings.partitions)}
        assert _sum(after, "leakwatch_consumer_lag") == 0
        labels = {k for (_, lbls) in after for k, _ in lbls}
        assert not labels & {"user", "subject", "terminal"}
        body = (await asyncio.to_thread(http_get, worker.base + "/metrics"))[1]
        assert not MYNUMBER_PATTERN.search(body.decode())  # long float digits are fine; a standalone 12-digit run is not

        assert await asyncio.to_thread(worker.terminate) == 0
        assert await committed_offsets(settings) == ends
        log = worker.log_path.read_text()
        for line in log.splitlines():
            if line.startswith("{"):
                doc = orjson.loads(line)
                assert "level" in doc and "timestamp" in doc
        assert '"event":"detection stopped"' in log
        assert not contains_twelve_digits(log.encode())


class TestCrashRecovery:
    """kill -9 in the middle of a backlog, then a restart: nothing lost, nothing counted twice."""

    async def test_kill9_and_restart(self, broker: BrokerProcess, workers: list[Worker], tmp_path: Path) -> None:
        """Alerts after the restart are the expected ones; a threshold crossed across the crash fires once at count 12."""
        settings = make_settings(broker, "kill", log_level="info")  # the restored partitions are logged
        await create_topics(settings)
        # A user whose twelve look-ups of one record (the default threshold) are split by the crash.
        target = "u-crash"
        target_p = partition_for(target.encode(), settings.partitions)

        def lookups(start: int, stop: int, day: str = "2024-12-10") -> list[Any]:
            return [
                event(f"{day}T10:{i:02d}:00+09:00", user=target, action="view", subject="r-watched", event_id=f"k{i}", terminal="172.16.9.9")
                for i in range(start, stop)
            ]

        history = synthetic_events(seed=3, days=5, staff=30)  # 2024-11-18 .. 11-22
        backlog = [
            ev
            for ev in synthetic_events(seed=3, days=10, staff=40, start=date(2024, 11, 25))
            if partition_for(ev.user.encode(), settings.partitions) != target_p
        ]
        phase1 = [*history, *lookups(0, 6)]
        phase3 = lookups(6, 12)
        expected = expected_alerts(settings, [*phase1, *backlog, *phase3])
        want = {(a.alert_id, a.revision): without_evidence(a.to_dict()) for a in expected}

        first = Worker(settings, tmp_path / "worker1.log")
        workers.append(first)
        await first.wait_ready()
        ends: dict[Any, int] = {}
        await produce_events(settings, phase1, ends=ends)
        deadline = time.monotonic() + 60
        while await committed_offsets(settings) != ends:
            assert time.monotonic() < deadline, first.log_tail()
            await asyncio.sleep(0.3)
        await produce_events(settings, backlog, ends=ends)
        first.kill()
        committed = await committed_offsets(settings)
        assert any(committed.get(tp, 0) < end for tp, end in ends.items()), "the kill should land mid-backlog"

        second = Worker(settings, tmp_path / "worker2.log")
        workers.append(second)
        await second.wait_ready()
        await produce_events(settings, phase3)
        async with TopicReader(settings, settings.topic_alerts) as alerts:
            try:
                await alerts.until(lambda r: set(alert_ids(r)) >= set(want), 120)
            except AssertionError:
                missing = sorted(set(want) - set(alert_ids(alerts.records)))
                detail = [{f: want[k][f] for f in ("rule_id", "user", "revision", "count")} for k in missing[:10]]
                raise AssertionError(
                    f"{len(missing)} expected alert revisions missing, e.g. {detail}; committed "
                    f"{sorted((await committed_offsets(settings)).items())} of {sorted(ends.items())}\n"
                    f"--- restarted worker log ---\n{second.log_tail(40)}"
                ) from None
            await alerts.settle(1.5)
        assert await asyncio.to_thread(second.terminate) == 0

        seen: set[tuple[str, int]] = set()
        for r in alerts.records:
            doc = orjson.loads(r.value)
            ident = (doc["alert_id"], doc["revision"])
            assert ident in want, f"unexpected alert revision {ident}: {without_evidence(doc)}"
            assert without_evidence(doc) == want[ident]
            seen.add(ident)
        assert seen == set(want)
        crossed = {(d["revision"], d["count"]) for d in (orjson.loads(r.value) for r in alerts.records) if d["user"] == target and d["rule_id"] == "repeated_queries"}
        assert crossed == {(1, 12)}
        assert "detection stopped" in second.log_path.read_text()
        assert os.path.getsize(first.log_path) > 0
