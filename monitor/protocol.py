"""The wire format of the daemon's socket: one JSON object per line (NDJSON), versioned.

    request   {"id": 1, "method": "session.list", "params": {"all": true}}
    response  {"id": 1, "result": ...}  or  {"id": 1, "error": {"code": "not_found", "message": "..."}}
    stream    {"id": 1, "event": {...}}  (events.subscribe: one line per transition)

Error codes are stable; docs/protocol.md lists every method with examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from monitor.errors import MonitorError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # one request line
MAX_DEPTH = 16  # nesting of a request's JSON

# Stable error codes
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
LOCK_HELD = "lock_held"
CONFLICT = "conflict"
UNAVAILABLE = "unavailable"
STORAGE = "storage"  # the state store refused the change (disk full, I/O error): nothing of it was kept
INTERNAL = "internal"


class ProtocolError(MonitorError):
    """An error answered to the client with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    method: str
    params: dict[str, Any]


def _depth(value: Any, limit: int) -> int:
    """How deep `value` nests, not looking past `limit`."""
    if limit < 0:
        return 0
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def decode_request(line: bytes) -> Request:
    if len(line) > MAX_FRAME_BYTES:
        raise ProtocolError(TOO_LARGE, f"a request may be at most {MAX_FRAME_BYTES} bytes")
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(BAD_REQUEST, f"not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, f"JSON nested deeper than {MAX_DEPTH}") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, "a request is a JSON object")
    if _depth(data, MAX_DEPTH + 1) > MAX_DEPTH:
        raise ProtocolError(BAD_REQUEST, f"JSON nested deeper than {MAX_DEPTH}")
    method, params = data.get("method"), data.get("params", {})
    if not isinstance(method, str) or not method:
        raise ProtocolError(BAD_REQUEST, "a request needs a method (a string)")
    if not isinstance(params, dict):
        raise ProtocolError(BAD_REQUEST, "params must be an object")
    return Request(data.get("id"), method, params)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def result(request_id: Any, value: Any) -> bytes:
    return encode({"id": request_id, "result": value})


def error(request_id: Any, code: str, message: str) -> bytes:
    return encode({"id": request_id, "error": {"code": code, "message": message}})


def param(params: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
    """One parameter of the expected type, or a bad_request that names it."""
    if name not in params or params[name] is None:
        if required or default is ...:
            raise ProtocolError(BAD_REQUEST, f"missing parameter {name!r}")
        return default
    value = params[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError(BAD_REQUEST, f"parameter {name!r} must be a number")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(BAD_REQUEST, f"parameter {name!r} must be {names}")
    return value
