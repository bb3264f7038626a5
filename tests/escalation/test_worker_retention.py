"""Bounded escalation state with a real worker, broker and SMTP server.

An acknowledged alert whose events ended longer than ``state_retention``
before the newest event is forgotten: its key's newest record on the state
topic becomes a tombstone (what compaction keeps), while unacknowledged and
recent alerts keep their state. A restarted worker starts from that topic
and mails nothing twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from escalation_kit import (
    MailSink,
    Received,
    WorkerProcess,
    latest_by_key,
    make_alert,
    produce_alerts,
)

from streams.brokers import BrokerProcess

DOMAIN = "city.example.lg.jp"
HOTLINE = f"hotline@{DOMAIN}"


def deliveries(sink: MailSink) -> Counter[tuple[str, str]]:
    """How often each (Message-ID, recipient) was delivered."""
    return Counter((r.message_id, rcpt) for r in sink.snapshot() for rcpt in r.rcpt_tos)


class TestRetention:
    """Acknowledged old alerts leave memory and the state topic; the others stay."""

    async def test_acknowledged_old_alert_tombstoned(self, broker: BrokerProcess, sink: MailSink, tmp_path: Path) -> None:
        """Acked and a week older than the newest event: tombstoned; unacked old and recent ones kept, across a restart."""
        worker = WorkerProcess(
            tmp_path,
            broker.bootstrap,
            sink,
            {"hotline": [HOTLINE], "digest_threshold": 0, "state_retention": "1d", "state_sweep_interval": "200ms"},
        )
        old_acked = make_alert("retention-acked", day="2024-05-04")
        old_open = make_alert("retention-open", day="2024-05-04")
        recent = make_alert("retention-recent", day="2024-05-10")
        alerts = (old_acked, old_open, recent)
        state_topic = worker.mail_topics["topic_state"]
        try:
            await worker.start()
            await produce_alerts(broker.bootstrap, worker.escalations, alerts)
            await sink.wait_for(lambda _: all(sink.about(a.alert_id) for a in alerts), 60, "the three first mails")
            await asyncio.sleep(1.0)  # several sweeps: nothing is acknowledged yet, nothing may go
            latest = await latest_by_key(broker.bootstrap, state_topic)
            assert all(latest.get(a.alert_id) is not None for a in alerts), "forgotten before anybody acknowledged"

            done = await worker.cli("ack", old_acked.alert_id, "--by", "山田")
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 30
            while (latest := await latest_by_key(broker.bootstrap, state_topic)).get(old_acked.alert_id) is not None:
                assert time.monotonic() < deadline, f"no tombstone for the acknowledged alert:\n{worker.log_tail()}"
                await asyncio.sleep(0.3)
            assert old_acked.alert_id in latest, "the alert's key must stay on the topic as a tombstone"
            assert latest[old_open.alert_id]["alert"]["alert_id"] == old_open.alert_id
            assert latest[recent.alert_id]["alert"]["alert_id"] == recent.alert_id
            while "escalation state forgotten" not in worker.log_text():  # logged just after the send is acknowledged
                assert time.monotonic() < deadline, f"the sweep did not log what it forgot:\n{worker.log_tail()}"
                await asyncio.sleep(0.1)

            worker.stop()
            await worker.start()
            grown = make_alert("retention-open", day="2024-05-04", count=9, revision=2)
            await produce_alerts(broker.bootstrap, worker.escalations, [grown])

            def update(_: list[Received]) -> bool:
                return any(r.message_id == f"<{old_open.alert_id}.update-r2@{DOMAIN}>" for r in sink.snapshot())

            await sink.wait_for(update, 60, "the update of the unacknowledged alert after the restart")
            await asyncio.sleep(1.0)
            after = await latest_by_key(broker.bootstrap, state_topic)
        finally:
            worker.stop()
        assert after[old_acked.alert_id] is None, "the restarted worker wrote the forgotten alert back"
        firsts = Counter(r.alert_id for r in sink.snapshot() if r.message_id.endswith(f".alert@{DOMAIN}>"))
        assert firsts == Counter({a.alert_id: 1 for a in alerts})
        assert not {k: n for k, n in deliveries(sink).items() if n > 1}
        (upd,) = [r for r in sink.snapshot() if ".update-r2@" in r.message_id]
        assert upd.msg["In-Reply-To"] == f"<{old_open.alert_id}.alert@{DOMAIN}>"
