"""A seeded, deterministic synthetic municipality and its access/operation log.

The town has departments (市民課 at the resident-registry counter, 税務課,
国民健康保険課, 福祉課, ...), each with business hours, desk terminals
(``172.16.<subnet>.<host>``) and shared counter terminals. Its staff arrive
between about 08:15 and 09:00, serve residents at the counter or work cases
in the back office, take lunch, and leave between about 17:00 and 18:30;
some stay for approved overtime. Nobody works on weekends, public holidays
(via the ``holidays`` package) or during the year-end closure (12/29-1/3),
except a duty roster when one is configured.

A working day of one member of staff is a sequence of *tasks*: look a
resident up (sometimes after a mistyped search that fails), re-open the
record a few times while serving them, maybe update it or print a
certificate. A few designated exporters write out moderate weekly and
monthly extracts (150-3000 records a month) and, when the profile says
so, copy the monthly one to their department's approved USB stick. Residents are pseudonymous tokens (``r-<hash>``), never
numbers.

Leak scenarios are small deterministic functions that add events to chosen
days and return a :class:`ScenarioTruth` (scenario, user, time span, the
rule ids expected to catch it). Benign but unusual activity that the
generator creates on purpose (approved late overtime, an early start, IT
maintenance logins, holiday duty) is listed in :attr:`SyntheticLog.benign`
so that an evaluation can explain the alerts it causes.

Usage::

    log = generate(seed=7, start=date(2024, 11, 18), days=30, scenarios="all")
    for ev in log:           # Events in event-time order
        ...
    log.scenario_truth       # ground truth of the injected scenarios

Everything is a pure function of the arguments: the same seed gives the same
events, byte for byte. Normal activity does not depend on which scenarios
are injected, except that a scenario may keep its user at home or away.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta, tzinfo
from operator import attrgetter
from pathlib import Path
from typing import IO, Final
from zoneinfo import ZoneInfo

import orjson

from detectors.calendar import DAY_HOLIDAY, DAY_WORKDAY, DAY_YEAR_END, BusinessCalendar
from schemas.event import Event, format_ts

__all__ = [
    "DEFAULT_START",
    "DEPARTMENTS",
    "EXPECTED_RULES",
    "SCENARIOS",
    "BenignSpan",
    "Department",
    "Municipality",
    "Profile",
    "ScenarioContext",
    "ScenarioSkipped",
    "ScenarioTruth",
    "Staff",
    "SyntheticLog",
    "generate",
    "main",
    "summary",
    "to_jsonl",
]

TZ: Final[tzinfo] = ZoneInfo("Asia/Tokyo")
SECOND_MS: Final = 1000
MINUTE_MS: Final = 60 * SECOND_MS
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS
#: A Monday; 60 days from it cover a public holiday (2025-01-13) and the year-end closure.
DEFAULT_START: Final = date(2024, 11, 18)

_TS = attrgetter("ts_ms")


@dataclass(frozen=True, slots=True)
class Department:
    """One department (課): its network, systems, counter and habits."""

    name: str
    #: ASCII key used in user names and device ids.
    key: str
    #: Third octet of its first desk subnet (desks use subnet..subnet+4, second terminals subnet+5..+9).
    subnet: int
    #: Share of the town's staff.
    share: float
    #: Share of its staff who serve at the counter.
    counter_share: float
    #: The business system its staff use.
    system: str
    #: Probability that a counter visit ends with a printed certificate.
    print_rate: float = 0.1
    #: Probability that a task updates the record.
    update_rate: float = 0.3
    #: Back-office staff work a personal caseload (welfare caseworkers).
    caseload: bool = False
    #: System administrators: few look-ups, maintenance logins on other terminals.
    it: bool = False
    #: Business hours as minutes after local midnight.
    opens: int = 8 * 60 + 30
    closes: int = 17 * 60 + 15


#: The default departments of the town.
DEPARTMENTS: Final = (
    Department("市民課", "shimin", 10, 0.20, 0.6, "住民記録システム", print_rate=0.55, update_rate=0.25),
    Department("税務課", "zeimu", 20, 0.22, 0.25, "税務システム", print_rate=0.1, update_rate=0.35),
    Department("国民健康保険課", "kokuho", 30, 0.15, 0.4, "国保システム", print_rate=0.2, update_rate=0.3),
    Department("福祉課", "fukushi", 40, 0.15, 0.3, "福祉システム", update_rate=0.3, caseload=True),
    Department("子育て支援課", "kosodate", 50, 0.10, 0.4, "子育て支援システム", update_rate=0.3),
    Department("介護保険課", "kaigo", 60, 0.12, 0.3, "介護保険システム", update_rate=0.3, caseload=True),
    Department("情報政策課", "johoseisaku", 70, 0.06, 0.0, "基盤システム", update_rate=0.0, it=True),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """Rates and habits of ordinary work (probabilities per staff-day unless stated)."""

    #: Mean events per member of staff per working day (activity levels vary around it).
    events_per_day: float = 120.0
    #: Gamma shape of the day-to-day volume of one person (12: about +-30 %).
    volume_shape: float = 12.0
    #: Away for the day (annual leave, training, sick).
    absence_rate: float = 0.06
    #: Starts personal-data work right on arrival, before opening time.
    early_start_rate: float = 0.002
    #: Stays until 18:00-18:40; personal-data work still ends by ``data_grace`` minutes after closing.
    overtime_rate: float = 0.12
    #: Approved late overtime with personal-data work until 19:00-20:30.
    late_overtime_rate: float = 0.003
    #: Ordinary personal-data work ends at most this many minutes after closing.
    data_grace: int = 40
    #: Share of searches that fail (a mistyped name or number).
    typo_rate: float = 0.02
    #: Share of searches made by personal number (so a failed one references it).
    search_by_number: float = 0.3
    #: Chance of re-opening the record once more while serving (geometric), at most ``max_reopen`` times.
    reopen_rate: float = 0.45
    max_reopen: int = 4
    #: Chance of one denied operation (a record outside one's duties) per staff-day.
    denied_rate: float = 0.003
    #: Share of staff with a second terminal, and the chance they use it on a day.
    second_terminal_share: float = 0.1
    second_terminal_day: float = 0.25
    #: Logs out for lunch and back in afterwards.
    lunch_logout: float = 0.3
    #: IT staff log in on other departments' terminals for maintenance.
    it_maintenance: float = 0.05
    #: Designated exporters per department (not IT).
    exporters_per_department: int = 1
    #: An exporter's small weekly extract (records 20-400), per working day.
    weekly_export: float = 0.2
    #: Exporters copy their monthly extract to the department's approved USB stick
    #: (off by default: most agencies forbid removable media on My Number terminals).
    routine_usb: bool = False
    #: Staff on duty (市民課 counter, 09:00-12:00) on each weekend/holiday/closure day.
    duty_roster: int = 0
    #: Residents of the town (pseudonymous tokens); 0 = 400 per member of staff, 20k-300k.
    population: int = 0


@dataclass(slots=True)
class Staff:
    """One member of staff and their habits."""

    index: int
    user: str
    dept: Department
    terminal: str
    second: str | None
    #: Shared counter terminals this person uses (empty for back-office staff).
    counters: tuple[str, ...]
    exporter: bool
    #: The department's approved USB device an exporter uses.
    device: str | None
    #: Activity multiplier (log-normal around 1).
    level: float
    #: Habitual arrival and departure, minutes after midnight.
    arrive: int
    leave: int
    #: Lunch start, minutes after midnight.
    lunch: int
    #: Nth working day of the month of the monthly extract (exporters).
    monthly_day: int
    #: Residents on a caseworker's caseload.
    caseload: tuple[int, ...] = ()
    #: Day index from which the account is no longer used by its owner (transferred/retired).
    gone_from: int | None = None


@dataclass(frozen=True, slots=True)
class ScenarioTruth:
    """Ground truth of one injected scenario."""

    name: str
    user: str
    #: Epoch ms of the first and last injected event.
    start_ms: int
    end_ms: int
    #: Rule ids any of which should catch it (empty: nothing is expected to; a known gap).
    expected: tuple[str, ...]
    day: date
    note: str = ""


@dataclass(frozen=True, slots=True)
class BenignSpan:
    """Unusual but legitimate activity the generator produced on purpose."""

    kind: str
    user: str
    start_ms: int
    end_ms: int


class ScenarioSkipped(Exception):
    """A scenario cannot be placed in the generated range (e.g. no holiday in it)."""


#: Scenario name -> rule ids expected to catch it. Edit here when rules change.
EXPECTED_RULES: Final[dict[str, tuple[str, ...]]] = {
    "night_lookup": ("off_hours",),
    "holiday_lookup": ("off_hours",),
    "year_end_lookup": ("off_hours",),
    "repeated_subject": ("repeated_queries",),
    "bulk_export": ("bulk_export",),
    "lookup_spike": ("bulk_export",),
    "usb_write_unapproved_device": ("usb_writes",),
    "usb_first_use": ("usb_writes",),
    "unusual_terminal": ("unusual_terminal",),
    "many_terminals": ("unusual_terminal",),
    "denied_attempts": ("unauthorized_attempts",),
    "denied_export": ("unauthorized_attempts",),
    "print_screen": ("unusual_operation",),
    "first_export": ("unusual_operation",),
    "telework_access": ("unusual_operation",),
    "transferred_staff": ("unusual_terminal",),
}


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Municipality:
    """The town: departments, staff, terminals, residents. Deterministic in ``seed``."""

    def __init__(
        self,
        seed: int = 0,
        staff: int = 200,
        profile: Profile | None = None,
        departments: tuple[Department, ...] = DEPARTMENTS,
    ) -> None:
        if staff < len(departments):
            raise ValueError(f"need at least {len(departments)} staff (one per department)")
        self.seed = seed
        self.profile = profile or Profile()
        self.departments = departments
        rng = random.Random(f"town:{seed}")
        p = self.profile
        population = p.population or min(300_000, max(20_000, 400 * staff))
        self.population = population
        salt = f"{seed}:".encode()
        self.residents: list[str] = [
            "r-" + hashlib.blake2b(salt + i.to_bytes(4, "big"), digest_size=5).hexdigest() for i in range(population)
        ]
        # Staff per department by share (largest remainder, at least one each).
        total = sum(d.share for d in departments)
        raw = [staff * d.share / total for d in departments]
        counts = [max(1, int(x)) for x in raw]
        order = sorted(range(len(departments)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
        i = 0
        while sum(counts) < staff:
            counts[order[i % len(order)]] += 1
            i += 1
        while sum(counts) > staff:
            j = max(range(len(counts)), key=counts.__getitem__)
            counts[j] -= 1
        self.staff: list[Staff] = []
        self.counter_terminals: dict[str, tuple[str, ...]] = {}
        self.approved_devices: dict[str, str] = {}
        for dept, n in zip(departments, counts, strict=True):
            if n > 1000:
                raise ValueError(f"at most 1000 staff per department ({dept.name} would get {n})")
            n_counter = round(n * dept.counter_share)
            counters = tuple(f"172.16.{dept.subnet}.{220 + j}" for j in range(min(30, max(2, n_counter // 4)))) if n_counter else ()
            self.counter_terminals[dept.name] = counters
            device = f"USB-{dept.key}-01"
            if not dept.it:
                self.approved_devices[dept.name] = device
            exporters = set(rng.sample(range(n_counter, n), min(p.exporters_per_department, n - n_counter))) if not dept.it else set()
            for k in range(n):
                subnet, host = dept.subnet + k // 200, 10 + k % 200
                is_counter = k < n_counter
                exporter = k in exporters
                self.staff.append(
                    Staff(
                        index=len(self.staff),
                        user=f"{dept.key}{k + 1:03d}",
                        dept=dept,
                        terminal=f"172.16.{subnet}.{host}",
                        second=f"172.16.{subnet + 5}.{host}" if rng.random() < p.second_terminal_share else None,
                        counters=tuple(sorted(rng.sample(counters, min(len(counters), rng.randint(2, 3))))) if is_counter else (),
                        exporter=exporter,
                        device=device if exporter and p.routine_usb else None,
                        level=min(2.5, max(0.4, rng.lognormvariate(0.0, 0.35))) * (0.15 if dept.it else 1.0),
                        arrive=rng.randint(8 * 60 + 15, 8 * 60 + 55),
                        leave=rng.randint(dept.closes, dept.closes + 35),
                        lunch=12 * 60 + (rng.choice((-30, 0, 0, 30)) if is_counter else 0),
                        monthly_day=rng.randint(2, 6),
                        caseload=tuple(rng.randrange(population) for _ in range(60)) if dept.caseload and not is_counter else (),
                    )
                )
        self.by_user = {s.user: s for s in self.staff}

    def business_hours(self) -> dict[str, str]:
        """Department -> ``"HH:MM-HH:MM"``, the form of the off_hours rule's ``business_hours``."""
        return {d.name: f"{_hhmm(d.opens)}-{_hhmm(d.closes)}" for d in self.departments}

    def typical_lookups(self, st: Staff) -> float:
        """Expected search/view events of one person on an ordinary working day."""
        return st.level * self.profile.events_per_day * 0.85


