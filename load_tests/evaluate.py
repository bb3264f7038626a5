"""Recall per injected scenario and noise on ordinary work, for the default rules.

``python -m load_tests.evaluate [--staff 200] [--days 60] [--warmup 28]``

Generates the synthetic municipality for ``warmup + days`` days, seeds the
engine with the warm-up (``Engine.seed``: baselines, no alerts), then runs
the rules over the evaluation period with every scenario injected at a known
time, and compares the alerts (newest revision of each ``alert_id``) with the
ground truth:

* a scenario is *found* when an alert of one of its expected rules, for its
  user, overlaps its time span (first..last injected event, widened by
  ``--slack`` minutes);
* an alert overlapping a scenario of its user with another rule is a *side
  alert* of that scenario (caused by it, not noise);
* every other alert is *noise*, reported per 1,000 staff-days (staff x
  calendar days of the evaluation period) and broken down by rule and
  reason, with the benign activity that explains it when the generator made
  some on purpose (approved late overtime, early start, IT maintenance,
  holiday duty) and otherwise ``ordinary``.

Exit status: 0, or 1 with ``--check`` when a scenario with expected rules was
missed or the noise is above ``--max-noise`` (default 5 per 1,000 staff-days).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import orjson

from detectors.engine import Engine
from detectors.rules import DEFAULT_RULES_DIR, Rule, apply_overrides, load_overrides, load_rules
from detectors.testing import final_alerts
from load_tests.generator import DEFAULT_START, SCENARIOS, TZ, BenignSpan, ScenarioTruth, generate
from schemas.alert import Alert
from schemas.event import Event, parse_ts

__all__ = ["Evaluation", "ScenarioResult", "evaluate", "main", "render"]

MINUTE_MS = 60_000


@dataclass(slots=True)
class ScenarioResult:
    """How one injected scenario fared."""

    truth: ScenarioTruth
    #: Alerts of expected rules that caught it.
    hits: list[Alert] = field(default_factory=list)
    #: Other alerts it caused (other rules, same user, overlapping).
    side: list[Alert] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Caught by at least one expected rule."""
        return bool(self.hits)

    @property
    def delay_s(self) -> float | None:
        """Event time from the scenario's first event to the newest event of the earliest catching alert."""
        if not self.hits:
            return None
        first_seen = min(parse_ts(a.first_ts) for a in self.hits)
        return max(0.0, (first_seen - self.truth.start_ms) / 1000)


@dataclass(slots=True)
class Evaluation:
    """Everything one run measured."""

    staff: int
    days: int
    workdays: int
    warmup_days: int
    events: int
    seconds: float
    rules: list[str]
    results: list[ScenarioResult]
    skipped: dict[str, str]
    #: Alerts not attributable to any scenario, with the benign cause found (or ``ordinary``).
    noise: list[tuple[Alert, str]]

    @property
    def staff_days(self) -> int:
        """Staff x calendar days of the evaluation period."""
        return self.staff * self.days

    @property
    def noise_per_1000(self) -> float:
        """Noise alerts per 1,000 staff-days."""
        return 1000 * len(self.noise) / max(1, self.staff_days)

    @property
    def noise_per_1000_workdays(self) -> float:
        """Noise alerts per 1,000 staff-workdays (only working days counted)."""
        return 1000 * len(self.noise) / max(1, self.staff * self.workdays)

    @property
    def missed(self) -> list[ScenarioResult]:
        """Scenarios with expected rules that no expected rule caught."""
        return [r for r in self.results if r.truth.expected and not r.found]


def _split(events: Iterator[Event], cutoff_ms: int, stash: list[Event]) -> Iterator[Event]:
    """Events before ``cutoff_ms``; the first one at or after it is left in ``stash``."""
    for ev in events:
        if ev.ts_ms >= cutoff_ms:
            stash.append(ev)
            return
        yield ev


def _overlaps(alert: Alert, start: int, end: int) -> bool:
    return parse_ts(alert.first_ts) <= end and parse_ts(alert.last_ts) >= start


