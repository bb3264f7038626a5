"""leakwatch: streaming leak detection for My Number access and operation logs."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
