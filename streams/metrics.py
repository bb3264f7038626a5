"""Prometheus metrics of a leakwatch worker, on a registry of its own.

Label sets are bounded: topics, partitions, rule ids, severities, detector
names and reason codes. Never a user, subject or terminal.

The detection loop (:mod:`streams.detection`) updates the event, alert,
batch, lag and state metrics; the mail and escalation modules update the
``mails_*`` counters and the acknowledgment gauges. ``users_tracked`` and
``state_bytes`` are changed by increments, so several loops in one process
(tests) add up instead of overwriting each other.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# No ``*_created`` series: they double the exposition and nothing here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "ALERTS",
    "ALERTS_ESCALATED",
    "ALERTS_UNACKNOWLEDGED",
    "BATCH_SIZE",
    "BUILD_INFO",
    "CONSUMER_LAG",
    "DETECTOR_EVENTS",
    "DETECTOR_SECONDS",
    "EVENTS_CONSUMED",
    "EVENTS_INVALID",
    "EVENT_TO_ALERT_LATENCY",
    "MAILS_FAILED",
    "MAILS_RETRIED",
    "MAILS_SENT",
    "OLDEST_UNACKNOWLEDGED_AGE",
    "REGISTRY",
    "STATE_BYTES",
    "USERS_TRACKED",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_CONSUMED = Counter(
    "leakwatch_events_consumed", "Events consumed, by input topic", ["topic"], registry=REGISTRY
)
EVENTS_INVALID = Counter(
    "leakwatch_events_invalid", "Invalid or late events sent to the dead-letter topic, by reason", ["reason"], registry=REGISTRY
)
DETECTOR_EVENTS = Counter(
    "leakwatch_detector_events", "Events handed to each detector", ["detector"], registry=REGISTRY
)
DETECTOR_SECONDS = Histogram(
    "leakwatch_detector_seconds",
    "Time to decode, validate and run the detectors over one partition batch (detector=\"all\": timed as a whole, not per detector)",
    ["detector"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "leakwatch_batch_size",
    "Messages per batch taken from Kafka (getmany)",
    buckets=(1, 10, 100, 500, 1000, 5000, 10000, 20000, 50000),
    registry=REGISTRY,
)
ALERTS = Counter("leakwatch_alerts", "Alerts published (each revision), by rule and severity", ["rule_id", "severity"], registry=REGISTRY)
ALERTS_ESCALATED = Counter("leakwatch_alerts_escalated", "Alerts sent to the escalation topic", ["severity"], registry=REGISTRY)
MAILS_SENT = Counter("leakwatch_mails_sent", "Escalation mails accepted by the SMTP server", registry=REGISTRY)
MAILS_FAILED = Counter("leakwatch_mails_failed", "Escalation mails that failed permanently", registry=REGISTRY)
MAILS_RETRIED = Counter("leakwatch_mails_retried", "Escalation mail attempts retried after a temporary failure", registry=REGISTRY)
ALERTS_UNACKNOWLEDGED = Gauge(
    "leakwatch_alerts_unacknowledged", "Escalated alerts awaiting acknowledgment", ["severity"], registry=REGISTRY
)
OLDEST_UNACKNOWLEDGED_AGE = Gauge(
    "leakwatch_oldest_unacknowledged_age_seconds",
    "Age of the oldest escalated alert awaiting acknowledgment",
    ["severity"],
    registry=REGISTRY,
)
EVENT_TO_ALERT_LATENCY = Histogram(
    "leakwatch_event_to_alert_latency_seconds",
    "From the newest event of an alert (event time) to its publication",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge("leakwatch_consumer_lag", "Messages behind the end of each input partition", ["topic", "partition"], registry=REGISTRY)
USERS_TRACKED = Gauge("leakwatch_users_tracked", "Users with detector state on this worker", registry=REGISTRY)
STATE_BYTES = Gauge("leakwatch_state_bytes", "Detector state size on this worker (checkpointed bytes)", registry=REGISTRY)
BUILD_INFO = Gauge("leakwatch_build_info", "Build information", ["version", "rules_version"], registry=REGISTRY)


def render() -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(REGISTRY)
