"""``leakwatch produce`` and ``leakwatch demo`` as a user runs them, and the cross-topic state.

``produce`` ships the bundled PPC sample into a test topic on both brokers;
``demo`` starts its own embedded broker and stops by itself (``--duration``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pipeline_support import (
    TopicReader,
    codec,
    create_topics,
    make_settings,
    producer_for,
    running_loop,
    settings_env,
    wait_until,
)

from detectors.testing import event
from streams.brokers import BrokerProcess, free_port

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "ppc_log_sample.tsv"


class TestProduceCommand:
    """``leakwatch produce`` reads an export and ships one event per message (or arrays)."""

    @pytest.mark.parametrize("batch", [1, 3])
    async def test_ppc_sample(self, broker: BrokerProcess, batch: int) -> None:
        """Every row of the PPC sample arrives keyed by its user; counts are printed."""
        settings = make_settings(broker, f"produce{batch}")
        await create_topics(settings)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "leakwatch", "produce", str(SAMPLE), "--topic", settings.topic_access, "--batch", str(batch)],
            env=settings_env(settings),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        rows = len(SAMPLE.read_text(encoding="utf-8").strip().splitlines()) - 1
        assert f"sent {rows} events in " in proc.stdout
        async with TopicReader(settings, settings.topic_access) as reader:
            await reader.until(lambda r: sum(len(orjson.loads(x.value)) if batch > 1 else 1 for x in r) >= rows)
            await reader.settle(0.5)
        events = 0
        for r in reader.records:
            docs = orjson.loads(r.value)
            docs = docs if isinstance(docs, list) else [docs]
            assert len(docs) <= batch
            assert {d["user"].encode() for d in docs} == {r.key}
            events += len(docs)
        assert events == rows


class TestCrossTopicState:
    """A user's events on both input topics meet in one engine: one finding, one alert id."""

    async def test_lookup_and_export_on_two_topics(self, broker: BrokerProcess) -> None:
        """Night look-ups (access topic) and a night print (operation topic) count into one off-hours finding."""
        settings = make_settings(broker, "xtopic")
        await create_topics(settings)
        c = codec()
        lookups = [event(f"2024-11-19T22:0{i}:00+09:00", user="u-x", action="view", subject="r-1", event_id=f"x{i}") for i in range(3)]
        printed = event("2024-11-19T22:05:00+09:00", user="u-x", action="print_screen", subject="r-1", event_id="x9")
        async with running_loop(settings) as loop:
            producer = await producer_for(settings)
            try:
                for ev in lookups:
                    await producer.send_and_wait(settings.topic_access, c.encode(ev), key=b"u-x")
                await wait_until(lambda: loop.stats.events == 3, 30, "look-ups processed")
                await producer.send_and_wait(settings.topic_operation, c.encode(printed), key=b"u-x")
            finally:
                await producer.stop()
            async with TopicReader(settings, settings.topic_alerts) as alerts:
                await alerts.until(lambda r: any(orjson.loads(x.value)["count"] == 4 and orjson.loads(x.value)["rule_id"] == "off_hours" for x in r))
                await alerts.settle(0.5)
        off_hours = [orjson.loads(r.value) for r in alerts.records if orjson.loads(r.value)["rule_id"] == "off_hours"]
        assert len({d["alert_id"] for d in off_hours}) == 1
        assert [(d["revision"], d["count"]) for d in off_hours] == [(1, 1), (2, 2), (3, 4)]


class TestDemoCommand:
    """``leakwatch demo --duration`` runs the whole thing and stops by itself."""

    def test_demo_runs_and_stops(self) -> None:
        """Exit 0, the addresses are printed, alerts arrive with Japanese titles, the worker stops cleanly."""
        proc = subprocess.run(
            [sys.executable, "-m", "leakwatch", "demo", "--duration", "30", "--days", "7", "--staff", "40", "--web-port", str(free_port())],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=200,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert "/metrics" in out and "alerts topic:" in out
        assert "の個人番号参照" in out or "繰り返し参照" in out
        assert "worker exit status 0" in out