# -- scenarios ---------------------------------------------------------------


class ScenarioContext:
    """What a scenario function may do: pick users and days, add events, shape the town."""

    def __init__(self, log: SyntheticLog, index: int, rng: random.Random) -> None:
        self.log = log
        self.town = log.town
        self.index = index
        self.rng = rng
        #: Events this scenario added, in the order added.
        self.events: list[Event] = []

    # -- choosing -----------------------------------------------------------

    def staff(self, predicate: Callable[[Staff], bool] = lambda s: True) -> Staff:
        """A member of staff not used by another scenario (never IT unless asked for)."""
        pool = [s for s in self.town.staff if s.user not in self.log._scenario_users and predicate(s)]
        if not pool:
            raise ScenarioSkipped("no eligible member of staff left")
        st = self.rng.choice(pool)
        self.log._scenario_users.add(st.user)
        return st

    def day(self, kind: str = DAY_WORKDAY, not_before: int = 0) -> int:
        """A day index of the given kind in the scenario range."""
        log = self.log
        days = [i for i in range(max(log.scenario_from, not_before), log.days) if log.kinds[i] == kind]
        if not days:
            raise ScenarioSkipped(f"no {kind} day in the scenario range")
        return self.rng.choice(days)

    def at(self, day: int, hhmm: str, jitter_s: int = 0) -> int:
        """Epoch ms of a local time on a day (plus up to ``jitter_s`` random seconds)."""
        h, m = hhmm.split(":")
        extra = self.rng.randint(0, jitter_s) * SECOND_MS if jitter_s else 0
        return self.log.day_ms[day] + (int(h) * 60 + int(m)) * MINUTE_MS + extra

    def resident(self) -> str:
        """A random resident's pseudonymous token."""
        return self.rng.choice(self.town.residents)

    def colleague_terminals(self, st: Staff, n: int = 1, other_department: bool = False) -> list[str]:
        """``n`` distinct desk terminals of others: the same department's first (unless told
        otherwise), then other departments' when it is too small."""
        others = [s for s in self.town.staff if s.user != st.user and s.terminal not in (st.terminal, st.second)]
        near = [s.terminal for s in others if (s.dept.name != st.dept.name) == other_department]
        pool = near if len(near) >= n or other_department else near + [s.terminal for s in others if s.dept.name != st.dept.name]
        if len(pool) < n:
            raise ScenarioSkipped(f"fewer than {n} other terminals in the town")
        return self.rng.sample(pool, n)

    # -- shaping ------------------------------------------------------------

    def present(self, st: Staff, day: int) -> None:
        """Make sure the person works normally that day (no absence)."""
        self.log._present.add((st.index, day))

    def absent(self, st: Staff, day: int) -> None:
        """Keep the person's ordinary activity away that day."""
        self.log._absent.add((st.index, day))

    def gone_from(self, st: Staff, day: int) -> None:
        """The account's owner stops working (transfer, retirement) from ``day`` on."""
        st.gone_from = day

    # -- events -------------------------------------------------------------

    def event(
        self,
        st: Staff,
        ts: int,
        action: str,
        *,
        result: str = "success",
        ref: bool = True,
        subject: str | None = None,
        records: int | None = None,
        size: int | None = None,
        device: str | None = None,
        terminal: str | None = None,
        location: str = "office",
        session: str | None = None,
    ) -> Event:
        """Add one event to the log (on the local day holding ``ts``) and return it."""
        ev = Event(
            f"x{self.index:x}-{len(self.events) + 1:x}",
            ts,
            st.user,
            terminal or st.terminal,
            action,
            result,
            ref,
            subject,
            records,
            size,
            device,
            st.dept.name,
            st.dept.system,
            session or f"x{self.index:x}-s",
            location,
        )
        day = min(max(0, (ts - self.log.day_ms[0]) // DAY_MS), self.log.days - 1)
        self.log._injected.setdefault(day, []).append(ev)
        self.events.append(ev)
        return ev

    def lookups(self, st: Staff, ts: int, n: int, *, gap_s: tuple[int, int] = (40, 240), **kw: object) -> int:
        """``n`` look-ups (search then view) of distinct residents from ``ts``; returns the last ts."""
        for _ in range(n):
            subject = self.resident()
            self.event(st, ts, "search", subject=subject, **kw)  # type: ignore[arg-type]
            ts += self.rng.randint(10, 40) * SECOND_MS
            self.event(st, ts, "view", subject=subject, **kw)  # type: ignore[arg-type]
            ts += self.rng.randint(*gap_s) * SECOND_MS
        return ts

    def truth(self, name: str, st: Staff, note: str = "") -> ScenarioTruth:
        """The ground-truth record spanning the events this scenario added."""
        start = min(e.ts_ms for e in self.events)
        end = max(e.ts_ms for e in self.events)
        day = datetime.fromtimestamp(start / 1000, TZ).date()
        return ScenarioTruth(name, st.user, start, end, EXPECTED_RULES.get(name, ()), day, note)


def _ordinary(st: Staff) -> bool:
    return not st.dept.it and not st.exporter


def _night_lookup(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    t = ctx.at(day, "23:02", 600)
    ctx.event(st, t, "login", ref=False)
    ctx.lookups(st, t + 40 * SECOND_MS, 5)
    ctx.event(st, ctx.at(day, "23:50", 300), "logout", ref=False)
    return ctx.truth("night_lookup", st, "5 residents looked up around 23:00 on a workday")


def _holiday_lookup(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day(DAY_HOLIDAY)
    t = ctx.at(day, "10:05", 600)
    ctx.event(st, t, "login", ref=False)
    ctx.lookups(st, t + 60 * SECOND_MS, 6)
    return ctx.truth("holiday_lookup", st, "6 residents looked up on a public holiday")


def _year_end_lookup(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day(DAY_YEAR_END)
    t = ctx.at(day, "14:10", 600)
    ctx.event(st, t, "login", ref=False)
    ctx.lookups(st, t + 60 * SECOND_MS, 4)
    return ctx.truth("year_end_lookup", st, "4 residents looked up during the year-end closure")


def _repeated_subject(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    ctx.present(st, day)
    subject = ctx.resident()
    t = ctx.at(day, "10:00", 300)
    for i in range(30):
        ctx.event(st, t, "search" if i % 3 == 0 else "view", subject=subject)
        t += ctx.rng.randint(60, 110) * SECOND_MS
    return ctx.truth("repeated_subject", st, "one resident looked up 30 times within an hour")


def _bulk_export(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(lambda s: s.exporter)
    day = ctx.day()
    ctx.present(st, day)
    t = ctx.at(day, "15:10", 900)
    ctx.event(st, t, "search", ref=True)
    ev = ctx.event(st, t + 95 * SECOND_MS, "export", records=20_000, size=20_000 * 640)
    return ctx.truth("bulk_export", st, f"designated exporter writes out {ev.records} records")


def _lookup_spike(ctx: ScenarioContext) -> ScenarioTruth:
    # A normally busy person (40+ look-ups a day), so 8x is a spike by any measure.
    town = ctx.town
    busy = [s for s in town.staff if _ordinary(s) and not s.counters and s.user not in ctx.log._scenario_users]
    floor = min(40.0, max((town.typical_lookups(s) for s in busy), default=0.0))
    st = ctx.staff(lambda s: _ordinary(s) and not s.counters and town.typical_lookups(s) >= floor)
    day = ctx.day(not_before=10)
    ctx.present(st, day)
    extra = round(ctx.town.typical_lookups(st) * 7 / 2)  # pairs of search+view: 8x the day's look-ups
    t = ctx.at(day, "09:00", 300)
    step = max(1, (8 * 60 * 60) // max(1, extra)) * SECOND_MS
    for _ in range(extra):
        subject = ctx.resident()
        ctx.event(st, t, "search", subject=subject)
        ctx.event(st, t + 5 * SECOND_MS, "view", subject=subject)
        t += step
    return ctx.truth("lookup_spike", st, f"{2 * extra} extra look-ups (about 8x the person's usual day)")


def _usb_write_unapproved(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(lambda s: s.exporter)
    day = ctx.day()
    ctx.present(st, day)
    device = f"USB-private-{ctx.rng.randrange(16**4):04x}"
    t = ctx.at(day, "16:20", 600)
    ctx.event(st, t, "usb_connect", ref=False, device=device)
    ctx.event(st, t + 70 * SECOND_MS, "usb_write", records=3_000, size=3_000 * 640, device=device)
    return ctx.truth("usb_write_unapproved_device", st, f"writes 3000 records to unapproved {device}")


def _usb_first_use(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    ctx.present(st, day)
    device = ctx.town.approved_devices[st.dept.name]
    t = ctx.at(day, "13:40", 600)
    ctx.event(st, t, "usb_connect", ref=False, device=device)
    ctx.event(st, t + 50 * SECOND_MS, "usb_write", records=400, size=400 * 640, device=device)
    return ctx.truth("usb_first_use", st, f"first USB write ever, on the department's approved {device}")


def _unusual_terminal(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    (terminal,) = ctx.colleague_terminals(st, other_department=True)
    t = ctx.at(day, "14:05", 900)
    ctx.event(st, t, "login", ref=False, terminal=terminal)
    ctx.lookups(st, t + 30 * SECOND_MS, 4, terminal=terminal)
    return ctx.truth("unusual_terminal", st, f"look-ups from {terminal}, another department's desk")


def _many_terminals(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    t = ctx.at(day, "15:00", 600)
    for terminal in ctx.colleague_terminals(st, 5):
        ctx.event(st, t, "login", ref=False, terminal=terminal)
        t = ctx.lookups(st, t + 20 * SECOND_MS, 2, gap_s=(20, 60), terminal=terminal)
        ctx.event(st, t, "logout", ref=False, terminal=terminal)
        t += ctx.rng.randint(60, 180) * SECOND_MS
    return ctx.truth("many_terminals", st, "look-ups from 5 colleagues' terminals within an hour")


def _denied_attempts(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    t = ctx.at(day, "11:10", 600)
    for _ in range(12):
        ctx.event(st, t, ctx.rng.choice(("search", "view")), result="denied", subject=ctx.resident())
        t += ctx.rng.randint(40, 150) * SECOND_MS
    return ctx.truth("denied_attempts", st, "12 denied look-ups within about 20 minutes")


def _denied_export(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    t = ctx.at(day, "16:30", 600)
    for _ in range(2):
        ctx.event(st, t, "export", result="denied", records=5_000)
        t += ctx.rng.randint(60, 300) * SECOND_MS
    return ctx.truth("denied_export", st, "two denied exports of 5000 records")


def _print_screen(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    ctx.present(st, day)
    subject = ctx.resident()
    t = ctx.at(day, "14:30", 900)
    ctx.event(st, t, "view", subject=subject)
    ctx.event(st, t + 12 * SECOND_MS, "print_screen", subject=subject)
    return ctx.truth("print_screen", st, "print screen while a personal number is shown")


def _first_export(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(lambda s: _ordinary(s) and not s.counters)
    day = ctx.day(not_before=14)
    ctx.present(st, day)
    t = ctx.at(day, "15:00", 900)
    ctx.event(st, t, "export", records=800, size=800 * 640)
    return ctx.truth("first_export", st, "a non-exporter writes out 800 records")


def _telework_access(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    day = ctx.day()
    ctx.absent(st, day)
    terminal = f"10.200.{st.index // 250}.{10 + st.index % 240}"
    t = ctx.at(day, "10:20", 900)
    ctx.event(st, t, "login", ref=False, terminal=terminal, location="telework")
    ctx.lookups(st, t + 60 * SECOND_MS, 5, terminal=terminal, location="telework")
    return ctx.truth("telework_access", st, f"personal data looked up from telework ({terminal})")


def _transferred_staff(ctx: ScenarioContext) -> ScenarioTruth:
    st = ctx.staff(_ordinary)
    # Six weeks of silence (longer than the 30 days terminals are remembered), after a week of work.
    day = ctx.day(not_before=max(ctx.log.scenario_from + 7, 49))
    quiet_from = day - 42
    ctx.gone_from(st, quiet_from)
    (terminal,) = ctx.colleague_terminals(st, other_department=True)
    t = ctx.at(day, "10:40", 900)
    ctx.event(st, t, "login", ref=False, terminal=terminal)
    ctx.lookups(st, t + 30 * SECOND_MS, 6, terminal=terminal)
    return ctx.truth(
        "transferred_staff",
        st,
        f"account quiet for {day - quiet_from} days (owner transferred) used again from {terminal}",
    )


#: Scenario name -> function adding its events and returning the truth.
SCENARIOS: Final[dict[str, Callable[[ScenarioContext], ScenarioTruth]]] = {
    "night_lookup": _night_lookup,
    "holiday_lookup": _holiday_lookup,
    "year_end_lookup": _year_end_lookup,
    "repeated_subject": _repeated_subject,
    "bulk_export": _bulk_export,
    "lookup_spike": _lookup_spike,
    "usb_write_unapproved_device": _usb_write_unapproved,
    "usb_first_use": _usb_first_use,
    "unusual_terminal": _unusual_terminal,
    "many_terminals": _many_terminals,
    "denied_attempts": _denied_attempts,
    "denied_export": _denied_export,
    "print_screen": _print_screen,
    "first_export": _first_export,
    "telework_access": _telework_access,
    "transferred_staff": _transferred_staff,
}


# -- the log -----------------------------------------------------------------


def _emitter(st: Staff, out: list[Event], sid: str, seq: list[int], default_location: str) -> Callable[..., None]:
    """A function appending one of ``st``'s events to ``out`` (ids ``<sid>-<n>``; ``seq`` is shared)."""
    user, dname, system = st.user, st.dept.name, st.dept.system

    def emit(
        ts: int,
        action: str,
        terminal: str,
        result: str = "success",
        ref: bool = True,
        subject: str | None = None,
        records: int | None = None,
        size: int | None = None,
        device: str | None = None,
        location: str = default_location,
        session: str = sid,
    ) -> None:
        seq[0] += 1
        out.append(Event(f"{sid}-{seq[0]:x}", ts, user, terminal, action, result, ref, subject, records, size, device, dname, system, session, location))

    return emit



class SyntheticLog(Iterator[Event]):
    """The town's events over a date range, in event-time order, plus ground truth.

    Iterate it (once) for the events; :attr:`scenario_truth`, :attr:`skipped`
    and :attr:`benign` are complete as soon as it is constructed, except
    ``benign``, which fills in as days are generated.
    """

    def __init__(
        self,
        town: Municipality,
        start: date,
        days: int,
        scenarios: Iterable[str] = (),
        scenario_start: date | None = None,
        calendar: BusinessCalendar | None = None,
    ) -> None:
        if days < 1:
            raise ValueError("days must be at least 1")
        self.town = town
        self.profile = town.profile
        self.start = start
        self.days = days
        self.calendar = calendar or BusinessCalendar(tz=TZ)
        self.dates = [start + timedelta(days=i) for i in range(days)]
        self.kinds = [self.calendar.day_kind(d) for d in self.dates]
        self.day_ms = [int(datetime.combine(d, time(), TZ).timestamp()) * 1000 for d in self.dates]
        self.scenario_from = 0 if scenario_start is None else max(0, (scenario_start - start).days)
        self.scenario_truth: list[ScenarioTruth] = []
        #: Scenario name -> why it could not be placed.
        self.skipped: dict[str, str] = {}
        self.benign: list[BenignSpan] = []
        self._injected: dict[int, list[Event]] = {}
        self._present: set[tuple[int, int]] = set()
        self._absent: set[tuple[int, int]] = set()
        self._scenario_users: set[str] = set()
        self._monthly = self._monthly_days()
        for index, name in enumerate(scenarios):
            fn = SCENARIOS.get(name)
            if fn is None:
                raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
            ctx = ScenarioContext(self, index, random.Random(f"scenario:{town.seed}:{index}:{name}"))
            try:
                self.scenario_truth.append(fn(ctx))
            except ScenarioSkipped as exc:
                self.skipped[name] = str(exc)
        self._it = self._run()

    def __iter__(self) -> SyntheticLog:
        return self

    def __next__(self) -> Event:
        return next(self._it)

    @property
    def workdays(self) -> int:
        """Working days in the range."""
        return sum(k == DAY_WORKDAY for k in self.kinds)

    def _monthly_days(self) -> dict[int, int]:
        """Day index -> its working-day number within its month (1-based), for working days."""
        out: dict[int, int] = {}
        cal = self.calendar
        for i, d in enumerate(self.dates):
            if self.kinds[i] != DAY_WORKDAY:
                continue
            n = sum(cal.day_kind(d.replace(day=k)) == DAY_WORKDAY for k in range(1, d.day + 1))
            out[i] = n
        return out

    def _run(self) -> Iterator[Event]:
        for di in range(self.days):
            yield from self.day_events(di)

    def day_events(self, di: int) -> list[Event]:
        """All events of day ``di`` (ordinary work and injected), sorted by time."""
        rng = random.Random(self.town.seed * 1_000_003 + di)
        out: list[Event] = []
        kind = self.kinds[di]
        if kind == DAY_WORKDAY:
            nth = self._monthly.get(di, 0)
            for st in self.town.staff:
                self._staff_day(st, di, nth, rng, out)
        elif self.profile.duty_roster:
            self._duty(di, rng, out)
        out.extend(self._injected.get(di, ()))
        out.sort(key=_TS)
        return out

    def _duty(self, di: int, rng: random.Random, out: list[Event]) -> None:
        pool = [s for s in self.town.staff if s.counters and s.dept.print_rate >= 0.5 and s.gone_from is None]
        if not pool:
            return
        d0 = self.day_ms[di]
        for st in rng.sample(pool, min(self.profile.duty_roster, len(pool))):
            start = d0 + (9 * 60 + rng.randint(-10, 5)) * MINUTE_MS
            end = d0 + (12 * 60 + rng.randint(-5, 10)) * MINUTE_MS
            terminal = st.counters[0]
            self._session(st, di, rng, out, start, end, terminal, "counter", counter=True, tasks=rng.randint(6, 14))
            self.benign.append(BenignSpan("duty_roster", st.user, start, end))

    def _staff_day(self, st: Staff, di: int, nth: int, rng: random.Random, out: list[Event]) -> None:
        p = self.profile
        r = rng.random
        away = r() < p.absence_rate
        key = (st.index, di)
        if (away and key not in self._present) or key in self._absent or (st.gone_from is not None and di >= st.gone_from):
            return
        d0 = self.day_ms[di]
        dept = st.dept
        arrive = max(8 * 60 + 10, min(9 * 60, st.arrive + rng.randint(-6, 6)))
        if r() < p.early_start_rate:
            work_from = arrive + rng.randint(2, 5)
            if work_from < dept.opens:
                self.benign.append(BenignSpan("early_start", st.user, d0 + work_from * MINUTE_MS, d0 + dept.opens * MINUTE_MS))
        else:
            work_from = max(arrive + rng.randint(2, 10), dept.opens + rng.randint(0, 8))
        ot = r()
        grace_end = dept.closes + p.data_grace
        if ot < p.late_overtime_rate:
            leave = rng.randint(19 * 60, 20 * 60 + 30)
            data_until = leave - rng.randint(3, 10)
            self.benign.append(BenignSpan("late_overtime", st.user, d0 + grace_end * MINUTE_MS, d0 + leave * MINUTE_MS))
        elif ot < p.late_overtime_rate + p.overtime_rate:
            leave = rng.randint(18 * 60, 18 * 60 + 40)
            data_until = min(leave - 5, grace_end - rng.randint(0, 15))
        else:
            leave = max(dept.closes - 15, st.leave + rng.randint(-10, 15))
            data_until = min(leave - rng.randint(2, 8), grace_end)
        lunch = st.lunch
        volume = st.level * p.events_per_day * rng.gammavariate(p.volume_shape, 1.0 / p.volume_shape)
        # Terminals of the day: desk (or the second terminal in the afternoon) and a counter shift.
        desk_am = st.terminal
        desk_pm = st.second if st.second is not None and r() < p.second_terminal_day else st.terminal
        shift = ""
        if st.counters:
            x = r()
            shift = "am" if x < 0.45 else "pm" if x < 0.9 else ""
        counter_terminal = rng.choice(st.counters) if st.counters else ""
        # Minutes of personal-data work in the morning and afternoon.
        am = (work_from, lunch)
        pm = (lunch + 60, max(lunch + 61, data_until))
        tasks = max(1, round(volume / (1.0 if dept.it else 4.1)))
        span_am = max(0, am[1] - am[0])
        span_pm = max(0, pm[1] - pm[0])
        total = span_am + span_pm
        n_am = round(tasks * span_am / total) if total else 0
        n_pm = tasks - n_am
        seq = [0]
        sid = f"{st.user}-{di:x}"
        emit = _emitter(st, out, sid, seq, "office")
        emit(d0 + arrive * MINUTE_MS + rng.randint(0, 59) * SECOND_MS, "login", desk_am, ref=False)
        for (lo, hi), n, desk, half in ((am, n_am, desk_am, "am"), (pm, n_pm, desk_pm, "pm")):
            if n <= 0 or hi <= lo:
                continue
            at_counter = shift == half
            start_ms, end_ms = d0 + lo * MINUTE_MS, d0 + hi * MINUTE_MS
            if half == "pm" and desk_pm != desk_am:
                emit(start_ms - 2 * MINUTE_MS, "login", desk_pm, ref=False, session=sid + "-b")
            if at_counter:
                self._session(st, di, rng, out, start_ms, end_ms, counter_terminal, "counter", counter=True, tasks=n, seq=seq)
            else:
                self._tasks(st, rng, emit, start_ms, end_ms, n, desk, counter=False)
            if half == "am" and r() < p.lunch_logout:
                emit(end_ms + rng.randint(0, 5) * MINUTE_MS, "logout", desk_am, ref=False)
                emit(d0 + (lunch + 60) * MINUTE_MS - rng.randint(1, 8) * MINUTE_MS, "login", desk_pm, ref=False)
        # Exporters: a small weekly extract, and the monthly one (with its copy to the approved USB stick).
        if st.exporter:
            if r() < p.weekly_export:
                t = d0 + rng.randint(pm[0], max(pm[0] + 1, pm[1] - 5)) * MINUTE_MS
                n_rec = rng.randint(20, 400)
                emit(t, "export", desk_pm, records=n_rec, size=n_rec * 640)
            if nth == st.monthly_day:
                t = d0 + rng.randint(10 * 60, 16 * 60) * MINUTE_MS
                n_rec = round(math.exp(rng.uniform(math.log(150), math.log(3_000))))
                emit(t, "export", desk_pm, records=n_rec, size=n_rec * 640)
                if st.device is not None:
                    t += rng.randint(2, 10) * MINUTE_MS
                    emit(t, "usb_connect", desk_pm, ref=False, device=st.device)
                    emit(t + rng.randint(20, 90) * SECOND_MS, "usb_write", desk_pm, records=n_rec, size=n_rec * 640, device=st.device)
        if r() < p.denied_rate:
            t = d0 + rng.randint(work_from, max(work_from + 1, data_until - 1)) * MINUTE_MS
            emit(t, "view", desk_am, result="denied", subject=self.town.residents[rng.randrange(self.town.population)])
        if dept.it and r() < p.it_maintenance:
            t = d0 + rng.randint(10 * 60, 16 * 60) * MINUTE_MS
            start = t
            for _ in range(rng.randint(1, 2)):
                other = rng.choice(self.town.staff).terminal
                emit(t, "login", other, ref=False, session=sid + "-m")
                t += rng.randint(5, 25) * MINUTE_MS
                emit(t, "logout", other, ref=False, session=sid + "-m")
                t += rng.randint(3, 10) * MINUTE_MS
            self.benign.append(BenignSpan("it_maintenance", st.user, start, t))
        emit(d0 + leave * MINUTE_MS + rng.randint(0, 59) * SECOND_MS, "logout", desk_pm, ref=False)

    def _session(
        self,
        st: Staff,
        di: int,
        rng: random.Random,
        out: list[Event],
        start_ms: int,
        end_ms: int,
        terminal: str,
        location: str,
        *,
        counter: bool,
        tasks: int,
        seq: list[int] | None = None,
    ) -> None:
        """A login..logout session on a (counter) terminal with ``tasks`` tasks."""
        seq = seq if seq is not None else [0]
        sid = f"{st.user}-{di:x}-{location[0]}{start_ms // MINUTE_MS % 1440:x}"
        emit = _emitter(st, out, sid, seq, location)
        emit(start_ms - rng.randint(1, 4) * MINUTE_MS, "login", terminal, ref=False)
        self._tasks(st, rng, emit, start_ms, end_ms, tasks, terminal, counter=counter)
        emit(end_ms + rng.randint(0, 3) * MINUTE_MS, "logout", terminal, ref=False)

    def _tasks(
        self,
        st: Staff,
        rng: random.Random,
        emit: Callable[..., None],
        start_ms: int,
        end_ms: int,
        n: int,
        terminal: str,
        *,
        counter: bool,
    ) -> None:
        """``n`` tasks spread over ``[start_ms, end_ms)``; no event at or after ``end_ms``."""
        p = self.profile
        r = rng.random
        randint = rng.randint
        residents = self.town.residents
        population = self.town.population
        dept = st.dept
        location = "counter" if counter else "office"
        if dept.it:
            for _ in range(n):
                emit(randint(start_ms, end_ms), "search", terminal, ref=False, location=location)
            return
        caseload = st.caseload
        typo, by_number, reopen, max_reopen = p.typo_rate, p.search_by_number, p.reopen_rate, p.max_reopen
        update_rate = dept.update_rate
        print_rate = dept.print_rate if counter else 0.0
        span = end_ms - start_ms
        step = span // n
        for k in range(n):
            t = start_ms + k * step + randint(0, max(1, step - 1))
            if caseload and r() < 0.5:
                subject = residents[caseload[randint(0, len(caseload) - 1)]]
            else:
                subject = residents[randint(0, population - 1)]
            if r() < typo:
                emit(t, "search", terminal, result="failure", ref=r() < by_number, location=location)
                t += randint(8, 40) * SECOND_MS
            emit(t, "search", terminal, subject=subject, location=location)
            # The rest of the task, as long as it ends before the work period does.
            t += randint(10, 90) * SECOND_MS
            if t >= end_ms:
                continue
            emit(t, "view", terminal, subject=subject, location=location)
            for _ in range(max_reopen):
                if r() >= reopen:
                    break
                t += randint(20, 300) * SECOND_MS
                if t >= end_ms:
                    break
                emit(t, "view", terminal, subject=subject, location=location)
            if r() < update_rate:
                t += randint(30, 240) * SECOND_MS
                if t < end_ms:
                    emit(t, "update", terminal, subject=subject, records=1, location=location)
            if print_rate and r() < print_rate:
                t += randint(20, 120) * SECOND_MS
                if t < end_ms:
                    emit(t, "print", terminal, ref=r() < 0.05, subject=subject, records=1, location=location)

def generate(
    seed: int = 0,
    start: date = DEFAULT_START,
    days: int = 30,
    staff: int = 200,
    scenarios: Iterable[str] | str = (),
    *,
    events_per_day: float | None = None,
    scenario_start: date | None = None,
    profile: Profile | None = None,
    departments: tuple[Department, ...] = DEPARTMENTS,
) -> SyntheticLog:
    """The synthetic municipality's log: an iterator of events in time order.

    ``scenarios`` is ``"all"`` or scenario names (see :data:`SCENARIOS`);
    they are placed on days from ``scenario_start`` (default: ``start``),
    so a warm-up period before it stays ordinary. ``events_per_day`` is the
    mean per member of staff per working day.
    """
    prof = profile or Profile()
    if events_per_day is not None:
        prof = replace(prof, events_per_day=events_per_day)
    names = list(SCENARIOS) if scenarios == "all" else [scenarios] if isinstance(scenarios, str) else list(scenarios)
    town = Municipality(seed, staff, prof, departments)
    return SyntheticLog(town, start, days, names, scenario_start)


def to_jsonl(events: Iterable[Event], out: str | Path | IO[bytes], tz: tzinfo = TZ) -> int:
    """Write events as canonical JSON lines; returns how many were written."""
    if isinstance(out, str | Path):
        with Path(out).open("wb") as fh:
            return to_jsonl(events, fh, tz)
    n = 0
    dumps = orjson.dumps
    write = out.write
    for ev in events:
        write(dumps(ev.to_dict(tz)))
        write(b"\n")
        n += 1
    return n


def summary(log: SyntheticLog) -> Mapping[str, object]:
    """A short description of the town and range."""
    town = log.town
    return {
        "staff": len(town.staff),
        "departments": {d.name: sum(s.dept is d for s in town.staff) for d in town.departments},
        "exporters": [s.user for s in town.staff if s.exporter],
        "days": log.days,
        "workdays": log.workdays,
        "scenarios": [t.name for t in log.scenario_truth],
        "skipped": dict(log.skipped),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m load_tests.generator --out town.jsonl``: write a log file (for ``leakwatch analyze``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m load_tests.generator", description=main.__doc__)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--staff", type=int, default=200)
    ap.add_argument("--events-per-day", type=float, default=None)
    ap.add_argument("--scenarios", default="all", help="'all', 'none' or comma-separated names")
    ap.add_argument("--truth", type=Path, help="also write the scenarios' ground truth here (JSON lines)")
    args = ap.parse_args(argv)
    names: Iterable[str] | str = "all" if args.scenarios == "all" else [] if args.scenarios == "none" else args.scenarios.split(",")
    log = generate(seed=args.seed, start=args.start, days=args.days, staff=args.staff, scenarios=names, events_per_day=args.events_per_day)
    n = to_jsonl(log, args.out)
    print(f"wrote {n:,} events to {args.out}")
    print(orjson.dumps(summary(log), option=orjson.OPT_INDENT_2).decode())
    if args.truth:
        with args.truth.open("wb") as fh:
            for t in log.scenario_truth:
                doc = {
                    "scenario": t.name,
                    "user": t.user,
                    "start": format_ts(t.start_ms, TZ),
                    "end": format_ts(t.end_ms, TZ),
                    "expected": t.expected,
                    "note": t.note,
                }
                fh.write(orjson.dumps(doc) + b"\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
