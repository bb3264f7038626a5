"""What the console and the escalation service share.

Both are long-running services next to the detection in a worker: each loads
the rules only to describe alerts (titles, descriptions), creates the topics
it owns when ``create_topics`` is on, closes its Kafka clients on stop, and
is started and stopped with the Faust worker.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detectors.rules import Rule
    from streams.config import Settings

__all__ = ["create_missing_topics", "load_rule_map", "random_token", "start_with_app", "stop_clients"]


def random_token(nbytes: int = 8) -> str:
    """A random id for audit records, sessions and nonces.

    Written as dash-separated groups of 8 hex digits (:func:`schemas.alert.grouped_hex`),
    so it never contains a run of 12 decimal digits: plain ``token_hex(8)`` does
    about 2 % of the time, and such a run in ``leakwatch audit`` output is
    indistinguishable from a leaked personal number.
    """
    from schemas.alert import grouped_hex

    return grouped_hex(secrets.token_hex(nbytes))


def load_rule_map(settings: Settings, log: Any, lacking: str) -> dict[str, Rule]:
    """The worker's rules by id (``rules_path`` or the bundled ones, plus overrides).

    Rules only describe alerts here, so a broken rule file is logged (``lacking``
    says what will be missing) and an empty map returned instead of failing.
    """
    from detectors.rules import (
        DEFAULT_RULES_DIR,
        RuleError,
        apply_overrides,
        load_overrides,
        load_rules,
    )

    try:
        rules = load_rules(Path(settings.rules_path) if settings.rules_path else DEFAULT_RULES_DIR)
        if settings.overrides_path:
            rules = apply_overrides(rules, load_overrides(Path(settings.overrides_path)))
    except RuleError as exc:
        log.warning(f"rules not loaded; {lacking}", error=str(exc))
        return {}
    return {r.id: r for r in rules}


async def create_missing_topics(
    client_args: dict[str, Any], specs: Mapping[str, tuple[int, Mapping[str, str]]], replication_factor: int
) -> None:
    """Create each topic of ``specs`` (name -> (partitions, configs)) that does not exist yet.

    Another worker creating the same topic at the same moment is fine.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**client_args)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name=name, num_partitions=n, replication_factor=replication_factor, topic_configs=dict(cfg))
            for name, (n, cfg) in specs.items()
            if name not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except Exception as exc:  # another worker was first
                if "exist" not in repr(exc).lower():
                    raise
    finally:
        await admin.close()


async def stop_clients(*clients: Any) -> None:
    """Stop aiokafka consumers and producers (``None`` skipped); errors while stopping are ignored."""
    for client in clients:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.stop()


def start_with_app(app: Any, service: Any, name: str) -> None:
    """Have a Faust app start ``service`` (its ``start()``) with the worker and ``stop()`` it on shutdown.

    ``name`` names the runner in mode's logs; its logger is that of the service's module.
    """
    from mode import Service

    async def on_start(self: Any) -> None:
        await service.start()

    async def on_stop(self: Any) -> None:
        await service.stop()

    namespace = {
        "__module__": type(service).__module__,
        "__qualname__": name,
        "__doc__": f"Starts and stops the {type(service).__name__} with the Faust worker.",
        "on_start": on_start,
        "on_stop": on_stop,
    }
    app.service(type(name, (Service,), namespace))