def _cause(alert: Alert, benign: dict[str, list[BenignSpan]], slack_ms: int) -> str:
    for span in benign.get(alert.user, ()):
        if _overlaps(alert, span.start_ms - slack_ms, span.end_ms + slack_ms):
            return span.kind
    return "ordinary"


def evaluate(
    *,
    seed: int = 1,
    staff: int = 200,
    days: int = 60,
    warmup_days: int = 28,
    start: date = DEFAULT_START,
    scenarios: Iterable[str] | str = "all",
    events_per_day: float | None = None,
    rules: Sequence[Rule] | None = None,
    slack_minutes: int = 5,
) -> Evaluation:
    """Run the rules over the synthetic town and score them against the ground truth."""
    t0 = time.perf_counter()
    log = generate(
        seed=seed,
        start=start - timedelta(days=warmup_days),
        days=warmup_days + days,
        staff=staff,
        scenarios=scenarios,
        scenario_start=start,
        events_per_day=events_per_day,
    )
    rule_list = list(rules) if rules is not None else load_rules()
    engine = Engine(rule_list)
    cutoff = int(datetime.combine(start, datetime.min.time(), TZ).timestamp()) * 1000
    stash: list[Event] = []
    n = engine.seed(_split(log, cutoff, stash))
    alerts: list[Alert] = []
    for ev in stash:
        engine.process(ev)
        n += 1
    for ev in log:
        engine.process(ev)
        n += 1
        if len(engine.out) > 1000:
            alerts.extend(engine.drain())
    alerts.extend(engine.drain())
    alerts.extend(engine.flush())
    final = list(final_alerts(alerts).values())
    slack = slack_minutes * MINUTE_MS

    results = [ScenarioResult(t) for t in log.scenario_truth]
    by_user: dict[str, list[ScenarioResult]] = defaultdict(list)
    for r in results:
        by_user[r.truth.user].append(r)
    benign: dict[str, list[BenignSpan]] = defaultdict(list)
    for span in log.benign:
        benign[span.user].append(span)
    noise: list[tuple[Alert, str]] = []
    for alert in sorted(final, key=lambda a: (a.first_ts, a.alert_id)):
        if parse_ts(alert.last_ts) < cutoff:
            continue  # raised by warm-up events arriving late; not part of the evaluation
        attributed = False
        for r in by_user.get(alert.user, ()):
            t = r.truth
            if _overlaps(alert, t.start_ms - slack, t.end_ms + slack):
                (r.hits if alert.rule_id in t.expected else r.side).append(alert)
                attributed = True
        if not attributed:
            noise.append((alert, _cause(alert, benign, slack)))
    return Evaluation(
        staff=len(log.town.staff),
        days=days,
        workdays=sum(1 for i in range(log.scenario_from, log.days) if log.kinds[i] == "workday"),
        warmup_days=warmup_days,
        events=n,
        seconds=time.perf_counter() - t0,
        rules=[r.id for r in rule_list if r.enabled],
        results=results,
        skipped=dict(log.skipped),
        noise=noise,
    )


