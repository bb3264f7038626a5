"""``leakwatch worker``: one streaming worker (Kafka in, alerts out).

Settings come from ``LEAKWATCH_*`` environment variables and/or ``--config``
(see :mod:`streams.config`); a bad setting or rule file is reported in one
line and the command exits with status 2. With ``create_topics`` (the
default) missing topics are created first: the input topics and the
checkpoint topic (compacted) with ``partitions`` partitions, the output
topics alongside.

SIGTERM and SIGINT stop the worker gracefully: the in-flight batch
finishes, state is checkpointed, offsets are committed, exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from detectors.rules import RuleError
from streams.config import ConfigError, Settings, load_settings

__all__ = ["configure", "ensure_topics", "run", "topic_specs"]

_TOPIC_EXISTS = 36


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch worker``."""
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (default: $LEAKWATCH_CONFIG; env vars override it)")


def topic_specs(settings: Settings) -> list[tuple[str, int, dict[str, str]]]:
    """(name, partitions, configs) of every topic the worker uses."""
    n = settings.partitions
    return [
        (settings.topic_access, n, {}),
        (settings.topic_operation, n, {}),
        (settings.topic_checkpoints, n, {"cleanup.policy": "compact"}),
        (settings.topic_alerts, n, {}),
        (settings.topic_escalations, n, {}),
        (settings.topic_dlq, n, {}),
        (settings.topic_acks, 1, {}),
        (settings.topic_audit, 1, {}),
    ]


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the missing topics (existing ones are left as they are); returns those created."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_args(), client_id="leakwatch-admin", request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        specs = {name: (parts, cfg) for name, parts, cfg in topic_specs(settings)}
        response = await admin.create_topics(
            [
                NewTopic(name=name, num_partitions=parts, replication_factor=settings.replication_factor, topic_configs=cfg)
                for name, (parts, cfg) in specs.items()
            ],
            timeout_ms=int(timeout * 1000),
        )
        created, failures = [], []
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code == 0:
                created.append(name)
            elif code != _TOPIC_EXISTS:
                failures.append(f"{name}: error {code} {entry[2] if len(entry) > 2 else ''}".strip())
        if failures:
            raise KafkaError("could not create topics: " + "; ".join(failures))
        # Wait until every partition has a leader.
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            described = {t["topic"]: t for t in await admin.describe_topics(list(specs))}
            if all(
                t.get("error_code", 0) == 0 and t.get("partitions") and all(p.get("leader", -1) >= 0 for p in t["partitions"])
                for t in (described.get(name, {}) for name in specs)
            ):
                return created
            if asyncio.get_running_loop().time() > deadline:
                raise KafkaError("topics created but partitions have no leader yet")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def _fail(message: str, code: int) -> int:
    print(f"leakwatch worker: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Run one worker until SIGTERM/SIGINT; 0 on a graceful stop."""
    try:
        settings = load_settings(Settings, config_file=getattr(args, "config", None))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2)
    from streams.logging import configure_logging, get_logger

    worker_name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    configure_logging(settings.log_level, settings.log_format, worker=worker_name)
    log = get_logger("leakwatch.worker")
    from streams.detection import DetectionLoop

    try:
        detection = DetectionLoop(settings, worker_name=worker_name)
    except (ConfigError, RuleError) as exc:
        return _fail(f"configuration error: {exc}", 2)
    if not settings.pseudonym_key:
        log.warning("pseudonym_key not set: tokens are random per process, so repeats across workers and restarts are not linked")
    if settings.create_topics:
        try:
            created = asyncio.run(ensure_topics(settings))
        except (KafkaError, OSError) as exc:
            return _fail(f"cannot create topics on {settings.brokers}: {exc}", 1)
        if created:
            log.info("topics created", topics=created)

    import faust

    from streams.app import create_app

    app = create_app(settings, detection=detection)
    from streams.detection import tune_gc

    tune_gc()
    worker: Any = faust.Worker(
        app,
        loglevel=settings.log_level,
        override_logging=False,
        quiet=True,
        redirect_stdouts=False,
    )
    worker.spinner = None  # no terminal spinner escapes in JSON logs
    log.info(
        "worker starting",
        brokers=settings.brokers,
        group=settings.group_id,
        web=f"http://{settings.web_host}:{settings.web_port}",
        rules=len(detection.rules),
        rules_version=detection.rules_version,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        log.error("worker crashed", error=str(exc), error_type=type(exc).__name__)
        return 1
    else:  # pragma: no cover - execute_from_commandline always raises SystemExit
        code = 0
    if detection.fatal_error is not None:
        return 1
    log.info("worker stopped", exit_code=code, **detection.stats.as_dict())
    return code
