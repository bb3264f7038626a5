"""``leakwatch rules``: list the rules and validate them with an agency's overrides.

Validation builds the same :class:`~detectors.engine.Engine` the worker and
``leakwatch analyze`` build, so every rule file, every parameter and the
overrides file are checked exactly as they will be used. Problems are printed
as ``file: key: reason`` and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detectors.rules import DEFAULT_RULES_DIR, RuleError

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch rules``."""
    parser.add_argument("--rules", type=Path, metavar="DIR", help="rules directory (default: the bundled rules)")
    parser.add_argument("--overrides", type=Path, metavar="FILE", help="the agency's rule overrides")
    parser.add_argument("--validate", action="store_true", help="only validate; print a one-line result instead of the list")


def run(args: argparse.Namespace) -> int:
    """List (or only validate) the rules; 0 when valid, 2 otherwise."""
    from leakwatch.analyze import load_engine

    try:
        engine = load_engine(args.rules, args.overrides)
    except RuleError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    rules = sorted(engine.rules.values(), key=lambda r: r.id)
    enabled = sum(1 for r in rules if r.enabled)
    where = str(args.rules or DEFAULT_RULES_DIR)
    if args.overrides is not None:
        where += f" + {args.overrides}"
    if args.validate:
        print(f"ok: {len(rules)} rules ({enabled} enabled) from {where}")
        return 0
    rows = [("id", "level", "viewpoint", "enabled", "title")]
    rows += [(r.id, r.level, r.viewpoint, "yes" if r.enabled else "no", r.title) for r in rules]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    print(f"# {len(rules)} rules ({enabled} enabled) from {where}")
    return 0
