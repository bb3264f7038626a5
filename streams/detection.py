"""The detection hot path: raw aiokafka in, detectors, alerts and checkpoints out.

Why not a Faust agent: Faust costs about 100 µs per Kafka message on a
2-core machine (6-9k events/s per agent, 2-3k/s with windowed tables), while
``getmany()`` plus ``orjson`` reaches 200-300k/s. So the hot path is one
:class:`DetectionLoop` per worker process, hosted by the Faust app as a
service, and Faust keeps the web server and the low-volume agents.

Partitioning. Producers key events by user, so all of a user's events of
one topic are in one partition. The two input topics are *co-partitioned*:
they must have the same number of partitions, and the loop's consumer uses
the range assignor, which gives partition ``p`` of both topics to the same
worker. One :class:`~detectors.engine.Engine` per partition number holds the
state of the users keyed to it, fed by both topics: a user's access events
and operation events (a look-up, then a USB write) meet in one state, and a
finding has one ``alert_id`` whichever topic its events came on. (An engine
per topic-partition would raise two different findings with the *same*
``alert_id`` for, say, night look-ups on one topic and night exports on the
other, and consumers deduplicating by ``(alert_id, revision)`` would drop
one.) No repartitioning, no ``group_by``.

Flow per batch (``getmany(max_records=settings.max_batch)``):

1. Decode each message with ``orjson`` (one event, or a JSON array of
   events), validate it with :meth:`EventCodec.from_dict` and hand it to the
   engine right away. Pseudonymisation is applied only to messages whose raw
   bytes hold a 12-digit run, and the whole batch is scanned once first.
   (Joining a batch into one JSON array and parsing it once was measured
   too: slower here, because thousands of decoded dicts then stay alive
   together and the garbage collector scans them; see ``_process``.)
2. The worker process raises the collector's first threshold and freezes
   the start-up heap (:func:`tune_gc`), which the engine's many small
   long-lived objects make worthwhile.
3. Invalid events, and late events the engine refuses, go to the dead-letter
   topic with the original message bytes and key, and headers ``reason``,
   ``code``, ``field``, ``source_topic``, ``source_partition``,
   ``source_offset`` (and ``index`` for an element of an array message,
   ``event_id`` for a late event). The worker never stops on bad input.
4. Alerts go to ``topic_alerts`` (all) and ``topic_escalations`` (severity
   at or above ``escalation_severity``), key ``alert_id``, value
   :meth:`Alert.to_json`, header ``revision``.

Checkpoints (every ``checkpoint_interval`` seconds, on revocation and on
shutdown), in this order:

a. every alert and dead letter sent so far is confirmed delivered;
b. each dirty user's state (:meth:`Engine.dump_user`; a tombstone for a
   forgotten user) is written to the compacted ``topic_checkpoints``,
   partition = the input partition number, key ``"u:{user}"``, headers
   ``asof:{topic}`` = the next input offset of each topic; then a meta record
   (key ``__meta__``) with those offsets and the engine's ``max_ts``; their
   delivery is awaited;
c. only then are the input offsets committed.

The periodic checkpoint rides with a batch: the host processes the batch,
then dumps its partitions' dirty users (``submit(..., checkpoint=True)``),
and the loop builds the records when it applies that batch, while the host
already works on the next one; (a)-(c) then run in the background, one
checkpoint at a time and in order, and the loop goes on fetching. The state
written is exactly the state after the batches applied so far, so the
offsets match it. Revocation and shutdown apply every submitted batch first
and then checkpoint.

On assignment, each partition's engine is rebuilt from its checkpoint
partition (read from the beginning up to a fence record written just then;
latest value per key wins) and both inputs are *seeked* to the meta offsets:
the checkpoint, not the committed offset, is the source of truth, so a crash
between (b) and (c) replays nothing twice. A crash in the middle of (b)
leaves user records newer than the meta record; their ``asof`` headers say
so, and the replayed events of those users below ``asof`` are skipped, so
nothing is counted twice even then. Replayed events re-emit the same alerts
(same ``alert_id`` and ``revision``); consumers dedupe by
``(alert_id, revision)``.

Limits: the engine's per-user ``recent`` events (evidence for new findings)
are not part of the snapshot, so after a restore a finding first raised from
events on both sides of the checkpoint lists fewer evidence event ids; and
the interleaving of the two topics within a partition follows arrival, so a
revision's evidence may differ between a run and its replay. Ids, reasons
and counts do not depend on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from detectors.base import parse_duration
from detectors.engine import Engine, EngineSettings, calendar_from_rules
from detectors.rules import DEFAULT_RULES_DIR, Rule, apply_overrides, load_overrides, load_rules
from leakwatch import __version__
from schemas.alert import SEVERITY_RANK, Alert, grouped_hex
from schemas.event import EventCodec
from schemas.mynumber import Pseudonymizer
from streams import metrics
from streams.config import ConfigError, Settings
from streams.engines import (
    BatchResult,
    DetectionHost,
    DetectionPool,
    Job,
    PartitionCheckpoint,
    has_twelve_digits,
)
from streams.logging import get_logger

__all__ = [
    "CHECKPOINT_META",
    "USER_KEY_PREFIX",
    "DetectionLoop",
    "LoopStats",
    "has_twelve_digits",
    "load_rules_for",
    "rules_version",
    "tune_gc",
]

#: Key of a partition's meta record in the checkpoint topic (user records are ``u:<user>``).
CHECKPOINT_META: Final = "__meta__"
#: Prefix of user state keys in the checkpoint topic.
USER_KEY_PREFIX: Final = b"u:"
_META_VERSION: Final = 2
#: Key of the fence record written to a checkpoint partition before reading it back.
_FENCE_KEY: Final = b"__fence__"
#: A loop iteration taking longer than this (after getmany) is logged with its breakdown.
SLOW_ITERATION_SECONDS: Final = 1.0
#: Batches kept submitted to detection children while the loop fetches the next
#: (measured on 2 cores: with 1, each child idled about half the time, waiting
#: for the loop to fetch, split and send its next batch).
PIPELINE_DEPTH: Final = 2
#: A broker is "reachable" for /readyz if it answered within this many seconds.
BROKER_OK_SECONDS: Final = 30.0


def tune_gc(threshold0: int = 50_000) -> None:
    """Fewer, larger young-generation collections, and the start-up heap frozen.

    With CPython's default first threshold (700 allocations) the collector
    runs every few dozen events and keeps rescanning the engine's state; on
    the benchmark's event mix this took the hot path from about 15 to 12 us
    per event. Call once, after start-up (imports, rules) and before
    consuming.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(threshold0, max(t1, 20), max(t2, 100))


