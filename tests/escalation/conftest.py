"""Fixtures of the escalation tests.

The real-broker fixtures (``apache_kafka``, ``tansu``, ``broker``) come from
the root ``tests/conftest.py`` (``tests/brokerfixtures.py``), shared by every
test directory. Every mail any :class:`MailSink` of the session received is
scanned at the end of the session there too: one personal-number-like digit
run anywhere in a header or a decoded text part fails the run (see
``test_no_personal_number_in_mail.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from escalation_kit import MailSink


@pytest.fixture
def sink() -> Iterator[MailSink]:
    """A running SMTP server on a free loopback port (stopped afterwards)."""
    with MailSink() as s:
        yield s
