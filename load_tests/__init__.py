"""Load tests and evaluation: a synthetic municipality, a Kafka feed, benchmarks.

* :mod:`load_tests.generator` -- a seeded, deterministic municipality (staff,
  terminals, working days) with injected leak scenarios and their ground truth.
* :mod:`load_tests.feed` -- streams that municipality into Kafka at a chosen rate.
* :mod:`load_tests.bench_core` -- events/s and state size of the detector core.
* :mod:`load_tests.evaluate` -- recall per scenario and noise per 1,000 staff-days.
"""

__all__: list[str] = []