def load_rules_for(settings: Settings) -> list[Rule]:
    """The rules a worker runs: ``rules_path`` (or the bundled ones) plus overrides."""
    rules = load_rules(Path(settings.rules_path) if settings.rules_path else DEFAULT_RULES_DIR)
    if settings.overrides_path:
        rules = apply_overrides(rules, load_overrides(Path(settings.overrides_path)))
    return rules


def rules_version(rules: Iterable[Rule]) -> str:
    """A short digest of what the rules say (for ``leakwatch_build_info``)."""
    doc = [
        [r.id, r.detector, r.level, r.enabled, dict(r.params), sorted(r.allowlist.users), sorted(r.allowlist.terminals),
         sorted(r.allowlist.departments), sorted(r.allowlist.devices), {k: [v.title, v.level] for k, v in sorted(r.reasons.items())}]
        for r in sorted(rules, key=lambda r: r.id)
    ]
    digest = hashlib.sha256(orjson.dumps(doc, default=str, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return grouped_hex(digest[:16])  # a metric label: never 12 decimal digits in a row


class LoopStats:
    """Running totals of one loop (for tests, the demo and the benchmark)."""

    __slots__ = ("alerts", "batches", "checkpoints", "dead_letters", "events", "late", "messages", "restored_users", "skipped")

    def __init__(self) -> None:
        self.batches = 0
        self.messages = 0
        self.events = 0
        self.alerts = 0
        self.dead_letters = 0
        self.late = 0
        self.checkpoints = 0
        self.restored_users = 0
        self.skipped = 0

    def as_dict(self) -> dict[str, int]:
        """The totals as a mapping."""
        return {name: getattr(self, name) for name in self.__slots__}


class _Partition:
    """One partition number of the input topics: its checkpoint bookkeeping (the engine is the host's)."""

    __slots__ = (
        "checkpointed",
        "expected",
        "gap_checked",
        "lag",
        "log",
        "next_offset",
        "number",
        "sizes",
        "state_bytes",
        "topic_consumed",
        "tps",
        "users",
    )

    def __init__(self, number: int, tps: Iterable[TopicPartition], log: Any) -> None:
        self.number = number
        self.tps = sorted(tps, key=lambda tp: tp.topic)
        self.log = log
        #: Topic -> offset of the next record whose results are in (absent: nothing known yet).
        self.next_offset: dict[str, int] = {}
        #: Topic -> offset of the next record to hand to the detection host.
        self.expected: dict[str, int] = {}
        #: Users the partition's engine holds (as of its last result).
        self.users = 0
        #: ``next_offset`` at the last completed checkpoint.
        self.checkpointed: dict[str, int] = {}
        #: Topic -> expected offset of a gap already sought back over once.
        self.gap_checked: dict[str, int] = {}
        #: Size of each user's last checkpointed state (for leakwatch_state_bytes).
        self.sizes: dict[str, int] = {}
        self.state_bytes = 0
        self.topic_consumed = {tp.topic: metrics.EVENTS_CONSUMED.labels(tp.topic) for tp in self.tps}
        self.lag = {tp.topic: metrics.CONSUMER_LAG.labels(tp.topic, str(number)) for tp in self.tps}

    def names(self) -> list[str]:
        """``topic:partition`` of each input partition (for logs)."""
        return [f"{tp.topic}:{tp.partition}" for tp in self.tps]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: DetectionLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._loop._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._loop._on_assigned(set(assigned))


class DetectionLoop:
    """Consumes both input topics in the worker's consumer group and runs the detectors.

    ``run()`` until ``request_stop()``; then the in-flight batch finishes,
    a checkpoint is written, offsets are committed and the clients close.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        rules: Sequence[Rule] | None = None,
        pseudonym_key: bytes | None = None,
        detection_process: bool | None = None,
        worker_name: str | None = None,
        poll_timeout_ms: int = 100,
        lag_interval: float = 5.0,
        consumer_options: dict[str, Any] | None = None,
        producer_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        try:
            lateness_ms = parse_duration(settings.lateness)
        except ValueError as exc:
            raise ConfigError("lateness", str(exc)) from None
        try:
            max_ahead_ms = parse_duration(settings.max_ahead) if settings.max_ahead.strip() not in ("0", "") else 0
        except ValueError as exc:
            raise ConfigError("max_ahead", str(exc)) from None
        self.rules = list(rules) if rules is not None else load_rules_for(settings)
        self.engine_settings = EngineSettings(lateness_ms=lateness_ms)
        self.calendar = calendar_from_rules([r for r in self.rules if r.enabled])
        # Build one engine now so rule errors surface at start, not at the first assignment.
        probe = self._new_engine()
        self.detector_names = [d.rule.detector for d in probe.detectors]
        key = pseudonym_key or settings.pseudonym_key_bytes()
        self.codec = EventCodec(Pseudonymizer(key))
        if detection_process is None:
            children = settings.detection_processes()
        else:
            children = 1 if detection_process else 0
        #: Runs decoding, validation and the engines, here or in child processes.
        self.host = DetectionPool(
            [
                DetectionHost(self.rules, self.engine_settings, key, in_child=children > 0, max_ahead_ms=max_ahead_ms)
                for _ in range(max(children, 1))
            ]
        )
        #: Batches handed to the host and not yet collected, oldest first: (partition,
        #: topic-partition, records) per job, and whether a checkpoint rides with it.
        self._inflight: deque[tuple[list[tuple[_Partition, TopicPartition, list[Any]]], bool]] = deque()
        #: Batches the loop keeps submitted while it fetches: with a child process the
        #: child then goes on to the next batch without waiting for the loop.
        self.pipeline_depth = PIPELINE_DEPTH if children > 0 else 1
        self.worker_name = worker_name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.poll_timeout_ms = poll_timeout_ms
        self.session_timeout_ms = int(settings.session_timeout * 1000)
        self.heartbeat_interval_ms = max(100, min(3000, self.session_timeout_ms // 3))
        self.lag_interval = lag_interval
        self.consumer_options = dict(consumer_options or {})
        self.producer_options = dict(producer_options or {})
        self.input_topics = tuple(dict.fromkeys(settings.input_topics))
        self.escalation_rank = SEVERITY_RANK[settings.escalation_severity]
        self.rules_version = rules_version(self.rules)
        self.log = get_logger("leakwatch.detection", component="detection")
        self.stats = LoopStats()

        #: Partition number -> its engine and bookkeeping.
        self.parts: dict[int, _Partition] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._pending: list[asyncio.Future[Any]] = []
        #: The periodic checkpoint being delivered and committed in the background.
        self._checkpoint_task: asyncio.Future[None] | None = None
        self._dlq: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        #: Rebalance complete and every assigned partition restored.
        self.assigned = False
        self.ever_assigned = False
        self.broker_ok_at = 0.0
        self.running = False
        self.finished = asyncio.Event()
        #: An error that must stop the worker (e.g. a partition's state could not be restored).
        self._fatal: BaseException | None = None
        self._reported_users = 0
        self._reported_bytes = 0
        # Metric children bound once.
        self._batch_size = metrics.BATCH_SIZE
        self._engine_seconds = metrics.DETECTOR_SECONDS.labels("all")
        by_detector = {name: metrics.DETECTOR_EVENTS.labels(name) for name in set(self.detector_names)}
        self._detector_children: dict[str, list[Any]] = {
            action: [by_detector[d.rule.detector] for d in probe.detectors if d.actions is None or action in d.actions]
            for action in probe._by_action
        }
        metrics.BUILD_INFO.labels(__version__, self.rules_version).set(1)

    @property
    def fatal_error(self) -> BaseException | None:
        """The error that stopped the loop, if one did."""
        return self._fatal

    # -- construction helpers -------------------------------------------------

    def _new_engine(self) -> Engine:
        return Engine(self.rules, self.engine_settings, self.calendar)

    def _client_args(self) -> dict[str, Any]:
        return self.settings.kafka_client_args()

    # -- readiness --------------------------------------------------------------

    @property
    def broker_reachable(self) -> bool:
        """The broker answered within the last :data:`BROKER_OK_SECONDS`."""
        return self.broker_ok_at > 0 and time.monotonic() - self.broker_ok_at < BROKER_OK_SECONDS

    @property
    def ready(self) -> bool:
        """Partitions assigned and restored, broker reachable, loop running."""
        return self.running and self.assigned and self.broker_reachable

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports."""
        return {
            "ready": self.ready,
            "running": self.running,
            "assigned": self.assigned,
            "partitions": sorted(name for part in self.parts.values() for name in part.names()),
            "broker_reachable": self.broker_reachable,
            "worker": self.worker_name,
        }

    # -- lifecycle --------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to finish the in-flight batch, checkpoint, commit and exit."""
        self._stop.set()

    async def _start_clients(self) -> bool:
        args = self._client_args()
        delay = 0.5
        while not self._stop.is_set():
            producer = AIOKafkaProducer(
                **args,
                client_id=f"leakwatch-{self.worker_name}",
                acks="all",
                linger_ms=2,
                max_batch_size=512 * 1024,
                max_request_size=4 * 1024 * 1024,
                **self.producer_options,
            )
            consumer_kw: dict[str, Any] = {
                "group_id": self.settings.group_id,
                "client_id": f"leakwatch-{self.worker_name}",
                "enable_auto_commit": False,
                "auto_offset_reset": "earliest",
                "session_timeout_ms": self.session_timeout_ms,
                "heartbeat_interval_ms": self.heartbeat_interval_ms,
                "rebalance_timeout_ms": max(2 * self.session_timeout_ms, 6000),
                # Co-partitioning: partition p of both input topics to the same worker.
                "partition_assignment_strategy": (RangePartitionAssignor,),
                "max_partition_fetch_bytes": 4 * 1024 * 1024,
                "fetch_max_bytes": 64 * 1024 * 1024,
                # Under load, let the broker gather up to 256 KiB (about 800
                # events) or 50 ms per fetch: a fetch costs the same Python time
                # whether it brings 10 records or 10,000, so tiny fetches at
                # moderate rates would eat the time needed for detection.
                "fetch_min_bytes": 256 * 1024,
                "fetch_max_wait_ms": 50,
            }
            consumer_kw.update(self.consumer_options)
            consumer = AIOKafkaConsumer(**args, **consumer_kw)
            reader = AIOKafkaConsumer(
                **args,
                group_id=None,
                client_id=f"leakwatch-{self.worker_name}-restore",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=8 * 1024 * 1024,
            )
            try:
                await producer.start()
                await reader.start()
                await consumer.start()
                await self._check_topics(consumer)
            except ConfigError:
                await self._close_quietly(consumer, reader, producer)
                raise
            except (KafkaError, OSError) as exc:
                await self._close_quietly(consumer, reader, producer)
                self.log.warning("broker not reachable, retrying", error=str(exc), retry_in=delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 10.0)
                continue
            self.producer, self.consumer, self._reader = producer, consumer, reader
            self.broker_ok_at = time.monotonic()
            consumer.subscribe(list(self.input_topics), listener=_Rebalance(self))
            return True
        return False

    async def _check_topics(self, consumer: AIOKafkaConsumer) -> None:
        """Input and checkpoint topics exist; the checkpoint topic has at least as many partitions."""
        cluster = await consumer._client.fetch_all_metadata()
        ckpt = self.settings.topic_checkpoints
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in (*self.input_topics, ckpt)}
        for topic, count in counts.items():
            if count == 0:
                raise ConfigError(
                    "topic_checkpoints" if topic == ckpt else ("topic_access" if topic == self.settings.topic_access else "topic_operation"),
                    f"topic {topic!r} does not exist (create it, or run with create_topics: true)",
                )
        inputs = {counts[t] for t in self.input_topics}
        if len(inputs) > 1:
            raise ConfigError(
                "partitions",
                "the input topics must have the same number of partitions (co-partitioned by user); "
                + ", ".join(f"{t!r} has {counts[t]}" for t in self.input_topics),
            )
        if max(inputs) > counts[ckpt]:
            raise ConfigError(
                "topic_checkpoints",
                f"{ckpt!r} has {counts[ckpt]} partitions but the input topics have {max(inputs)}: "
                "the checkpoint topic needs at least as many",
            )

    @staticmethod
    async def _close_quietly(*clients: Any) -> None:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.stop()

    async def run(self) -> None:
        """Consume until :meth:`request_stop`; raises on infrastructure failures."""
        self.finished.clear()
        try:
            await self.host.start()
            if not await self._start_clients():
                return
            self.running = True
            lag_task = asyncio.ensure_future(self._lag_loop())
            clean = False
            try:
                await self._main()
                clean = self._fatal is None
            finally:
                lag_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await lag_task
                await self._shutdown(clean)
        finally:
            with contextlib.suppress(Exception):
                await self.host.close()
            self.running = False
            self.finished.set()
        if self._fatal is not None:
            raise self._fatal

    async def _main(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        interval = max(self.settings.checkpoint_interval, 0.0)
        max_records = self.settings.max_batch
        timeout_ms = self.poll_timeout_ms
        last_checkpoint = time.monotonic()
        stop = self._stop
        slow = SLOW_ITERATION_SECONDS
        depth = self.pipeline_depth
        while not stop.is_set():
            task = self._checkpoint_task
            if task is not None and task.done():
                await self._checkpoint_done()  # (raises if it failed: the worker stops, the next owner replays)
            t0 = time.monotonic()
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            t1 = time.monotonic()
            async with self._lock:
                t2 = now = time.monotonic()
                # Pipelined: the host works on the batches submitted earlier
                # while this one was fetched. Hand it the new one at once (with
                # a checkpoint request when one is due), then apply the oldest
                # results, keeping up to ``depth`` batches in the host's hands
                # while data keeps coming and none when it stops; results
                # already there are applied at once (latency).
                due = now - last_checkpoint >= interval
                submitted = bool(batch) and self._submit(batch, checkpoint=due)
                keep = depth - 1 if submitted else 0
                while self._inflight and (len(self._inflight) > keep or self.host.ready()):
                    await self._apply_next()
                t3 = time.monotonic()
                if due:
                    if not submitted:
                        await self._checkpoint(list(self.parts.values()))
                    last_checkpoint = now
            t4 = time.monotonic()
            if t4 - t1 > slow:
                self.log.warning(
                    "slow iteration",
                    poll=round(t1 - t0, 3),
                    lock_wait=round(t2 - t1, 3),
                    batch=round(t3 - t2, 3),
                    checkpoint=round(t4 - t3, 3),
                    records=sum(len(r) for r in batch.values()),
                )

    async def _shutdown(self, clean: bool) -> None:
        """Final checkpoint and commit (if the loop ended cleanly), then close the clients."""
        async with self._lock:
            if clean:
                await self._finish()
            parts = list(self.parts.values())
            if clean and parts:
                try:
                    await self._checkpoint(parts)
                except Exception as exc:
                    self.log.error("final checkpoint failed; the next owner replays from the previous one", error=str(exc))
            task, self._checkpoint_task = self._checkpoint_task, None
            if task is not None:
                if not clean:
                    task.cancel()  # the next owner replays from the last checkpoint delivered
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception as exc:
                    self.log.error("checkpoint failed; the next owner replays from the previous one", error=str(exc))
            for part in parts:
                self._drop(part)
            self.assigned = False
        await self._close_quietly(self.consumer, self._reader, self.producer)
        self.log.info("detection stopped", **self.stats.as_dict())

    # -- the hot path -----------------------------------------------------------

    def _submit(self, batch: dict[TopicPartition, list[Any]], checkpoint: bool = False) -> bool:
        """Hand one ``getmany()`` batch to the detection host (see :meth:`_apply_next`); False if nothing was left to submit.

        With ``checkpoint`` the host dumps every partition's dirty users after
        the batch, and the checkpoint is written when the batch is applied.
        """
        jobs: list[Job] = []
        inflight: list[tuple[_Partition, TopicPartition, list[Any]]] = []
        messages = 0
        parts = self.parts
        for tp, records in batch.items():
            part = parts.get(tp.partition)
            if part is None or not records or tp not in part.tps:
                continue  # revoked while the batch was in flight: the next owner replays it
            expected = part.expected.get(tp.topic)
            if expected is not None and records[0].offset != expected:
                records = self._align(part, tp, records, expected)
                if not records:
                    continue
            part.expected[tp.topic] = records[-1].offset + 1
            messages += len(records)
            jobs.append((part.number, tp.topic, [r.offset for r in records], [r.value for r in records], [r.timestamp for r in records]))
            inflight.append((part, tp, records))
        self.stats.batches += 1
        self.stats.messages += messages
        self._batch_size.observe(messages)
        if not jobs:
            return False
        self.host.submit(jobs, checkpoint)
        self._inflight.append((inflight, checkpoint))
        return True

    async def _apply_next(self) -> None:
        """Collect the oldest submitted batch, apply its results, and write the checkpoint that rode with it."""
        inflight, checkpoint = self._inflight.popleft()
        collected = await self.host.collect()
        await self._apply(inflight, collected.results)
        if checkpoint:
            # The host dumped its state right after this batch, and no later
            # batch is applied yet: the partitions' offsets match that state.
            parts = [p for n, p in self.parts.items() if n in collected.checkpoints]
            await self._write_checkpoint(parts, collected.checkpoints, background=True)

    async def _finish(self) -> None:
        """Collect and apply every submitted batch (before checkpoints and rebalances)."""
        while self._inflight:
            await self._apply_next()

    async def _apply(self, inflight: list[tuple[_Partition, TopicPartition, list[Any]]], results: list[BatchResult]) -> None:
        """Dead letters, offsets, metrics and alerts of processed jobs."""
        if not inflight:
            return
        alerts: list[Alert] = []
        children = self._detector_children
        stats = self.stats
        for (part, tp, records), res in zip(inflight, results, strict=True):
            for i, index, code, reason, fieldname, event_id in res.dead:
                self._dead_letter(tp, records[i], code, reason, fieldname, index, event_id)
            if res.alerts:
                alerts.extend(res.alerts)
            part.next_offset[tp.topic] = records[-1].offset + 1
            part.users = res.users
            part.topic_consumed[tp.topic].inc(res.events + res.invalid)
            stats.events += res.events
            stats.skipped += res.skipped
            for action, count in res.actions.items():
                for child in children.get(action, ()):
                    child.inc(count)
            self._engine_seconds.observe(res.seconds)
        await self._publish(alerts)

    def _align(self, part: _Partition, tp: TopicPartition, records: list[Any], expected: int) -> list[Any]:
        """Records from ``expected`` on: the state already holds everything before it.

        The fetcher may hand out records from before the restored position (a
        reset to the committed offset racing the seek made on assignment):
        those are dropped, so nothing is counted twice. A batch starting past
        ``expected`` would skip records: the partition is sought back once; if
        the same gap comes again it is real (transaction markers, compaction)
        and accepted.
        """
        first = records[0].offset
        if first < expected:
            kept = [r for r in records if r.offset >= expected]
            self.stats.skipped += len(records) - len(kept)
            part.log.debug("records before the restored position dropped", topic=tp.topic, expected=expected, got=first, dropped=len(records) - len(kept))
            return kept
        if part.gap_checked.get(tp.topic) == expected:
            part.log.warning("gap in input offsets accepted", topic=tp.topic, expected=expected, got=first)
            return records
        part.gap_checked[tp.topic] = expected
        part.log.warning("gap in input offsets: seeking back", topic=tp.topic, expected=expected, got=first)
        assert self.consumer is not None
        self.consumer.seek(tp, expected)
        return []

    def _dead_letter(
        self,
        tp: TopicPartition,
        record: Any,
        code: str,
        reason: str,
        fieldname: str,
        index: int | None = None,
        event_id: str | None = None,
    ) -> None:
        """Queue ``record``'s original bytes for the dead-letter topic, with why."""
        if code == "late":
            self.stats.late += 1
        scrub = self.codec.pseudonymizer.scrub
        headers = [
            ("reason", scrub(reason)[0].encode()),
            ("code", code.encode()),
            ("field", scrub(fieldname)[0].encode()),
            ("source_topic", tp.topic.encode()),
            ("source_partition", str(tp.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        if index is not None:
            headers.append(("index", str(index).encode()))
        if event_id is not None:
            headers.append(("event_id", event_id.encode()))
        self._dlq.append((record.key, record.value, headers))
        metrics.EVENTS_INVALID.labels(code).inc()
        self.stats.dead_letters += 1

    async def _publish(self, alerts: list[Alert]) -> None:
        assert self.producer is not None
        producer = self.producer
        pending = self._pending
        if self._dlq:
            dlq, self._dlq = self._dlq, []
            topic = self.settings.topic_dlq
            for key, value, headers in dlq:
                if key is None and value is None:
                    value = b""  # a null record: Kafka needs a key or a value
                try:
                    pending.append(await producer.send(topic, value, key=key, headers=headers))
                except MessageSizeTooLargeError:
                    cut = (value or b"")[: 512 * 1024]
                    pending.append(await producer.send(topic, cut, key=key, headers=[*headers, ("truncated", b"true")]))
        if not alerts:
            return
        now = time.time()
        topic_alerts = self.settings.topic_alerts
        topic_esc = self.settings.topic_escalations
        rank = self.escalation_rank
        latency = metrics.EVENT_TO_ALERT_LATENCY
        for alert in alerts:
            value = alert.to_json()
            key = alert.alert_id.encode()
            headers = [("revision", str(alert.revision).encode())]
            pending.append(await producer.send(topic_alerts, value, key=key, headers=headers))
            metrics.ALERTS.labels(alert.rule_id, alert.severity).inc()
            if SEVERITY_RANK.get(alert.severity, 0) >= rank:
                pending.append(await producer.send(topic_esc, value, key=key, headers=headers))
                metrics.ALERTS_ESCALATED.labels(alert.severity).inc()
            latency.observe(max(0.0, now - alert.last_ts_ms / 1000))
            if alert.revision == 1:
                self.log.info("alert", alert_id=alert.alert_id, rule_id=alert.rule_id, severity=alert.severity)
            else:
                self.log.debug("alert revised", alert_id=alert.alert_id, rule_id=alert.rule_id, revision=alert.revision)
        self.stats.alerts += len(alerts)

    # -- checkpoints ------------------------------------------------------------

    async def _checkpoint(self, parts: Sequence[_Partition], commit: bool = True) -> None:
        """Every submitted batch applied, then the partitions' state checkpointed (:meth:`_write_checkpoint`)."""
        await self._finish()
        dumps = {part.number: await self.host.checkpoint(part.number) for part in parts if part.next_offset}
        await self._write_checkpoint(parts, dumps, commit)

    async def _write_checkpoint(
        self, parts: Sequence[_Partition], dumps: dict[int, PartitionCheckpoint], commit: bool = True, background: bool = False
    ) -> None:
        """Alerts delivered, then dirty state + meta written and delivered, then offsets committed.

        ``dumps`` holds each partition's :meth:`PartitionEngines.checkpoint`,
        taken when every batch applied so far, and no later one, was processed.
        The records are built here; their delivery (after the alerts sent so
        far) and the commit run in the background with ``background`` (the
        periodic checkpoint: the loop goes on fetching and the children on
        detecting meanwhile), else before this returns. One checkpoint is
        delivered at a time, in order: a newer user state never lands before
        an older one, and commits only move forward.
        """
        await self._checkpoint_done()
        assert self.producer is not None
        producer = self.producer
        batches: list[tuple[int, Any]] = []
        done: list[tuple[_Partition, dict[str, int]]] = []
        wrote = 0
        for part in parts:
            offsets = dict(part.next_offset)
            if not offsets or part.number not in dumps:
                continue
            dirty, max_ts, part.users = dumps[part.number]
            if not dirty and offsets == part.checkpointed:
                continue
            headers = [(f"asof:{t}", str(o).encode()) for t, o in sorted(offsets.items())]
            partition = part.number
            sizes = part.sizes
            batch = producer.create_batch()
            for user, data in dirty:
                key = USER_KEY_PREFIX + user.encode()
                if batch.append(key=key, value=data, timestamp=None, headers=headers) is None:
                    batches.append((partition, batch))
                    batch = producer.create_batch()
                    batch.append(key=key, value=data, timestamp=None, headers=headers)
                size = len(data) if data is not None else 0
                part.state_bytes += size - sizes.get(user, 0)
                if data is None:
                    sizes.pop(user, None)
                else:
                    sizes[user] = size
                wrote += 1
            meta = orjson.dumps(
                {
                    "v": _META_VERSION,
                    "offsets": offsets,
                    "max_ts": max_ts,
                    "users": part.users,
                    "worker": self.worker_name,
                    "written_ms": int(time.time() * 1000),
                }
            )
            meta_key = CHECKPOINT_META.encode()
            if batch.append(key=meta_key, value=meta, timestamp=None, headers=headers) is None:
                batches.append((partition, batch))
                batch = producer.create_batch()
                batch.append(key=meta_key, value=meta, timestamp=None, headers=headers)
            batches.append((partition, batch))
            done.append((part, offsets))
        self._report_state()
        pending, self._pending = self._pending, []
        delivery = self._deliver_checkpoint(pending, batches, done, commit, wrote)
        if background:
            self._checkpoint_task = asyncio.ensure_future(delivery)
        else:
            await delivery

    async def _deliver_checkpoint(
        self,
        pending: list[asyncio.Future[Any]],
        batches: list[tuple[int, Any]],
        done: list[tuple[_Partition, dict[str, int]]],
        commit: bool,
        wrote: int,
    ) -> None:
        """The second half of :meth:`_write_checkpoint`: alerts, then state records, then the commit."""
        assert self.producer is not None and self.consumer is not None
        if pending:
            await asyncio.gather(*pending)
            self.broker_ok_at = time.monotonic()
        if batches:
            topic = self.settings.topic_checkpoints
            futures = [await self.producer.send_batch(batch, topic, partition=partition) for partition, batch in batches]
            await asyncio.gather(*futures)
            self.broker_ok_at = time.monotonic()
            self.stats.checkpoints += 1
        commits = {}
        for part, offsets in done:
            part.checkpointed = offsets
            for tp in part.tps:
                if tp.topic in offsets:
                    commits[tp] = offsets[tp.topic]
        if commit and commits:
            try:
                await self.consumer.commit(commits)
            except Exception as exc:  # a rebalance in progress etc.: the checkpoint is what counts
                self.log.warning("offset commit failed (checkpoint written)", error=str(exc))
        if done:
            self.log.debug("checkpoint", partitions=len(done), users_written=wrote)

    async def _checkpoint_done(self) -> None:
        """Wait for the checkpoint being delivered in the background, if any; raises its error."""
        task, self._checkpoint_task = self._checkpoint_task, None
        if task is not None:
            await task

    def _report_state(self) -> None:
        users = sum(p.users for p in self.parts.values())
        size = sum(p.state_bytes for p in self.parts.values())
        metrics.USERS_TRACKED.inc(users - self._reported_users)
        metrics.STATE_BYTES.inc(size - self._reported_bytes)
        self._reported_users, self._reported_bytes = users, size

    # -- rebalancing ------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.assigned = False
        async with self._lock:
            numbers = {tp.partition for tp in revoked if tp.topic in self.input_topics}
            parts = [self.parts[n] for n in sorted(numbers) if n in self.parts]
            if parts:
                try:
                    await self._checkpoint(parts)  # collects the batch in flight first
                except Exception as exc:
                    self.log.error("checkpoint on revoke failed; the next owner replays from the previous one", error=str(exc))
                await self._finish()  # (if the checkpoint failed before collecting it)
                await self.host.drop([p.number for p in parts])
            for part in parts:
                self._drop(part)
            self._report_state()
            if parts:
                self.log.info("partitions revoked", partitions=[n for p in parts for n in p.names()])

    def _drop(self, part: _Partition) -> None:
        self.parts.pop(part.number, None)
        for tp in part.tps:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            by_number: dict[int, list[TopicPartition]] = defaultdict(list)
            for tp in assigned:
                if tp.topic in self.input_topics:
                    by_number[tp.partition].append(tp)
            split = {n: tps for n, tps in by_number.items() if len(tps) != len(self.input_topics)}
            if split:
                # Only part of a partition number: another worker would feed the same users' state.
                exc = RuntimeError(
                    "input topics are not co-partitioned in this assignment (does every worker of the group "
                    f"use the range assignor?): {sorted(f'{tp.topic}:{tp.partition}' for tps in split.values() for tp in tps)}"
                )
                self.log.error("assignment not co-partitioned; stopping", error=str(exc))
                self._fatal = exc
                self._stop.set()
                return
            new = sorted(n for n in by_number if n not in self.parts)
            if new:
                started = time.monotonic()
                try:
                    await self._finish()
                    await self._restore({n: by_number[n] for n in new})
                except Exception as exc:
                    # Without its state a partition must not be processed: stop the worker.
                    self.log.error("restore failed; stopping", error=str(exc))
                    self._fatal = exc
                    self._stop.set()
                    return
                self.log.info(
                    "partitions assigned",
                    partitions=[name for n in new for name in self.parts[n].names()],
                    restored_users=sum(self.parts[n].users for n in new),
                    seconds=round(time.monotonic() - started, 3),
                )
            self._report_state()
            self.assigned = True
            self.ever_assigned = True

    async def _restore(self, assigned: dict[int, list[TopicPartition]]) -> None:
        """Rebuild the engines of newly assigned partitions from the checkpoint topic; seek the inputs."""
        assert self._reader is not None and self.consumer is not None and self.producer is not None
        reader = self._reader
        ckpt_topic = self.settings.topic_checkpoints
        ctps = [TopicPartition(ckpt_topic, n) for n in sorted(assigned)]
        # Read up to a fence record written now rather than to the reported end
        # offset: some Kafka-compatible brokers (tansu) report the end offset of
        # a partition written with multi-record batches too low. The fence is
        # exact everywhere and keeps one (compacted) key per partition.
        fence_value = f"{self.worker_name}:{time.time_ns()}".encode()
        fences = [await self.producer.send(ckpt_topic, fence_value, key=_FENCE_KEY, partition=ctp.partition) for ctp in ctps]
        fence_at = {ctp: (await fut).offset for ctp, fut in zip(ctps, fences, strict=True)}
        reader.assign(ctps)
        begins = await reader.beginning_offsets(ctps)
        users: dict[int, dict[bytes, tuple[bytes | None, dict[str, int]]]] = defaultdict(dict)
        metas: dict[int, bytes] = {}
        remaining = set(ctps)
        for ctp in ctps:
            reader.seek(ctp, begins[ctp])
        meta_key = CHECKPOINT_META.encode()
        prefix = USER_KEY_PREFIX
        cut = len(prefix)
        while remaining:
            batch = await reader.getmany(*remaining, timeout_ms=1000, max_records=100_000)
            for ctp, records in batch.items():
                end = fence_at[ctp]
                n = ctp.partition
                table = users[n]
                for r in records:
                    if r.offset >= end:
                        remaining.discard(ctp)
                        break
                    key = r.key
                    if key is None:
                        continue
                    if key.startswith(prefix):
                        asof = {hk[5:]: int(hv) for hk, hv in r.headers or () if hk.startswith("asof:")}
                        table[key[cut:]] = (r.value, asof)
                    elif key == meta_key and r.value is not None:
                        metas[n] = r.value
        reader.assign([])
        self.broker_ok_at = time.monotonic()
        for n, tps in sorted(assigned.items()):
            log = self.log.bind(partition=n)
            part = _Partition(n, tps, log)
            meta_raw = metas.get(n)
            meta = orjson.loads(meta_raw) if meta_raw else None
            if meta is not None and meta.get("v") != _META_VERSION:
                log.warning("checkpoint meta of another version ignored; starting this partition afresh", version=meta.get("v"))
                meta, users[n] = None, {}
            base: dict[str, int] = {str(t): int(o) for t, o in (meta or {}).get("offsets", {}).items()}
            records = [(user_b.decode("utf-8", "replace"), value, asof) for user_b, (value, asof) in users[n].items()]
            max_ts = int(meta["max_ts"]) if meta is not None and meta.get("max_ts") is not None else None
            res = await self.host.restore(n, records, base, max_ts)
            for error in res.errors:
                log.warning("unreadable user state dropped", error=error)
            if res.unreadable:
                log.warning("user states dropped", count=res.unreadable)
            unreadable = set(res.unreadable_users)
            for user, value, _ in records:
                if value is not None and user not in unreadable:
                    part.sizes[user] = len(value)
                    part.state_bytes += len(value)
            if res.users_ahead:
                log.info("resuming after a torn checkpoint", users_ahead=res.users_ahead, replay_from=base, skip_until=res.skip_max)
            for tp in tps:
                if tp.topic in base:
                    self.consumer.seek(tp, base[tp.topic])
                    part.next_offset[tp.topic] = base[tp.topic]
                    part.expected[tp.topic] = base[tp.topic]
            part.checkpointed = dict(part.next_offset)
            part.users = res.users
            self.stats.restored_users += res.users
            self.parts[n] = part

    # -- lag and broker reachability ---------------------------------------------

    async def _lag_loop(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(self.lag_interval)
            try:
                await self.refresh_lag()
                warned = False
            except Exception as exc:
                if not warned:
                    self.log.warning("broker request failed", error=str(exc))
                    warned = True

    async def refresh_lag(self) -> dict[TopicPartition, int]:
        """Ask the broker for end offsets, publish the lag (end offset minus next offset to process)."""
        assert self.consumer is not None
        parts = list(self.parts.values())
        tps = [tp for part in parts for tp in part.tps]
        if tps:
            ends = await self.consumer.end_offsets(tps)
        else:
            await self.consumer._client.fetch_all_metadata()  # (private API) a cheap broker round trip
            ends = {}
        self.broker_ok_at = time.monotonic()
        out = {}
        for part in parts:
            for tp in part.tps:
                if tp in ends:
                    # Nothing processed yet: everything up to the end is behind.
                    lag = max(0, ends[tp] - part.next_offset.get(tp.topic, 0))
                    part.lag[tp.topic].set(lag)
                    out[tp] = lag
        return out
