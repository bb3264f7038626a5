"""Where a worker's detectors run: in the worker process, or in a child process beside it.

:class:`PartitionEngines` is the synchronous core of the hot path: for one
partition number's batch of raw message values it decodes (``orjson``),
validates and pseudonymises (:meth:`EventCodec.from_dict`) and runs the
:class:`~detectors.engine.Engine`, and it dumps and restores the engines'
user states for checkpoints. It knows nothing about Kafka: records go in as
``(offset, value)`` and what comes out names records by their index.

:class:`DetectionHost` runs a :class:`PartitionEngines` for a
:class:`~streams.detection.DetectionLoop`, either

* *in process* (``detection_process = false``): every call runs at once in
  the worker's event loop; or
* in a *child process* (``detection_process = true``, the default on
  machines with two cores or more): the worker process keeps the Kafka
  clients and the child does decoding, validation and detection. The two are
  pipelined: the loop submits a batch, fetches the next one from Kafka
  while the child works, and only then collects the result
  (:meth:`DetectionHost.submit` / :meth:`DetectionHost.collect`). Kafka's
  record parsing in aiokafka costs about as much CPU per event as the
  detectors do, so on two cores this nearly doubles what one worker takes.

Several batches may be submitted before the first is collected: the child
then starts the next as soon as it has replied to the previous one, instead
of waiting for the worker to fetch and hand it over. Requests are written by
a helper thread (a batch is megabytes; the pipe takes it only as fast as the
child reads), so the worker's event loop never blocks on a busy child. A
batch may also carry a checkpoint request (``submit(..., checkpoint=True)``):
after the batch the child dumps every partition's dirty users, so writing
the checkpoint overlaps with the child's work on the next batch.

The child is started with ``spawn`` (no copy of the worker's event loop or
sockets), ignores SIGINT (a Ctrl-C reaches the worker, which then stops the
child) and exits when its pipe closes, so a worker killed with SIGKILL
leaves no child behind. Requests and replies are pickled over one
:func:`multiprocessing.Pipe`, strictly one request at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import pickle
import re
import signal
import time
import traceback
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeAlias

import orjson

from detectors.base import HOUR_MS
from detectors.engine import Engine, EngineSettings, calendar_from_rules
from detectors.rules import Rule
from schemas.alert import Alert
from schemas.event import (
    OPTIONAL_INT_FIELDS,
    OPTIONAL_STR_FIELDS,
    REQUIRED_FIELDS,
    Event,
    EventCodec,
    EventError,
)
from schemas.mynumber import Pseudonymizer, contains_wide_or_escaped_digits

__all__ = [
    "AHEAD_CODE",
    "BatchResult",
    "Collected",
    "DetectionHost",
    "DetectionPool",
    "DetectionProcessError",
    "Job",
    "PartitionCheckpoint",
    "PartitionEngines",
    "RestoreResult",
    "error_code",
    "has_twelve_digits",
]

_PICKLE: Final = pickle.HIGHEST_PROTOCOL

_DIGIT_MAP: Final = bytes.maketrans(b"0123456789 ", b"0000000000-")
_TWELVE: Final = re.compile(rb"0000(?:-|\xe3\x80\x80)?0000(?:-|\xe3\x80\x80)?0000")


def has_twelve_digits(raw: bytes) -> bool:
    """Exactly :func:`schemas.mynumber.contains_twelve_digits`, several times faster on event JSON.

    Mapping every digit to ``0`` and a space to ``-`` turns the character
    classes of ``[0-9]{4}(?:[ \\-]|U+3000)?...`` into literals, and the regex
    engine then skips ahead to each ``0000`` instead of trying every
    position. Full-width digits and JSON escapes are looked for only where
    a one-byte search finds their first byte.
    """
    return _TWELVE.search(raw.translate(_DIGIT_MAP)) is not None or contains_wide_or_escaped_digits(raw)


class DetectionProcessError(RuntimeError):
    """The detection child process died or failed; the worker must stop."""


class BatchResult:
    """What one partition's batch produced.

    ``dead`` rows are ``(record index, element index or None, code, reason,
    field, late event id or None)``: an invalid message (or element of an
    array message), or an event the engine refused as late.
    """

    __slots__ = ("actions", "alerts", "dead", "events", "invalid", "seconds", "skipped", "users")

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.dead: list[tuple[int, int | None, str, str, str, str | None]] = []
        self.actions: dict[str, int] = {}
        self.events = 0
        self.invalid = 0
        self.skipped = 0
        self.users = 0
        self.seconds = 0.0

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.alerts, self.dead, self.actions, self.events, self.invalid, self.skipped, self.users, self.seconds)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.alerts, self.dead, self.actions, self.events, self.invalid, self.skipped, self.users, self.seconds) = state


#: One partition's checkpoint: (dirty users' states, ``None`` for a forgotten
#: user; the engine's ``max_ts``; users held).
PartitionCheckpoint: TypeAlias = tuple[list[tuple[str, bytes | None]], int, int]

#: A submitted job: (partition number, topic, offsets, message values[, Kafka timestamps]).
Job: TypeAlias = tuple[int, str, Sequence[int], Sequence[bytes | None]] | tuple[int, str, Sequence[int], Sequence[bytes | None], Sequence[int]]


class Collected(NamedTuple):
    """What :meth:`DetectionHost.collect` returns for one submitted batch."""

    #: One result per job, in submission order.
    results: list[BatchResult]
    #: Partition number -> its checkpoint after the batch (only if one was requested).
    checkpoints: dict[int, PartitionCheckpoint]


class RestoreResult:
    """What restoring one partition's engine found."""

    __slots__ = ("errors", "skip_max", "unreadable", "unreadable_users", "users", "users_ahead")

    def __init__(self) -> None:
        self.users = 0
        self.unreadable = 0
        #: Users whose state could not be loaded (they start afresh).
        self.unreadable_users: list[str] = []
        #: The first few load errors (for the worker's log).
        self.errors: list[str] = []
        #: Users whose state is ahead of the checkpoint's offsets (a torn checkpoint).
        self.users_ahead = 0
        #: Topic -> highest offset below which some user's events are already in its state.
        self.skip_max: dict[str, int] = {}

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.users, self.unreadable, self.unreadable_users, self.errors, self.users_ahead, self.skip_max)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.users, self.unreadable, self.unreadable_users, self.errors, self.users_ahead, self.skip_max) = state