def _fmt_delay(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def render(ev: Evaluation, max_noise: float = 5.0, top_users: int = 10) -> str:
    """The human-readable report."""
    lines: list[str] = []
    add = lines.append
    add(
        f"synthetic town: {ev.staff} staff, warm-up {ev.warmup_days} days (seeded), "
        f"evaluation {ev.days} days ({ev.workdays} workdays); {ev.events:,} events in {ev.seconds:.1f} s"
    )
    add(f"rules: {', '.join(ev.rules)}")
    add("")
    add("recall per injected scenario")
    add(f"  {'scenario':<28} {'user':<14} {'day':<10} {'expected':<24} {'found':<6} {'delay':>6}  caught by / side alerts")
    for r in ev.results:
        t = r.truth
        caught = sorted({f"{a.rule_id}/{a.reason}" for a in r.hits})
        side = sorted({f"{a.rule_id}/{a.reason}" for a in r.side})
        status = "yes" if r.found else ("GAP" if not t.expected else "NO")
        extra = ", ".join(caught) + (f"  (+ {', '.join(side)})" if side else "")
        add(f"  {t.name:<28} {t.user:<14} {t.day.isoformat():<10} {','.join(t.expected) or '-':<24} {status:<6} {_fmt_delay(r.delay_s):>6}  {extra}")
    for name, why in ev.skipped.items():
        add(f"  {name:<28} skipped: {why}")
    scored = [r for r in ev.results if r.truth.expected]
    found = sum(r.found for r in scored)
    add(f"  recall: {found}/{len(scored)} scenarios found")
    add("")
    add(
        f"noise: {len(ev.noise)} alerts on ordinary work = {ev.noise_per_1000:.2f} per 1,000 staff-days "
        f"({ev.noise_per_1000_workdays:.2f} per 1,000 staff-workdays); target < {max_noise:g}"
    )
    by_reason: Counter[tuple[str, str, str]] = Counter()
    users: Counter[str] = Counter()
    for alert, cause in ev.noise:
        by_reason[(alert.rule_id, alert.reason, cause)] += 1
        users[alert.user] += 1
    if by_reason:
        add(f"  {'rule':<24} {'reason':<28} {'cause':<16} {'alerts':>6} {'/1000 staff-days':>17}")
        for (rule, reason, cause), count in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            add(f"  {rule:<24} {reason:<28} {cause:<16} {count:>6} {1000 * count / max(1, ev.staff_days):>17.2f}")
        add(f"  noisiest users: {', '.join(f'{u} ({n})' for u, n in users.most_common(top_users))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m load_tests.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--staff", type=int, default=200)
    ap.add_argument("--days", type=int, default=60, help="evaluation days (default 60)")
    ap.add_argument("--warmup", type=int, default=28, help="warm-up days seeded before (default 28)")
    ap.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START, help="first evaluation day")
    ap.add_argument("--events-per-day", type=float, default=None, help="mean events per staff per workday")
    ap.add_argument("--scenarios", default="all", help=f"comma-separated, or 'all' ({', '.join(SCENARIOS)})")
    ap.add_argument("--rules", type=Path, default=DEFAULT_RULES_DIR, help="rules directory (default: bundled)")
    ap.add_argument("--overrides", type=Path, help="an agency override file to apply")
    ap.add_argument("--slack", type=int, default=5, help="minutes around a scenario still attributed to it")
    ap.add_argument("--max-noise", type=float, default=5.0, help="noise target per 1,000 staff-days")
    ap.add_argument("--check", action="store_true", help="exit 1 if a scenario is missed or noise is above target")
    ap.add_argument("--noise-list", type=int, default=0, metavar="N", help="also list the first N noise alerts")
    ap.add_argument("--json", type=Path, help="also write the noise alerts as JSON lines here")
    args = ap.parse_args(argv)
    rules = load_rules(args.rules)
    if args.overrides:
        rules = apply_overrides(rules, load_overrides(args.overrides))
    scenarios = "all" if args.scenarios == "all" else [s for s in args.scenarios.split(",") if s]
    result = evaluate(
        seed=args.seed,
        staff=args.staff,
        days=args.days,
        warmup_days=args.warmup,
        start=args.start,
        scenarios=scenarios,
        events_per_day=args.events_per_day,
        rules=rules,
        slack_minutes=args.slack,
    )
    print(render(result, args.max_noise))
    for alert, cause in result.noise[: args.noise_list]:
        print(f"  - {alert.first_ts} {alert.user:<14} {alert.rule_id}/{alert.reason} count={alert.count} cause={cause} terminals={list(alert.terminals)} details={alert.details}")
    if args.json:
        with args.json.open("wb") as fh:
            for alert, cause in result.noise:
                fh.write(orjson.dumps({**alert.to_dict(), "noise_cause": cause}) + b"\n")
    if args.check and (result.missed or result.noise_per_1000 >= args.max_noise):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
