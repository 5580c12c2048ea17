"""Placeholder until the native module lands: reports itself unavailable."""

from __future__ import annotations

AVAILABLE = False
REASON = "not built"
