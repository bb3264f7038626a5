"""Escalation to the risk hotline: mail, digests, timed escalation, acks.

``register(app, settings)`` adds :class:`EscalationService` to a Faust app
(started and stopped with it) and the ``/ack/<token>`` page to its web
server. The service reads the ``escalations`` topic (alerts at or above the
escalation severity, key ``alert_id``, value :meth:`Alert.to_json`) and mails
them; :mod:`streams.mailer` composes and sends, :mod:`streams.ack` handles
acknowledgments, :mod:`streams.audit` records everything.

Delivery: at least once, without duplicates
-------------------------------------------
Kafka holds the backlog. The service consumes ``escalations`` with its own
aiokafka consumer (group ``<group_id>-escalation``, auto-commit off) and
commits an offset only when every mail the record asked for has been
*recorded*: accepted by the SMTP server (or refused permanently and sent to
the mail DLQ) and written to the state topic. A record whose mail is not
out yet (SMTP down, waiting in a digest) holds its partition's commit point
(:class:`CommitTracker`), so a crash never loses it: it is read again.

What has been sent is kept in ``escalation-state``, a compacted topic keyed by
alert id (:class:`AlertState`): the recipients each mail id (``<alert>/alert``,
``<alert>/update/r<rev>``, ``<alert>/step/<n>``) has reached, when the first
mail went out, its Message-ID (thread root), the revision and count last
mailed and the escalation tiers reached. On start every worker reads the
state topic (and ``acks``) to its end before consuming, and keeps tailing
both. Before sending, the recipients already reached for that mail id are
removed, so records read again after a crash, and duplicated
``(alert_id, revision)`` records, send nothing twice. The one window left is
a crash between the SMTP server's "250 OK" and the state write (milliseconds);
the mail's Message-ID is deterministic, so a receiving system can drop that
duplicate.

Timers
------
Tier ``n`` is due ``tiers[n].after`` after the alert's first mail unless the
alert is acknowledged. The first-mail time and the tiers reached live in the
state topic, so pending timers survive restarts and move with their
partition on a rebalance: a worker only fires timers (and sends) for alerts
of the ``escalations`` partitions assigned to it, and on assignment first
reads the state topic to its end so it sees the previous owner's last writes.
Timers are checked every ``tick_interval`` against an injectable wall clock
(operational time; detection never reads the clock). Faust tables are not
used: plain dicts plus the compacted topic.

Storms
------
Critical alerts are always mailed at once, one mail each. Other mails go out
one by one until ``digest_threshold`` of them went out within
``digest_window``; after that they are collected per recipient set and sent
as one digest ``digest_window`` after the first one was collected.

Retention
---------
Acknowledged alerts (closing one in the console acknowledges it) are
forgotten once their events ended ``state_retention`` (default 30 days)
before the newest event the service knows, in event time, so replaying old
logs does not empty the memory and an event stamped in the future cannot
either (the newest event time counts at most up to the wall clock). Beyond
``state_max_alerts`` the oldest acknowledged alerts go first, whatever their
age. Unacknowledged alerts are never forgotten: they are still owed
escalation steps and counted by the gauges. Only the owner of an alert's
partition forgets it, every ``state_sweep_interval``, and writes a tombstone
(key alert id, no value) to the state topic; every worker drops the alert
when it reads the tombstone, and compaction removes its records. Acks of
alerts nobody remembers are dropped from memory after ``state_retention`` of
wall-clock time (the acks topic keeps them). A revision of a forgotten alert
arriving later is mailed as a new alert: the detection does not revise an
alert whose window has been closed for that long, short of a replay.

SMTP failures
-------------
Unreachable relay or a 4xx for the whole transaction: everything waits with
exponential backoff (``retry_initial`` doubling to ``retry_max``); nothing is
committed past the unsent alerts. A 4xx for one recipient: that recipient is
retried on its own; after ``retry_give_up`` it counts as permanent. A 5xx
for a recipient: a record on ``mail-dlq`` with the reason, ``MAILS_FAILED``,
an audit record; the other recipients still get the mail and the timers still
run (the next tier is the route onward).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import orjson

from detectors.rules import Rule
from schemas.alert import SEVERITIES, SEVERITY_RANK, Alert
from streams.ack import AckBackend, AckRecord, make_token, publish_ack, register_ack_view
from streams.audit import SYSTEM_ACTOR, AuditRecord, topic_partitions, write_audit
from streams.config import Settings, load_settings
from streams.logging import get_logger
from streams.mail_settings import MailSettings, Tier
from streams.mailer import (
    MailContext,
    MailItem,
    SendResult,
    SmtpSender,
    TemporaryFailure,
    compose_alert_mail,
    compose_digest,
    digest_id_for,
)
from streams.metrics import (
    ALERTS_UNACKNOWLEDGED,
    MAILS_FAILED,
    MAILS_RETRIED,
    MAILS_SENT,
    OLDEST_UNACKNOWLEDGED_AGE,
)
from streams.service_kit import create_missing_topics, load_rule_map, start_with_app, stop_clients

__all__ = [
    "AlertState",
    "CommitTracker",
    "EscalationService",
    "StormLimiter",
    "due_steps",
    "event_end",
    "expired_alerts",
    "register",
]

Clock = Callable[[], float]
STATE_SCHEMA_VERSION: Final = 1
_log = get_logger("leakwatch.escalation")


# --------------------------------------------------------------------------- state


class AlertState:
    """What the service knows about one escalated alert (persisted fields + in-memory ones)."""

    __slots__ = (
        "acked",
        "alert",
        "first_mailed_at",
        "first_seen_at",
        "mailed_count",
        "mailed_severity",
        "partition",
        "revision",
        "seen_revision",
        "sent",
        "seq",
        "steps_done",
        "thread",
    )

    def __init__(self, alert: Alert, partition: int, first_seen_at: float) -> None:
        #: Newest revision seen.
        self.alert = alert
        #: Partition of ``escalations`` the alert lives on (decides the owner).
        self.partition = partition
        self.first_seen_at = first_seen_at
        #: When the first mail about it was handled by the relay (timers count from here).
        self.first_mailed_at: float | None = None
        #: Message-ID of that first mail (follow-ups reply to it).
        self.thread: str | None = None
        #: Revision, count and severity of the newest mailed version.
        self.revision = 0
        self.mailed_count = 0
        self.mailed_severity = ""
        #: Escalation tiers mailed so far.
        self.steps_done = 0
        #: mail id -> recipients the relay accepted or refused permanently.
        self.sent: dict[str, list[str]] = {}
        #: Version of the persisted record (0: never persisted).
        self.seq = 0
        #: Highest revision consumed (in memory only; dedupes repeated records).
        self.seen_revision = 0
        #: The acknowledgment, once known (kept here too: the acks topic may expire).
        self.acked: dict[str, str] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": STATE_SCHEMA_VERSION,
                "seq": self.seq,
                "alert": self.alert.to_dict(),
                "partition": self.partition,
                "first_seen_at": self.first_seen_at,
                "first_mailed_at": self.first_mailed_at,
                "thread": self.thread,
                "revision": self.revision,
                "mailed_count": self.mailed_count,
                "mailed_severity": self.mailed_severity,
                "steps_done": self.steps_done,
                "sent": self.sent,
                "acked": self.acked,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> AlertState:
        doc = orjson.loads(raw)
        st = cls(Alert.from_dict(doc["alert"]), int(doc["partition"]), float(doc["first_seen_at"]))
        st.first_mailed_at = doc.get("first_mailed_at")
        st.thread = doc.get("thread")
        st.revision = int(doc.get("revision", 0))
        st.mailed_count = int(doc.get("mailed_count", 0))
        st.mailed_severity = doc.get("mailed_severity", "")
        st.steps_done = int(doc.get("steps_done", 0))
        st.sent = {k: list(v) for k, v in (doc.get("sent") or {}).items()}
        st.seq = int(doc.get("seq", 0))
        st.seen_revision = st.revision
        acked = doc.get("acked")
        st.acked = {k: str(v) for k, v in acked.items()} if isinstance(acked, dict) else None
        return st


@dataclass(slots=True, eq=False)
class Entry:
    """One mail owed about one alert (first report, update or escalation step)."""

    alert_id: str
    kind: str
    number: int
    alert: Alert
    partition: int
    offsets: list[int] = field(default_factory=list)
    recipients: tuple[str, ...] = ()
    attempted: bool = False
    previous_count: int = 0

    @property
    def mail_id(self) -> str:
        if self.kind == "alert":
            return f"{self.alert_id}/alert"
        if self.kind == "update":
            return f"{self.alert_id}/update/r{self.number}"
        return f"{self.alert_id}/step/{self.number}"

    @property
    def critical(self) -> bool:
        return self.alert.severity == "critical"


@dataclass(slots=True, eq=False)
class Outgoing:
    """One SMTP mail: a single entry, or a digest of many with the same recipients."""

    entries: list[Entry]
    recipients: list[str]
    digest: bool = False
    message: EmailMessage | None = None
    attempts: int = 0
    first_attempt_at: float = 0.0
    next_at: float = 0.0


class CommitTracker:
    """Per partition, the offset it is safe to commit: no record before it still owes a mail."""

    __slots__ = ("_committed", "_held", "_next")

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._held: dict[int, Counter[int]] = {}
        self._committed: dict[int, int] = {}

    def seen(self, partition: int, offset: int) -> None:
        """A record was processed (its work, if any, is held already)."""
        if offset + 1 > self._next.get(partition, -1):
            self._next[partition] = offset + 1

    def hold(self, partition: int, offset: int) -> None:
        """Work from this record is not done: do not commit past it."""
        self._held.setdefault(partition, Counter())[offset] += 1

    def release(self, partition: int, offset: int) -> None:
        """One piece of work from this record is done."""
        held = self._held.get(partition)
        if held is None or held[offset] <= 0:
            return
        held[offset] -= 1
        if held[offset] == 0:
            del held[offset]

    def position(self, partition: int) -> int | None:
        """The commit position: the lowest held offset, else one past the last seen."""
        held = self._held.get(partition)
        if held:
            return min(held)
        return self._next.get(partition)

    def committable(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Partitions whose commit position moved since the last :meth:`committed`."""
        out = {}
        for p in self._next if partitions is None else partitions:
            pos = self.position(p)
            if pos is not None and pos > self._committed.get(p, -1):
                out[p] = pos
        return out

    def committed(self, offsets: Mapping[int, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partition: int) -> None:
        """The partition was revoked: drop everything about it."""
        for d in (self._next, self._held, self._committed):
            d.pop(partition, None)


class StormLimiter:
    """At most ``threshold`` individual non-critical mails per sliding ``window_s``."""

    __slots__ = ("_sent", "threshold", "window_s")

    def __init__(self, threshold: int, window_s: float) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._sent: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """True (and counted) if one more individual mail may go out now."""
        if self.threshold <= 0:
            return True
        while self._sent and self._sent[0] <= now - self.window_s:
            self._sent.popleft()
        if len(self._sent) >= self.threshold:
            return False
        self._sent.append(now)
        return True


def due_steps(
    states: Mapping[str, AlertState],
    tiers: tuple[Tier, ...],
    acked: Container[str],
    now: float,
    owned: Callable[[int], bool],
    pending: Container[str],
) -> list[tuple[AlertState, Tier]]:
    """Escalation steps whose time has come: first mail out, not acked, tier not mailed or pending."""
    out: list[tuple[AlertState, Tier]] = []
    if not tiers:
        return out
    for alert_id, st in states.items():
        if st.first_mailed_at is None or alert_id in acked or not owned(st.partition):
            continue
        if st.steps_done >= len(tiers):
            continue
        tier = tiers[st.steps_done]
        if now >= st.first_mailed_at + tier.after_s and f"{alert_id}/step/{tier.number}" not in pending:
            out.append((st, tier))
    return out


def event_end(alert: Alert) -> float:
    """Epoch seconds when an alert's events ended: its last event or its window's end, the later."""
    ends = []
    for text in (alert.last_ts, alert.window_end):
        with contextlib.suppress(TypeError, ValueError):
            ends.append(datetime.fromisoformat(text).timestamp())
    return max(ends, default=0.0)


def expired_alerts(
    states: Mapping[str, AlertState],
    acked: Container[str],
    busy: Container[str],
    owned: Callable[[int], bool],
    now: float,
    retention_s: float,
    max_alerts: int,
) -> list[str]:
    """Alerts to forget, oldest first: acknowledged, owned, no mail owed (not ``busy``), and either
    ended ``retention_s`` before the newest event (capped at ``now``) or beyond ``max_alerts``."""
    ends = {aid: event_end(st.alert) for aid, st in states.items()}
    if not ends:
        return []
    watermark = min(max(ends.values()), now)
    candidates = sorted(
        (end, aid)
        for aid, end in ends.items()
        if aid in acked and aid not in busy and owned(states[aid].partition)
    )
    old = 0
    while old < len(candidates) and watermark - candidates[old][0] >= retention_s:
        old += 1
    excess = max(0, len(states) - old - max_alerts)
    return [aid for _, aid in candidates[: old + excess]]


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# --------------------------------------------------------------------------- the service


class EscalationService:
    """Mails escalated alerts, escalates unacknowledged ones, serves acks (see module doc)."""

    def __init__(
        self,
        settings: Settings,
        mail: MailSettings,
        *,
        clock: Clock = time.time,
        sender: Any = None,
        rules: Mapping[str, Rule] | None = None,
    ) -> None:
        self.settings = settings
        self.mail = mail
        self.clock = clock
        self.tz = ZoneInfo(settings.tz)
        self.sender = sender if sender is not None else SmtpSender(mail)
        self.rules = dict(rules) if rules is not None else load_rule_map(settings, _log, "mails will lack rule descriptions")
        self.tiers = mail.parsed_tiers
        self.base_url = (mail.public_url or settings.public_url or f"http://{settings.web_host}:{settings.web_port}").rstrip("/")
        self._secret = mail.ack_secret.encode() if mail.ack_secret else b""
        self.states: dict[str, AlertState] = {}
        self.acks: dict[str, AckRecord] = {}
        #: mail id -> entry not yet recorded as done.
        self.pending: dict[str, Entry] = {}
        self.tracker = CommitTracker()
        self.limiter = StormLimiter(mail.digest_threshold, mail.digest_window_s)
        #: recipients -> (first collected at, entries)
        self.digests: dict[tuple[str, ...], tuple[float, list[Entry]]] = {}
        self.ready: deque[Outgoing] = deque()
        self.retry: list[Outgoing] = []
        self.assigned: set[int] = set()
        self.started = False
        self._stopping = False
        self._wake: asyncio.Event | None = None
        #: Set while the assignment is settled (state of the previous owner read).
        self._handover: asyncio.Event | None = None
        self._smtp_failures = 0
        self._smtp_gate = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._sending: asyncio.Task[None] | None = None
        self._inflight: Outgoing | None = None
        self._producer: Any = None
        self._reader: Any = None
        self._consumer: Any = None
        self._reader_tps: list[Any] = []
        self._paused = False
        self._last_commit = 0.0
        self._last_sweep = 0.0
        #: alert id -> seq of the state it had when this worker wrote its tombstone (until read back).
        self._tombstoned: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create topics, read the state and acks topics to their end, then start consuming."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self._wake = asyncio.Event()
        self._handover = asyncio.Event()
        args = self.settings.kafka_client_args()
        if not self._secret:
            _log.warning("mail.ack_secret not set: mails carry no ack links (use leakwatch ack)")
        if self.settings.create_topics:
            await self._create_topics(args)
        self._producer = AIOKafkaProducer(acks="all", linger_ms=5, **args)
        await self._producer.start()
        self._reader = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **args)
        await self._reader.start()
        await self._assign_reader()
        await self._catch_up(timeout=120.0)
        self._tasks.append(asyncio.create_task(self._reader_loop(), name="escalation-reader"))
        self._consumer = AIOKafkaConsumer(
            group_id=f"{self.settings.group_id}-escalation",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=600_000,
            **args,
        )
        await self._consumer.start()
        from aiokafka import ConsumerRebalanceListener

        service = self

        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await service._on_revoked(revoked)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await service._on_assigned(assigned)

        self._consumer.subscribe([self.settings.topic_escalations], listener=_Listener())
        for coro, name in (
            (self._consume_loop(), "escalation-consume"),
            (self._dispatch_loop(), "escalation-dispatch"),
            (self._tick_loop(), "escalation-tick"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))
        self.started = True
        _log.info(
            "escalation service started",
            alerts_known=len(self.states),
            acks_known=len(self.acks),
            smtp=f"{self.mail.smtp_host}:{self.mail.port}",
            tiers=len(self.tiers),
        )

    async def stop(self, timeout: float = 15.0) -> None:
        """Let the mail being sent finish and be recorded, commit, close the clients."""
        self._stopping = True
        self.started = False
        if self._sending is not None and not self._sending.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sending), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
        await stop_clients(self._consumer, self._reader, self._producer)
        _log.info("escalation service stopped", unsent=len(self.pending))

    async def _create_topics(self, args: dict[str, Any]) -> None:
        s = self.settings
        forever = {"retention.ms": "-1"}
        wanted: dict[str, tuple[int, dict[str, str]]] = {
            s.topic_escalations: (s.partitions, {}),
            s.topic_acks: (s.partitions, forever),
            s.topic_audit: (1, forever),
            self.mail.topic_state: (s.partitions, {"cleanup.policy": "compact"}),
            self.mail.topic_dlq: (1, forever),
        }
        await create_missing_topics(args, wanted, s.replication_factor)

    async def _assign_reader(self) -> None:
        from aiokafka import TopicPartition

        topics = (self.mail.topic_state, self.settings.topic_acks)
        parts = await topic_partitions(self.settings.kafka_client_args(), topics, wait=60.0)
        missing = [t for t, p in parts.items() if not p]
        if missing:
            raise RuntimeError(f"topics {missing} do not exist (create them or set create_topics)")
        self._reader_tps = [TopicPartition(t, p) for t in topics for p in parts[t]]
        self._reader.assign(self._reader_tps)
        # Explicit offsets: seek_to_beginning() then position() may answer the end on Apache Kafka.
        first = await self._reader.beginning_offsets(self._reader_tps)
        for tp in self._reader_tps:
            self._reader.seek(tp, first[tp])

    async def _catch_up(self, timeout: float) -> None:
        """Read the state and acks topics up to their current end (start-up, from this task)."""
        end = await self._reader.end_offsets(self._reader_tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            behind = [tp for tp in self._reader_tps if await self._reader.position(tp) < end[tp]]
            if not behind:
                return
            if loop.time() > deadline:
                raise TimeoutError("escalation state not read to its end")
            batch = await self._reader.getmany(*behind, timeout_ms=500)
            self._apply_reader_batch(batch)

    async def _wait_reader(self, timeout: float) -> None:
        """Wait until the reader loop has read what is on the topics now (rebalance handover)."""
        end = await self._reader.end_offsets(self._reader_tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any([await self._reader.position(tp) < end[tp] for tp in self._reader_tps]):
            if loop.time() > deadline:
                _log.warning("escalation state not caught up before taking partitions over")
                return
            await asyncio.sleep(0.05)

    # -- reading state and acks --------------------------------------------------------

    async def _reader_loop(self) -> None:
        while True:
            try:
                batch = await self._reader.getmany(timeout_ms=500)
                self._apply_reader_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("reading escalation state/acks failed; retrying", error=repr(exc))
                await asyncio.sleep(1.0)

    def _apply_reader_batch(self, batch: Mapping[Any, list[Any]]) -> None:
        for tp, messages in batch.items():
            for msg in messages:
                if msg.value is None:
                    if tp.topic == self.mail.topic_state and msg.key:
                        self._apply_tombstone(msg.key.decode("utf-8", "replace"))
                    continue
                try:
                    if tp.topic == self.mail.topic_state:
                        self._apply_state(AlertState.from_json(msg.value))
                    else:
                        self._apply_ack(AckRecord.from_json(msg.value))
                except (ValueError, KeyError, TypeError) as exc:
                    _log.warning("unreadable record skipped", topic=tp.topic, partition=tp.partition, offset=msg.offset, error=str(exc))

    def _apply_state(self, incoming: AlertState) -> None:
        aid = incoming.alert.alert_id
        gone = self._tombstoned.get(aid)
        if gone is not None and incoming.seq <= gone and aid not in self.states:
            return  # forgotten here, tombstone not read back yet: an older record must not bring it back
        if incoming.acked and aid not in self.acks:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.acks[aid] = AckRecord(alert_id=aid, **incoming.acked)
        current = self.states.get(aid)
        if current is None:
            self.states[aid] = incoming
            return
        if incoming.seq <= current.seq:
            return  # our own write coming back, or older
        if incoming.alert.revision < current.alert.revision:
            incoming.alert = current.alert
        incoming.seen_revision = max(incoming.seen_revision, current.seen_revision)
        self.states[aid] = incoming

    def _apply_tombstone(self, aid: str) -> None:
        """The alert was forgotten by its partition's owner (this worker, or another)."""
        if self._tombstoned.pop(aid, None) is not None:
            return  # our own: forgotten when written; a state here now is newer than the tombstone
        st = self.states.get(aid)
        if st is not None and st.seq == 0:
            return  # taken up again here after the tombstone was written, not yet mailed
        self.states.pop(aid, None)
        self.acks.pop(aid, None)

    def _apply_ack(self, ack: AckRecord) -> None:
        if ack.alert_id not in self.acks:
            self.acks[ack.alert_id] = ack
            _log.info("alert acknowledged", alert_id=ack.alert_id, via=ack.via)

    # -- consuming escalations ----------------------------------------------------------

    async def _consume_loop(self) -> None:
        while True:
            try:
                assignment = self._consumer.assignment()
                if len(self.pending) >= self.mail.max_pending and not self._paused and assignment:
                    self._consumer.pause(*assignment)
                    self._paused = True
                    _log.warning("too many unsent mails; consumption paused", pending=len(self.pending))
                elif self._paused and len(self.pending) < self.mail.max_pending // 2:
                    self._consumer.resume(*assignment)
                    self._paused = False
                batch = await self._consumer.getmany(timeout_ms=500, max_records=1000)
                if batch:
                    # Fetching starts before the rebalance listener is done; wait for the handover.
                    assert self._handover is not None
                    await self._handover.wait()
                for tp, messages in batch.items():
                    if tp.partition not in self.assigned:
                        continue  # revoked meanwhile: the next owner reads it again
                    for msg in messages:
                        self._on_record(tp.partition, msg.offset, msg.value)
                if batch:
                    self._kick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("consuming escalations failed; retrying", error=repr(exc))
                await asyncio.sleep(1.0)

    def _on_record(self, partition: int, offset: int, value: bytes | None) -> None:
        try:
            if value is None:
                raise ValueError("empty record")
            alert = Alert.from_dict(orjson.loads(value))
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("unreadable escalation skipped", partition=partition, offset=offset, error=str(exc))
            self.tracker.seen(partition, offset)
            return
        self.accept(alert, partition, offset)
        self.tracker.seen(partition, offset)

    def accept(self, alert: Alert, partition: int, offset: int | None = None) -> None:
        """One escalation record: dedupe by revision, then owe a first mail or an update."""
        now = self.clock()
        aid = alert.alert_id
        st = self.states.get(aid)
        if st is None:
            st = self.states[aid] = AlertState(alert, partition, now)
        st.partition = partition
        if alert.revision <= st.seen_revision:
            return  # the same (alert_id, revision) again, or an older one
        st.seen_revision = alert.revision
        if alert.revision >= st.alert.revision:
            st.alert = alert
        if st.first_mailed_at is None:
            entry = self.pending.get(f"{aid}/alert")
            if entry is None:
                entry = Entry(aid, "alert", 0, alert, partition)
                self._attach(entry, offset)
                self._submit(entry, now)
                return
            if not entry.attempted:
                entry.alert = alert
                self._attach(entry, offset)
                return
        self._maybe_update(st, alert, partition, offset, now)

    def _maybe_update(self, st: AlertState, alert: Alert, partition: int, offset: int | None, now: float) -> None:
        grew = alert.count > st.mailed_count
        worse = SEVERITY_RANK.get(alert.severity, 0) > SEVERITY_RANK.get(st.mailed_severity, -1)
        if not (grew or worse) or alert.revision <= st.revision:
            return
        for entry in self.pending.values():
            if entry.alert_id == alert.alert_id and entry.kind == "update" and not entry.attempted:
                del self.pending[entry.mail_id]
                entry.number = alert.revision
                entry.alert = alert
                self.pending[entry.mail_id] = entry
                self._attach(entry, offset)
                return
        entry = Entry(alert.alert_id, "update", alert.revision, alert, partition, previous_count=st.mailed_count)
        self._attach(entry, offset)
        self._submit(entry, now)

    def _attach(self, entry: Entry, offset: int | None) -> None:
        if offset is not None:
            entry.offsets.append(offset)
            self.tracker.hold(entry.partition, offset)

    def _release(self, entry: Entry) -> None:
        for offset in entry.offsets:
            self.tracker.release(entry.partition, offset)
        entry.offsets.clear()

    def _recipients(self, entry: Entry) -> tuple[str, ...]:
        a = entry.alert
        if entry.kind == "step":
            return _dedupe((*self.tiers[entry.number - 1].to, *self.mail.hotline))
        base = list(self.mail.recipients_for(a.severity, a.rule_id, a.department))
        if entry.kind == "update":
            st = self.states.get(entry.alert_id)
            for tier in self.tiers[: st.steps_done if st else 0]:
                base.extend(tier.to)
        return _dedupe(base)

    def _submit(self, entry: Entry, now: float) -> None:
        st = self.states[entry.alert_id]
        done = set(st.sent.get(entry.mail_id, ()))
        recipients = tuple(r for r in self._recipients(entry) if r not in done)
        if not recipients:
            self._release(entry)  # already mailed before a restart
            return
        entry.recipients = recipients
        self.pending[entry.mail_id] = entry
        if entry.critical or self.limiter.allow(now):
            self.ready.append(Outgoing([entry], list(recipients)))
        else:
            first, entries = self.digests.get(recipients, (now, []))
            entries.append(entry)
            self.digests[recipients] = (first, entries)
        self._kick()

    # -- rebalancing -------------------------------------------------------------------

    async def _on_revoked(self, revoked: Iterable[Any]) -> None:
        """Commit what is done; hand everything not yet attempted over to the next owner."""
        if self._handover is not None:
            self._handover.clear()
        parts = {tp.partition for tp in revoked if tp.topic == self.settings.topic_escalations}
        if not parts:
            return
        with contextlib.suppress(Exception):
            await self._commit(parts)
        self.assigned -= parts

        def mine(entry: Entry) -> bool:
            return entry.partition not in parts

        def filtered(outs: Iterable[Outgoing]) -> list[Outgoing]:
            kept = []
            for o in outs:
                if o.message is None:
                    o.entries = [e for e in o.entries if mine(e)]
                    if o.entries:
                        kept.append(o)
                elif any(mine(e) for e in o.entries):
                    kept.append(o)  # a composed digest spanning partitions goes out as it is
            return kept

        self.ready = deque(filtered(self.ready))
        self.retry = filtered(self.retry)
        for key, (first, entries) in list(self.digests.items()):
            left = [e for e in entries if mine(e)]
            if left:
                self.digests[key] = (first, left)
            else:
                del self.digests[key]
        referenced = {id(e) for o in (*self.ready, *self.retry) for e in o.entries}
        referenced |= {id(e) for _, entries in self.digests.values() for e in entries}
        if self._inflight is not None:
            referenced |= {id(e) for e in self._inflight.entries}
        for mail_id, entry in list(self.pending.items()):
            if not mine(entry) and id(entry) not in referenced:
                del self.pending[mail_id]
        for aid, st in list(self.states.items()):
            if st.partition in parts:
                if st.seq == 0:
                    del self.states[aid]  # never mailed: the next owner reads it again
                else:
                    st.seen_revision = st.revision
        for p in parts:
            self.tracker.forget(p)
        _log.info("escalation partitions revoked", partitions=sorted(parts))

    async def _on_assigned(self, assigned: Iterable[Any]) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self.settings.topic_escalations}
        await self._wait_reader(timeout=60.0)
        self.assigned |= parts
        if self._handover is not None:
            self._handover.set()
        _log.info("escalation partitions assigned", partitions=sorted(parts))

    def owns(self, partition: int) -> bool:
        return partition in self.assigned

    async def _commit(self, only: Iterable[int] | None = None) -> None:
        from aiokafka import TopicPartition

        offsets = {p: o for p, o in self.tracker.committable(only).items() if p in self.assigned}
        if not offsets:
            return
        try:
            await self._consumer.commit({TopicPartition(self.settings.topic_escalations, p): o for p, o in offsets.items()})
        except Exception as exc:
            _log.warning("offset commit failed; will retry", error=repr(exc))
            return
        self.tracker.committed(offsets)

    # -- timers ------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            try:
                await asyncio.sleep(self.mail.tick_interval_s)
                self.tick()
                await self._persist_acks()
                now = self.clock()
                if now - self._last_commit >= self.settings.checkpoint_interval:
                    self._last_commit = now
                    await self._commit()
                if now - self._last_sweep >= self.mail.state_sweep_interval_s:
                    self._last_sweep = now
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("escalation tick failed", error=repr(exc))

    def tick(self) -> None:
        """Fire due escalation steps, flush due digests, refresh the gauges."""
        now = self.clock()
        pending = self.pending
        for st, tier in due_steps(self.states, self.tiers, self.acks, now, self.owns, pending):
            entry = Entry(st.alert.alert_id, "step", tier.number, st.alert, st.partition)
            self._submit(entry, now)
        window = self.mail.digest_window_s
        for key, (first, entries) in list(self.digests.items()):
            if now >= first + window:
                del self.digests[key]
                if len(entries) == 1:
                    self.ready.append(Outgoing(entries, list(key)))
                else:
                    self.ready.append(Outgoing(entries, list(key), digest=True))
                self._kick()
        self.update_gauges(now)

    async def _persist_acks(self) -> None:
        """Copy acks into the state records of owned alerts, so they outlive the acks topic."""
        changed = []
        for aid, st in self.states.items():
            if st.seq > 0 and st.acked is None and aid in self.acks and self.owns(st.partition):
                st.acked = _ack_fields(self.acks[aid])
                st.seq += 1
                changed.append(st)
        if changed:
            futures = [
                await self._producer.send(self.mail.topic_state, value=st.to_json(), key=st.alert.alert_id.encode())
                for st in changed
            ]
            for fut in futures:
                await fut

    # -- retention ---------------------------------------------------------------------

    def _busy(self) -> set[str]:
        """Alerts with a mail owed (pending, being sent)."""
        busy = {e.alert_id for e in self.pending.values()}
        if self._inflight is not None:
            busy.update(e.alert_id for e in self._inflight.entries)
        return busy

    async def sweep(self) -> list[str]:
        """Forget expired alerts of owned partitions (tombstones first, see the module doc); drop old acks."""
        now = self.clock()
        m = self.mail
        ids = expired_alerts(self.states, self.acks, self._busy(), self.owns, now, m.state_retention_s, m.state_max_alerts)
        persisted = [aid for aid in ids if self.states[aid].seq > 0]
        if persisted:
            # Registered before sending: the reader may read a tombstone back before its send is awaited here,
            # and must take it for our own (not forget an alert that turns busy meanwhile).
            for aid in persisted:
                self._tombstoned[aid] = self.states[aid].seq
            futures = [await self._producer.send(m.topic_state, value=None, key=aid.encode()) for aid in persisted]
            for fut in futures:
                await fut
        busy = self._busy()  # mail owed since (a late revision): keep it; its next state record restores it
        forgotten = [aid for aid in ids if aid not in busy and aid in self.states]
        for aid in forgotten:
            del self.states[aid]
            self.acks.pop(aid, None)
        horizon = now - m.state_retention_s
        stale = [aid for aid, ack in self.acks.items() if aid not in self.states and _epoch(ack.at) < horizon]
        for aid in stale:
            del self.acks[aid]
        if forgotten or stale:
            _log.info("escalation state forgotten", alerts=len(forgotten), acks=len(stale), alerts_kept=len(self.states))
        if len(self.states) > m.state_max_alerts:
            _log.warning(
                "more alerts in memory than state_max_alerts: the rest are unacknowledged or still owe mail",
                alerts=len(self.states),
                state_max_alerts=m.state_max_alerts,
            )
        return forgotten

    def update_gauges(self, now: float) -> None:
        counts = dict.fromkeys(SEVERITIES, 0)
        oldest = dict.fromkeys(SEVERITIES, 0.0)
        for aid, st in self.states.items():
            if aid in self.acks or not self.owns(st.partition):
                continue
            sev = st.alert.severity
            if sev not in counts:
                continue
            counts[sev] += 1
            oldest[sev] = max(oldest[sev], now - st.first_seen_at)
        for sev in SEVERITIES:
            ALERTS_UNACKNOWLEDGED.labels(severity=sev).set(counts[sev])
            OLDEST_UNACKNOWLEDGED_AGE.labels(severity=sev).set(oldest[sev])

    # -- sending -----------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _next_outgoing(self, now: float) -> Outgoing | None:
        if self.ready:
            return self.ready.popleft()
        due = [o for o in self.retry if o.next_at <= now]
        if due:
            first = min(due, key=lambda o: o.next_at)
            self.retry.remove(first)
            return first
        return None

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            now = self.clock()
            if now < self._smtp_gate:
                await asyncio.sleep(min(self._smtp_gate - now, 1.0))
                continue
            out = self._next_outgoing(now)
            if out is None:
                self._wake.clear()
                wait = self.mail.tick_interval_s
                if self.retry:
                    wait = max(0.01, min(wait, min(o.next_at for o in self.retry) - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            self._inflight = out
            self._sending = asyncio.create_task(self._attempt(out))
            try:
                await asyncio.shield(self._sending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.error("sending escalation mail failed unexpectedly; will retry", error=repr(exc))
                self.ready.appendleft(out)
                await asyncio.sleep(1.0)
            finally:
                self._inflight = None

    def _backoff(self, attempts: int) -> float:
        base: float = min(self.mail.retry_initial_s * 2.0 ** max(0, attempts - 1), self.mail.retry_max_s)
        return base * random.uniform(0.9, 1.1)

    def _wanted(self, entry: Entry) -> bool:
        if entry.partition not in self.assigned:
            return False
        return not (entry.kind == "step" and entry.alert_id in self.acks)

    async def _attempt(self, out: Outgoing) -> None:
        now = self.clock()
        if out.message is not None and not out.digest and not self._wanted(out.entries[0]):
            out.message = None  # a retried step whose alert was acked meanwhile, or a partition handed over
        if out.message is None:
            live = [e for e in out.entries if self._wanted(e)]
            for e in out.entries:
                if e not in live:
                    self.pending.pop(e.mail_id, None)
                    self._release(e)
            if not live:
                return
            out.entries = live
            out.message = self._compose(out, now)
            out.first_attempt_at = now
            for e in live:
                e.attempted = True
        try:
            result = await self.sender.send(out.message, out.recipients)
        except TemporaryFailure as exc:
            MAILS_RETRIED.inc()
            self._smtp_failures += 1
            delay = self._backoff(self._smtp_failures)
            self._smtp_gate = self.clock() + delay
            self.ready.appendleft(out)
            _log.warning("SMTP relay unavailable; backing off", error=str(exc), retry_in_s=round(delay, 2), unsent=len(self.pending))
            return
        self._smtp_failures = 0
        now = self.clock()
        if result.refused_temporary and now - out.first_attempt_at >= self.mail.retry_give_up_s:
            for r, (code, message) in result.refused_temporary.items():
                result.refused_permanent[r] = (code, f"gave up after {self.mail.retry_give_up}: {message}")
            result.refused_temporary.clear()
        await self._record(out, result, now)
        if result.refused_temporary:
            MAILS_RETRIED.inc()
            out.recipients = list(result.refused_temporary)
            out.attempts += 1
            out.next_at = now + self._backoff(out.attempts)
            self.retry.append(out)
            return
        for e in out.entries:
            self.pending.pop(e.mail_id, None)
            self._release(e)

    def _item(self, entry: Entry, now: float) -> MailItem:
        aid = entry.alert_id
        st = self.states.get(aid)
        ack_url = ""
        if self._secret:
            ack_url = f"{self.base_url}/ack/{make_token(self._secret, aid, int(now + self.mail.ack_link_ttl_s))}"
        waited = now - st.first_mailed_at if st and st.first_mailed_at is not None else 0.0
        return MailItem(
            alert=entry.alert,
            kind=entry.kind,
            number=entry.number,
            alert_url=f"{self.base_url}/alerts/{aid}",
            ack_url=ack_url,
            previous_count=entry.previous_count,
            waited_s=waited,
        )

    def _next_tier_after(self, entry: Entry) -> float | None:
        st = self.states.get(entry.alert_id)
        reached = entry.number if entry.kind == "step" else (st.steps_done if st else 0)
        return self.tiers[reached].after_s if reached < len(self.tiers) else None

    def _compose(self, out: Outgoing, now: float) -> EmailMessage:
        ctx = MailContext.from_settings(self.mail, self.tz, datetime.fromtimestamp(now, self.tz))
        if out.digest:
            nxt = self._next_tier_after(out.entries[0]) if all(e.kind == "alert" for e in out.entries) else None
            ctx = _with(ctx, next_tier_after_s=nxt)
            items = [self._item(e, now) for e in out.entries]
            return compose_digest(items, out.recipients, ctx, digest_id_for([e.mail_id for e in out.entries]), self.rules)
        entry = out.entries[0]
        ctx = _with(ctx, next_tier_after_s=self._next_tier_after(entry))
        st = self.states.get(entry.alert_id)
        thread = st.thread if st is not None and entry.kind != "alert" else None
        return compose_alert_mail(self._item(entry, now), out.recipients, ctx, self.rules.get(entry.alert.rule_id), thread=thread)

    async def _record(self, out: Outgoing, result: SendResult, now: float) -> None:
        """State, audit and DLQ records for one attempt; retried until Kafka has them."""
        assert out.message is not None
        msgid = str(out.message["Message-ID"])
        handled = [*result.accepted, *result.refused_permanent]
        at = datetime.fromtimestamp(now, self.tz).isoformat(timespec="seconds")
        changed: list[AlertState] = []
        for e in out.entries:
            st = self.states.get(e.alert_id)
            if st is None:  # its partition was revoked while the mail was on its way
                st = self.states[e.alert_id] = AlertState(e.alert, e.partition, now)
            done = st.sent.setdefault(e.mail_id, [])
            done.extend(r for r in handled if r not in done)
            if st.acked is None and e.alert_id in self.acks:
                st.acked = _ack_fields(self.acks[e.alert_id])
            if handled:
                if st.first_mailed_at is None:
                    # Even if every recipient refused: the timers start, the next tier is the route onward.
                    st.first_mailed_at = now
                    st.thread = msgid
                if e.kind in ("alert", "update") and result.accepted:
                    st.revision = max(st.revision, e.alert.revision)
                    st.mailed_count = max(st.mailed_count, e.alert.count)
                    if SEVERITY_RANK.get(e.alert.severity, 0) > SEVERITY_RANK.get(st.mailed_severity, -1):
                        st.mailed_severity = e.alert.severity
                if e.kind == "step":
                    st.steps_done = max(st.steps_done, e.number)
            st.seq += 1
            changed.append(st)
        audit: list[AuditRecord] = []
        ids = tuple(e.alert_id for e in out.entries)
        if result.accepted:
            MAILS_SENT.inc()
            if out.digest:
                audit.append(
                    AuditRecord(
                        action="digest.sent",
                        at=at,
                        actor=SYSTEM_ACTOR,
                        via="smtp",
                        alert_ids=ids,
                        detail={
                            "kind": "digest",
                            "message_id": msgid,
                            "recipients": list(result.accepted),
                            "mail_ids": [e.mail_id for e in out.entries],
                        },
                        record_id=f"sent:{msgid}:{','.join(sorted(result.accepted))}",
                    )
                )
            for e in out.entries:
                if out.digest and e.kind != "step":
                    continue
                audit.append(
                    AuditRecord(
                        action="escalation.step" if e.kind == "step" else "mail.sent",
                        at=at,
                        actor=SYSTEM_ACTOR,
                        via="smtp",
                        alert_ids=(e.alert_id,),
                        detail={
                            "kind": e.kind,
                            "tier": e.number if e.kind == "step" else None,
                            "revision": e.alert.revision,
                            "severity": e.alert.severity,
                            "rule_id": e.alert.rule_id,
                            "mail_id": e.mail_id,
                            "message_id": msgid,
                            "recipients": list(result.accepted),
                        },
                        record_id=f"sent:{e.mail_id}:{','.join(sorted(result.accepted))}",
                    )
                )
        dlq: list[tuple[bytes, bytes]] = []
        for rcpt, (code, reason) in result.refused_permanent.items():
            MAILS_FAILED.inc()
            doc = {
                "at": at,
                "recipient": rcpt,
                "code": code,
                "reason": reason,
                "message_id": msgid,
                "alert_ids": list(ids),
                "mail_ids": [e.mail_id for e in out.entries],
                "kind": "digest" if out.digest else out.entries[0].kind,
                "subject": str(out.message["Subject"]),
            }
            dlq.append(((ids[0] if len(ids) == 1 else msgid).encode(), orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)))
            audit.append(
                AuditRecord(
                    action="mail.failed",
                    at=at,
                    actor=SYSTEM_ACTOR,
                    via="smtp",
                    alert_ids=ids,
                    detail={"kind": doc["kind"], "message_id": msgid, "recipients": [rcpt], "code": code, "reason": reason},
                    record_id=f"failed:{msgid}:{rcpt}",
                )
            )
            _log.error("escalation mail refused permanently", recipient=rcpt, code=code, alert_ids=list(ids)[:5])
        if result.accepted:
            _log.info(
                "escalation mail sent",
                kind="digest" if out.digest else out.entries[0].kind,
                alerts=len(ids),
                alert_id=ids[0],
                recipients=len(result.accepted),
            )
        delay = 0.5
        while True:
            try:
                futures = [
                    await self._producer.send(self.mail.topic_state, value=st.to_json(), key=st.alert.alert_id.encode())
                    for st in changed
                ]
                futures += [await self._producer.send(self.mail.topic_dlq, value=v, key=k) for k, v in dlq]
                await write_audit(self._producer, self.settings.topic_audit, audit)
                for fut in futures:
                    await fut
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.error("cannot record sent mail in Kafka; retrying", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- the ack page's backend ------------------------------------------------------------

    def ack_secret(self) -> bytes:
        return self._secret

    def now(self) -> float:
        return self.clock()

    def ack_of(self, alert_id: str) -> AckRecord | None:
        return self.acks.get(alert_id)

    def alert_summary(self, alert_id: str) -> dict[str, str] | None:
        st = self.states.get(alert_id)
        if st is None:
            return None
        a = st.alert
        words = {"low": "低", "medium": "中", "high": "高", "critical": "重大"}
        try:
            when = datetime.fromisoformat(a.first_ts).astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z")
        except ValueError:
            when = ""
        from streams.mailer import scrub

        return {
            "title": scrub(a.title),
            "severity": words.get(a.severity, a.severity),
            "user": scrub(a.user + (f"（{a.department}）" if a.department else "")),
            "when": when,
        }

    async def record_ack(self, ack: AckRecord) -> AckRecord:
        existing = self.acks.get(ack.alert_id)
        if existing is not None:
            return existing
        self.acks[ack.alert_id] = ack
        try:
            await publish_ack(self._producer, self.settings.topic_acks, self.settings.topic_audit, ack)
        except BaseException:
            self.acks.pop(ack.alert_id, None)
            raise
        _log.info("alert acknowledged", alert_id=ack.alert_id, via=ack.via)
        return ack


def _epoch(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _ack_fields(ack: AckRecord) -> dict[str, str]:
    return {"by": ack.by, "at": ack.at, "via": ack.via, "comment": ack.comment}


def _with(ctx: MailContext, **changes: Any) -> MailContext:
    import dataclasses

    return dataclasses.replace(ctx, **changes)


# --------------------------------------------------------------------------- Faust


def register(
    app: Any,
    settings: Settings,
    *,
    mail: MailSettings | None = None,
    clock: Clock | None = None,
) -> EscalationService | None:
    """Add the escalation service and the ``/ack/<token>`` page to a Faust app.

    ``mail`` defaults to the ``mail`` section of the config (``LEAKWATCH_CONFIG``)
    and ``LEAKWATCH_MAIL_*``. Without ``mail.smtp_host`` nothing is added.
    """

    if mail is None:
        mail = load_settings(MailSettings, section="mail")
    if not mail.enabled:
        _log.warning("escalation mail disabled: mail.smtp_host is not set")
        return None
    service = EscalationService(settings, mail, clock=clock or time.time)
    register_ack_view(app, lambda: cast(AckBackend, service) if service.started else None)

    start_with_app(app, service, "EscalationRunner")
    return service

