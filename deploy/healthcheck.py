#!/usr/bin/env python3
"""Container health check for the leakwatch worker.

Usage: leakwatch-healthcheck [PATH ...]   (default: /healthz /readyz)

Requests each PATH on http://127.0.0.1:$LEAKWATCH_WEB_PORT (default 6066) and
exits 0 only if every one answers 2xx within the timeout.  Standard library
only: the python:3.11-slim image has no curl or wget.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 3.0


def check(base: str, path: str) -> str | None:
    """Return None when `path` answers 2xx, else a short reason."""
    url = base + path
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    port = os.environ.get("LEAKWATCH_WEB_PORT", "6066")
    base = f"http://127.0.0.1:{port}"
    paths = argv or ["/healthz", "/readyz"]
    failures = [reason for path in paths if (reason := check(base, path))]
    for reason in failures:
        print(f"unhealthy: {reason}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
