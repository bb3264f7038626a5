"""The ``leakwatch`` command line: one subcommand per job.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; only the chosen one is imported, so ``leakwatch
analyze`` never loads Kafka or Faust.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["COMMANDS", "main"]

#: name -> (module, one-line help)
COMMANDS: Final = {
    "analyze": ("leakwatch.analyze", "run the detectors over exported log files (JSONL/CSV/TSV)"),
    "rules": ("leakwatch.rules_cmd", "list and validate rules and an agency's overrides"),
    "worker": ("streams.worker", "run one streaming worker (Kafka in, alerts out)"),
    "produce": ("streams.produce", "ship exported log files into the Kafka topics"),
    "demo": ("streams.demo", "everything on one machine: embedded broker, worker, synthetic feed"),
    "ack": ("streams.ack", "acknowledge an escalated alert"),
    "audit": ("streams.audit", "query the audit trail (mails, acks, escalations)"),
    "console-hash-password": ("streams.console", "hash an operator password for the console's accounts"),
}


def _command_of(argv: Sequence[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leakwatch`` console script."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="leakwatch",
        description="Leak detection for My Number (特定個人情報) access and operation logs.",
    )
    from leakwatch import __version__

    parser.add_argument("--version", action="version", version=f"leakwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command_of(args_in)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(args_in)
    if args.command is None:
        parser.print_help()
        return 2
    code: int = args._run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