#: The reason given for an event the engine refused as late.
_LATE_REASON: Final = "late: beyond allowed lateness"
#: Dead-letter code of an event time too far ahead of its message's Kafka timestamp.
AHEAD_CODE: Final = "ts.ahead"


class _Slot:
    """One partition number's engine and its torn-checkpoint skip table."""

    __slots__ = ("engine", "skip", "skip_max")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: (topic, user) -> input offset below which the user's events are already in its restored state.
        self.skip: dict[tuple[str, str], int] = {}
        #: Topic -> highest such offset (the table is dropped once every topic is past it).
        self.skip_max: dict[str, int] = {}


class PartitionEngines:
    """One engine per partition number, fed raw message values (synchronous, no I/O)."""

    def __init__(self, rules: Sequence[Rule], engine_settings: EngineSettings, pseudonym_key: bytes, max_ahead_ms: int = 0) -> None:
        self.rules = list(rules)
        self.engine_settings = engine_settings
        #: Events whose time is more than this ahead of their message's Kafka timestamp are dead-lettered (0: no check).
        self.max_ahead_ms = max_ahead_ms
        self._ahead_reason = f"ahead: more than {_duration_text(max_ahead_ms)} after its Kafka message's timestamp (a wrong clock?)"
        self.calendar = calendar_from_rules([r for r in self.rules if r.enabled])
        self.codec = EventCodec(Pseudonymizer(pseudonym_key))
        self.slots: dict[int, _Slot] = {}

    def new_engine(self) -> Engine:
        """A fresh engine with this host's rules."""
        return Engine(self.rules, self.engine_settings, self.calendar)

    def users(self) -> dict[int, int]:
        """Partition number -> users its engine holds."""
        return {n: len(slot.engine.users) for n, slot in self.slots.items()}

    def drop(self, numbers: Sequence[int]) -> None:
        """Forget the engines of revoked partitions."""
        for n in numbers:
            self.slots.pop(n, None)

    def restore(
        self,
        number: int,
        users: Sequence[tuple[str, bytes | None, dict[str, int]]],
        base: dict[str, int],
        max_ts: int | None,
    ) -> RestoreResult:
        """A fresh engine for ``number`` from checkpointed ``(user, state, asof offsets)`` records.

        ``base`` is the meta record's offsets (where the inputs resume);
        a user whose ``asof`` is past them was written after the meta record
        (a torn checkpoint) and its replayed events below ``asof`` are skipped.
        """
        slot = self.slots[number] = _Slot(self.new_engine())
        engine = slot.engine
        out = RestoreResult()
        for user, value, asof in users:
            if value is not None:
                try:
                    engine.load_user(user, value)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    out.unreadable += 1
                    out.unreadable_users.append(user)
                    if len(out.errors) < 3:
                        out.errors.append(str(exc)[:200])
                    continue
            ahead = False
            for topic, offset in asof.items():
                if offset > base.get(topic, 0):
                    slot.skip[(topic, user)] = offset
                    slot.skip_max[topic] = max(slot.skip_max.get(topic, 0), offset)
                    ahead = True
            out.users_ahead += ahead
        if max_ts is not None:
            engine.max_ts = max_ts
            engine._next_sweep = (max_ts // HOUR_MS + 1) * HOUR_MS  # (private API) keep sweeps aligned with the restored watermark
        engine.clear_dirty()
        out.users = len(engine.users)
        out.skip_max = dict(slot.skip_max)
        return out

    def checkpoint(self, number: int) -> PartitionCheckpoint:
        """(dirty users' states, ``None`` for a forgotten user; the engine's ``max_ts``; users held)."""
        engine = self.slots[number].engine
        dirty = engine.clear_dirty()
        dump = engine.dump_user
        return [(user, dump(user)) for user in dirty], engine.max_ts, len(engine.users)

    def process_many(self, jobs: Sequence[Job], checkpoint: bool = False) -> Collected:
        """:meth:`process` for each ``(number, topic, offsets, values)``, then, if asked, :meth:`checkpoint` every partition."""
        results = [self.process(*job) for job in jobs]
        return Collected(results, {n: self.checkpoint(n) for n in self.slots} if checkpoint else {})

    def process(
        self, number: int, topic: str, offsets: Sequence[int], values: Sequence[bytes | None], stamps: Sequence[int] | None = None
    ) -> BatchResult:
        """Decode, validate and detect one partition's messages of ``topic``, in offset order.

        ``stamps`` are the messages' Kafka timestamps (epoch ms, negative if
        unknown): an event more than ``max_ahead_ms`` after its message's is
        dead-lettered (code ``ts.ahead``) before the engine sees it. One
        event from a machine whose clock is years ahead would otherwise move
        the partition's event time, and with it the sweeps that close findings,
        years ahead.

        One pass, one message at a time: each decoded dict is validated and
        handed to the engine at once and dropped, so a batch never keeps
        thousands of containers alive for the garbage collector to scan
        (measured: joining a batch into one JSON array and parsing it once
        was slower, 2.2 vs 0.8 us per event, for that reason).
        Pseudonymisation is applied only to messages whose raw bytes hold a
        12-digit run, and the whole batch is scanned once first (a 12-digit
        run cannot span the separator). The other messages try
        :meth:`EventCodec.from_json` first: one plain event object validated
        in C (1.7 instead of 3.0 us per event, measured), with
        ``orjson.loads`` plus ``from_dict`` for the rest (arrays, escapes,
        anything that needs the precise error).
        """
        started = time.perf_counter()
        out = BatchResult()
        slot = self.slots[number]
        engine = slot.engine
        try:
            scrub_any = has_twelve_digits(b"\n".join(values))  # type: ignore[arg-type]
        except TypeError:  # a None value (tombstone) among them
            scrub_any = True
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        from_json = self.codec.from_json
        from_dict = self.codec.from_dict
        process = engine.process
        late = engine.late
        skip = slot.skip
        dead = out.dead
        actions: list[str] = []
        add_action = actions.append
        skipped = 0
        max_ahead = self.max_ahead_ms
        check_ahead = bool(max_ahead) and stamps is not None
        one: list[Any] = [None]
        for i, value in enumerate(values):
            if not value:
                dead.append((i, None, "$.empty", "empty message", "$", None))
                continue
            scrub = scrub_any and has_twelve_digits(value)
            ev: Event | None = None
            if not scrub:
                try:
                    ev = from_json(value)
                except EventError as exc:
                    dead.append((i, None, error_code(exc), exc.reason, exc.field, None))
                    continue
            # (One event per message, as log shippers send: no new list, no enumerate.)
            items: list[Any] = one
            array = False
            if ev is not None:
                one[0] = ev  # validated in one C pass (the usual case)
            else:
                try:
                    doc = loads(value)
                except decode_error as exc:
                    dead.append((i, None, "json", f"invalid JSON: {str(exc)[:80]}", "$", None))
                    continue
                if type(doc) is dict:
                    one[0] = doc
                elif type(doc) is list:
                    items = doc
                    array = True
                else:
                    exc_ = EventError("$", f"an event must be a JSON object, got {type(doc).__name__}")
                    dead.append((i, None, error_code(exc_), exc_.reason, exc_.field, None))
                    continue
            j = -1
            for item in items:
                j += 1
                if type(item) is Event:
                    ev = item
                else:
                    try:
                        ev = from_dict(item, scrub)
                    except EventError as exc:
                        dead.append((i, j if array else None, error_code(exc), exc.reason, exc.field, None))
                        continue
                if check_ahead and ev.ts_ms > stamps[i] + max_ahead and stamps[i] >= 0:  # type: ignore[index]
                    dead.append((i, j if array else None, AHEAD_CODE, self._ahead_reason, "ts", ev.event_id))
                    continue
                if skip:
                    limit = skip.get((topic, ev.user))
                    if limit is not None and offsets[i] < limit:
                        skipped += 1
                        continue
                try:
                    process(ev)
                except Exception as exc:  # a detector bug must not stop the partition on every restart
                    dead.append((i, j if array else None, "internal", _internal_reason(exc), "$", ev.event_id))
                    continue
                add_action(ev.action)
                if late:
                    for lev in engine.drain_late():
                        dead.append((i, j if array else None, "late", _LATE_REASON, "ts", lev.event_id))
                    late = engine.late
        if engine.out:
            out.alerts = engine.drain()
        if skip and offsets and offsets[-1] + 1 >= slot.skip_max.get(topic, 0):
            slot.skip_max.pop(topic, None)
            if not slot.skip_max:
                skip.clear()
        out.events = len(actions)
        out.invalid = sum(1 for d in dead if d[2] != "late")
        out.skipped = skipped
        out.actions = dict(Counter(actions))
        out.users = len(engine.users)
        out.seconds = time.perf_counter() - started
        return out


#: Fields an EventError may name; anything else is reported as ``unknown_field``
#: so the ``reason`` metric label stays bounded whatever producers send.
_ERROR_FIELDS: Final = frozenset(("$", *REQUIRED_FIELDS, *OPTIONAL_STR_FIELDS, *OPTIONAL_INT_FIELDS, "schema_version", "pii_scrubbed"))


def _duration_text(ms: int) -> str:
    """``86400000`` -> ``"1d"``; the largest whole unit of days, hours, minutes, seconds."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _internal_reason(exc: Exception) -> str:
    """Why an event failed inside the detectors: the exception type and where (no message: it may quote the event)."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return f"internal error in the detectors: {type(exc).__name__}{at}; please report it"


def error_code(exc: EventError) -> str:
    """A bounded metric label for an invalid event: ``field.reason-kind``, ``json``, or ``unknown_field``."""
    if exc.field not in _ERROR_FIELDS:
        return "unknown_field"
    if exc.field == "$" and exc.reason.startswith("invalid JSON"):
        return "json"
    return exc.code


# -- the child process ---------------------------------------------------------


def _child_main(conn: Any, payload: bytes) -> None:  # pragma: no cover - runs in the child (tested end to end)
    """Serve requests from the worker until the pipe closes or ``stop`` comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rules, engine_settings, key, gc_threshold, max_ahead_ms = pickle.loads(payload)
    engines = PartitionEngines(rules, engine_settings, key, max_ahead_ms)
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(gc_threshold, 20, 100)
    recv, send, dumps, loads = conn.recv_bytes, conn.send_bytes, pickle.dumps, pickle.loads
    while True:
        try:
            request = recv()
        except (EOFError, OSError):
            return
        method, args = loads(request)
        if method == "stop":
            send(dumps(("ok", None), _PICKLE))
            return
        try:
            reply = ("ok", getattr(engines, method)(*args))
        except BaseException as exc:  # reported to the worker, which stops
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            send(dumps(reply, _PICKLE))
        except (BrokenPipeError, OSError):
            return


class DetectionHost:
    """Runs a :class:`PartitionEngines` in this process or in a child process (see the module doc).

    All methods are coroutines so the loop's code is the same either way.
    :meth:`submit` starts processing a batch; :meth:`collect` returns the
    results of the oldest batch submitted. Any other call first requires that
    every submitted batch is collected.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        engine_settings: EngineSettings,
        pseudonym_key: bytes,
        *,
        in_child: bool,
        gc_threshold: int = 50_000,
        max_ahead_ms: int = 0,
    ) -> None:
        self.in_child = in_child
        self._local: PartitionEngines | None = None
        #: Submitted, not yet collected: results (in process) or the request's send (child), oldest first.
        self._submitted: deque[Any] = deque()
        self._proc: Any = None
        self._conn: Any = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._payload = pickle.dumps((list(rules), engine_settings, pseudonym_key, gc_threshold, max_ahead_ms), _PICKLE)
        if not in_child:
            self._local = PartitionEngines(rules, engine_settings, pseudonym_key, max_ahead_ms)

    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` in process or before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def busy(self) -> bool:
        """A batch is submitted and not yet collected."""
        return bool(self._submitted)

    @property
    def submitted(self) -> int:
        """Batches submitted and not yet collected."""
        return len(self._submitted)

    def ready(self) -> bool:
        """The oldest submitted batch's results can be collected without waiting."""
        if not self._submitted:
            return False
        if self._local is not None:
            return True
        sent = self._submitted[0]
        try:
            return bool(sent.done() and self._conn is not None and self._conn.poll())
        except (EOFError, OSError):
            return True  # collect() reports the dead child

    async def start(self) -> None:
        """Start the child process (in-process hosts have nothing to start)."""
        if not self.in_child or self._proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_child_main, args=(child, self._payload), name="leakwatch-detection", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="leakwatch-detection-send")
        await self._call("users")  # the child is up and its rules load

    async def close(self) -> None:
        """Stop the child (it finishes the request in hand first)."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        self._proc = self._conn = None
        writer, self._writer = self._writer, None
        submitted = self._submitted

        async def drain_and_stop() -> None:
            while submitted:  # (results nobody collects: the child finishes them first)
                await submitted.popleft()
                await self._recv(conn, proc)
            conn.send_bytes(pickle.dumps(("stop", ()), _PICKLE))
            await self._recv(conn, proc)

        with contextlib.suppress(Exception):  # a stuck or dead child: killed below
            await asyncio.wait_for(drain_and_stop(), 10)
        submitted.clear()
        conn.close()
        if writer is not None:
            writer.shutdown(wait=False)
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
        if proc.is_alive():
            proc.kill()

    # -- requests ---------------------------------------------------------------

    async def _recv(self, conn: Any, proc: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        if not conn.poll():
            ready = loop.create_future()
            fd = conn.fileno()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        try:
            status, value = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            proc = proc if proc is not None else self._proc
            code = proc.exitcode if proc is not None else None
            raise DetectionProcessError(f"detection process died (exit code {code})") from exc
        if status != "ok":
            raise DetectionProcessError(f"detection process failed: {value}")
        return value

    def _send(self, method: str, args: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise DetectionProcessError("detection process not running")
        try:
            self._conn.send_bytes(pickle.dumps((method, args), _PICKLE))
        except (BrokenPipeError, OSError) as exc:
            raise DetectionProcessError("detection process died") from exc

    async def _call(self, method: str, *args: Any) -> Any:
        if self._submitted:
            raise RuntimeError(f"{method}: a submitted batch has not been collected")
        if self._local is not None:
            return getattr(self._local, method)(*args)
        self._send(method, args)
        return await self._recv(self._conn)

    def submit(self, jobs: list[Job], checkpoint: bool = False) -> None:
        """Start processing ``(number, topic, offsets, values)`` jobs, then (if ``checkpoint``) dump every partition.

        Call from the event loop. Earlier batches need not be collected
        first; :meth:`collect` returns results in submission order.
        """
        if self._local is not None:
            self._submitted.append(self._local.process_many(jobs, checkpoint))
            return
        if self._conn is None or self._writer is None:
            raise DetectionProcessError("detection process not running")
        data = pickle.dumps(("process_many", (jobs, checkpoint)), _PICKLE)
        self._submitted.append(asyncio.get_running_loop().run_in_executor(self._writer, self._conn.send_bytes, data))

    async def collect(self) -> Collected:
        """The results of the oldest submitted batch (nothing if none is submitted)."""
        if not self._submitted:
            return Collected([], {})
        entry = self._submitted.popleft()
        if self._local is not None:
            local: Collected = entry
            return local
        try:
            await entry
        except (BrokenPipeError, OSError) as exc:
            raise DetectionProcessError("detection process died") from exc
        result: Collected = await self._recv(self._conn)
        return result

    async def restore(self, number: int, users: list[tuple[str, bytes | None, dict[str, int]]], base: dict[str, int], max_ts: int | None) -> RestoreResult:
        """See :meth:`PartitionEngines.restore`."""
        result: RestoreResult = await self._call("restore", number, users, base, max_ts)
        return result

    async def checkpoint(self, number: int) -> PartitionCheckpoint:
        """See :meth:`PartitionEngines.checkpoint`."""
        result: PartitionCheckpoint = await self._call("checkpoint", number)
        return result

    async def drop(self, numbers: list[int]) -> None:
        """See :meth:`PartitionEngines.drop`."""
        await self._call("drop", numbers)


class DetectionPool:
    """Several :class:`DetectionHost` children behind the interface of one.

    A partition is placed on the child holding the fewest partitions when it is
    restored, and stays there until it is dropped (its engines live there). A
    submitted batch is split by child, each child works on its share in
    parallel, and :meth:`collect` returns the results in the order of the jobs.
    With one host this adds nothing but a routing step. Like a host, the pool
    takes further batches before the first is collected.
    """

    def __init__(self, hosts: Sequence[DetectionHost]) -> None:
        if not hosts:
            raise ValueError("a detection pool needs at least one host")
        self.hosts = list(hosts)
        self.in_child = hosts[0].in_child
        #: Partition number -> index of the host holding its engines.
        self._placed: dict[int, int] = {}
        #: Per submitted batch, oldest first: per job (host index, position among
        #: that host's jobs), and the hosts that were sent a share.
        self._orders: deque[tuple[list[tuple[int, int]], list[int]]] = deque()

    @property
    def pids(self) -> list[int]:
        """The process ids of the running children."""
        return [h.pid for h in self.hosts if h.pid is not None]

    @property
    def busy(self) -> bool:
        """A batch is submitted and not yet collected."""
        return bool(self._orders)

    def ready(self) -> bool:
        """The oldest submitted batch's results can be collected without waiting."""
        return bool(self._orders) and all(self.hosts[i].ready() for i in self._orders[0][1])

    async def start(self) -> None:
        """Start every child."""
        await asyncio.gather(*(h.start() for h in self.hosts))

    async def close(self) -> None:
        """Stop every child."""
        await asyncio.gather(*(h.close() for h in self.hosts), return_exceptions=True)

    def _host(self, number: int) -> int:
        placed = self._placed.get(number)
        if placed is None:
            load = [0] * len(self.hosts)
            for index in self._placed.values():
                load[index] += 1
            placed = self._placed[number] = load.index(min(load))
        return placed

    def submit(self, jobs: list[Job], checkpoint: bool = False) -> None:
        """Hand each child its share of ``(number, topic, offsets, values)`` jobs (every child, for a checkpoint)."""
        shares: list[list[Job]] = [[] for _ in self.hosts]
        order: list[tuple[int, int]] = []
        for job in jobs:
            index = self._host(job[0])
            order.append((index, len(shares[index])))
            shares[index].append(job)
        sent = [i for i, share in enumerate(shares) if share or checkpoint]
        for i in sent:
            self.hosts[i].submit(shares[i], checkpoint)
        self._orders.append((order, sent))

    async def collect(self) -> Collected:
        """The results of the oldest submitted batch, in the order of its jobs."""
        if not self._orders:
            return Collected([], {})
        order, sent = self._orders.popleft()
        collected = dict(zip(sent, await asyncio.gather(*(self.hosts[i].collect() for i in sent)), strict=True))
        checkpoints: dict[int, PartitionCheckpoint] = {}
        for c in collected.values():
            checkpoints.update(c.checkpoints)
        return Collected([collected[index].results[position] for index, position in order], checkpoints)

    def _idle(self, method: str) -> None:
        if self._orders:
            raise RuntimeError(f"{method}: a submitted batch has not been collected")

    async def restore(self, number: int, users: list[tuple[str, bytes | None, dict[str, int]]], base: dict[str, int], max_ts: int | None) -> RestoreResult:
        """See :meth:`PartitionEngines.restore` (places the partition on a child)."""
        self._idle("restore")
        return await self.hosts[self._host(number)].restore(number, users, base, max_ts)

    async def checkpoint(self, number: int) -> PartitionCheckpoint:
        """See :meth:`PartitionEngines.checkpoint`."""
        self._idle("checkpoint")
        return await self.hosts[self._host(number)].checkpoint(number)

    async def drop(self, numbers: list[int]) -> None:
        """See :meth:`PartitionEngines.drop` (the partitions leave their children)."""
        self._idle("drop")
        by_host: dict[int, list[int]] = {}
        for number in numbers:
            index = self._placed.pop(number, None)
            if index is not None:
                by_host.setdefault(index, []).append(number)
        await asyncio.gather(*(self.hosts[index].drop(nums) for index, nums in by_host.items()))
