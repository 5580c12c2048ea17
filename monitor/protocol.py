"""The wire format of the daemon's socket: one JSON object per line (NDJSON), versioned, and
one declared schema for the params of every method.

    request   {"id": 1, "method": "session.list", "params": {"all": true}}
    response  {"id": 1, "result": ...}  or  {"id": 1, "error": {"code": "not_found", "message": "..."}}
    stream    {"id": 1, "event": {...}}  (events.subscribe: one line per transition)

A request is decoded in two steps: the envelope (id, method, params kept raw), then the
params against the method's schema (`METHODS`). The schemas are strict: no field that is
not declared, no bool for a number, no string for a number; numbers are bounded (and so
finite: JSON has no NaN or Infinity, and the decoder refuses those tokens); strings are
bounded in length and never hold a NUL byte (the kernel would cut a path, an argument or a
command there); directories are absolute and come out normalized. A violation is a
`bad_request` that names the field, so a handler only ever sees typed, checked values.

Error codes are stable; docs/protocol.md lists every method with examples.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from monitor.errors import MonitorError
from monitor.events import TRANSITION_TYPES

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # one request line

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

# -- bounds --------------------------------------------------------------------------------

MAX_DURATION_S = 10 * 365 * 24 * 3600.0  # ten years: any longer is a mistake, or an attack on the timers
INT64_MAX = 2**63 - 1  # SQLite's integers: ids and event ids live there
PID_MAX_LIMIT = 1 << 22  # include/linux/threads.h: the largest pid_max a 64-bit kernel allows
PATH_MAX = 4096  # include/uapi/linux/limits.h, with its NUL
MAX_ARG_STRLEN = 131072  # include/uapi/linux/binfmts.h: one argv or environment string
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_LABELS = 64
MAX_COMMAND = 65536  # a hook or fuse action (a shell command)
MAX_NAME = 256  # by, reason's shorter cousins, endpoint names, request ids
MAX_REASON = 1024

_NO_NUL = r"^[^\x00]*$"
_Meta = msgspec.Meta

Name = Annotated[str, _Meta(min_length=1, max_length=MAX_NAME, pattern=_NO_NUL)]
Reason = Annotated[str, _Meta(max_length=MAX_REASON, pattern=_NO_NUL)]
Command = Annotated[str, _Meta(min_length=1, max_length=MAX_COMMAND, pattern=_NO_NUL)]
PathText = Annotated[str, _Meta(min_length=1, max_length=PATH_MAX - 1, pattern=_NO_NUL)]
SessionRef = Annotated[str, _Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]  # an id or a unique prefix
Arg = Annotated[str, _Meta(max_length=MAX_ARG_STRLEN - 1, pattern=_NO_NUL)]
EnvName = Annotated[str, _Meta(min_length=1, max_length=MAX_ARG_STRLEN - 1, pattern=r"^[^\x00=]+$")]
LabelKey = Annotated[str, _Meta(min_length=1, max_length=128, pattern=_NO_NUL)]
SignalName = Annotated[str, _Meta(min_length=1, max_length=16, pattern=_NO_NUL)]
MethodName = Annotated[str, _Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z._]*$")]
Seconds = Annotated[float, _Meta(gt=0, le=MAX_DURATION_S)]
Pid = Annotated[int, _Meta(ge=1, le=PID_MAX_LIMIT)]
EventId = Annotated[int, _Meta(ge=0, le=INT64_MAX)]
RowId = Annotated[int, _Meta(ge=1, le=INT64_MAX)]
Limit = Annotated[int, _Meta(ge=1, le=10_000)]
Labels = Annotated[dict[LabelKey, Reason], _Meta(max_length=MAX_LABELS)]
Env = Annotated[dict[EnvName, Arg], _Meta(max_length=MAX_ENV)]
Argv = Annotated[list[Arg], _Meta(min_length=1, max_length=MAX_ARGS)]
Types = Annotated[list[Name], _Meta(max_length=64)]
RequestId = Annotated[int, _Meta(ge=-INT64_MAX, le=INT64_MAX)] | Name | None


class ProtocolError(MonitorError):
    """An error answered to the client with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# -- checks that a type alone cannot say (raised as ValueError, which msgspec reports as invalid) --


def directory(field: str, value: str, *, existing: bool = True) -> str:
    """An absolute directory, normalized (symbolic links and `..` resolved); with `existing`, one
    that is there now. Resolved here, once: every later check and the engine see the same path."""
    if not os.path.isabs(value):
        raise ValueError(f"{field} must be an absolute path, got {value!r}")
    path = os.path.realpath(value)
    if existing and not os.path.isdir(path):
        raise ValueError(f"{field}: {value} is not an existing directory")
    return path


def signal_number(field: str, value: int | str) -> int:
    """A signal by name ("TERM", "SIGKILL", "term") or number (9, "9") that this platform has.
    0 is not a signal (it only probes), and neither is anything outside valid_signals()."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, str):
        number = signal.Signals.__members__.get("SIG" + value.upper().removeprefix("SIG"))
        if number is None:
            raise ValueError(f"{field}: unknown signal {value!r}")
        return int(number)
    if value not in {int(s) for s in signal.valid_signals()}:
        raise ValueError(f"{field}: {value} is not a signal number of this platform")
    return value


# -- the schemas -----------------------------------------------------------------------------


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A method's params: every field declared; anything else is a bad_request."""


class NoParams(Params, kw_only=True):
    pass


class Hooks(Params, kw_only=True):
    on_start: Command | None = None  # shell commands, run as the session's owner
    on_complete: Command | None = None

    def hooks(self) -> dict[str, str | None]:
        return {"on_start": self.on_start, "on_complete": self.on_complete}


class AttachParams(Hooks, kw_only=True):
    pid: Pid
    cwd: PathText | None = None
    labels: Labels = msgspec.field(default_factory=dict)
    policy: Literal["root", "tree"] = "root"
    timeout_s: Seconds | None = None
    kill_on_timeout: bool = False
    lock: bool = True
    force: bool = False
    orphans: Literal["keep", "kill"] | None = None  # None: the config's `orphans`

    def __post_init__(self) -> None:
        if self.cwd is not None:
            self.cwd = directory("cwd", self.cwd)


class LaunchParams(Hooks, kw_only=True):
    argv: Argv
    cwd: PathText
    env: Env = msgspec.field(default_factory=dict)
    labels: Labels = msgspec.field(default_factory=dict)
    timeout_s: Seconds | None = None
    kill_on_timeout: bool = False
    lock: bool = True
    force: bool = False
    tree: bool = False
    log: PathText | None = None
    orphans: Literal["keep", "kill"] | None = None  # None: the config's `orphans`

    def __post_init__(self) -> None:
        if not self.argv[0]:
            raise ValueError("argv[0] (the command) is empty")
        self.cwd = directory("cwd", self.cwd)
        if self.log is not None and not os.path.isabs(self.log):
            raise ValueError(f"log must be an absolute path, got {self.log!r}")


class ListParams(Params, kw_only=True):
    all: bool = False


class SessionParams(Params, kw_only=True):
    id: SessionRef


class OrphansParams(Params, kw_only=True):
    id: SessionRef | None = None  # one session's; None: every stopped session's


class StopParams(Params, kw_only=True):
    id: SessionRef
    signal: int | SignalName = "TERM"
    grace_s: Seconds = 5.0
    wait: bool = True

    def __post_init__(self) -> None:
        self.signal = signal_number("signal", self.signal)

    @property
    def signum(self) -> int:
        assert isinstance(self.signal, int)
        return self.signal


class LockParams(Params, kw_only=True):
    directory: PathText
    by: Name | None = None
    reason: Reason | None = None

    def __post_init__(self) -> None:
        self.directory = directory("directory", self.directory)


class DirectoryParams(Params, kw_only=True):
    """A directory that something may be held on: it may be gone since (a lock on a removed
    directory can still be released), so it is only normalized."""

    directory: PathText

    def __post_init__(self) -> None:
        self.directory = directory("directory", self.directory, existing=False)


class FuseSetParams(Params, kw_only=True):
    directory: PathText
    ttl_s: Seconds
    action: Command | None = None

    def __post_init__(self) -> None:
        self.directory = directory("directory", self.directory)


class FuseExtendParams(DirectoryParams, kw_only=True):
    by_s: Seconds


class SubscribeParams(Params, kw_only=True):
    types: Types | None = None
    session: SessionRef | None = None
    since: EventId | None = None

    def __post_init__(self) -> None:
        if self.types is not None and not set(self.types) <= set(TRANSITION_TYPES):
            raise ValueError(f"types is a list of event types: {', '.join(TRANSITION_TYPES)}")


class WebhookListParams(Params, kw_only=True):
    failed: bool = False
    limit: Limit = 100


class WebhookRetryParams(Params, kw_only=True):
    id: RowId


class WebhookEnableParams(Params, kw_only=True):
    name: Name


METHODS: dict[str, type[Params]] = {
    "hello": NoParams,
    "daemon.status": NoParams,
    "session.launch": LaunchParams,
    "session.attach": AttachParams,
    "session.list": ListParams,
    "session.get": SessionParams,
    "session.stop": StopParams,
    "session.children": SessionParams,
    "session.orphans": OrphansParams,
    "lock.acquire": LockParams,
    "lock.release": DirectoryParams,
    "lock.list": NoParams,
    "lock.who": DirectoryParams,
    "fuse.set": FuseSetParams,
    "fuse.extend": FuseExtendParams,
    "fuse.cancel": DirectoryParams,
    "fuse.list": NoParams,
    "events.subscribe": SubscribeParams,
    "metrics": NoParams,
    "webhook.list": WebhookListParams,
    "webhook.retry": WebhookRetryParams,
    "webhook.enable": WebhookEnableParams,
}


# -- decoding --------------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    method: MethodName
    id: RequestId = None
    params: msgspec.Raw = msgspec.Raw(b"{}")


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str | None
    method: str
    params: msgspec.Raw


_WHERE = re.compile(r"^(?P<what>.*) - at `\$\.?(?P<field>[^`]*)`$", re.S)
_NUL_RULE = f"matching regex {_NO_NUL!r}"


def _explain(err: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's message, with the field first: "ttl_s: Expected `float` > 0.0"."""
    text = str(err).replace(f"`str` {_NUL_RULE}", "a string without NUL bytes")
    match = _WHERE.match(text)
    if match is None:
        return prefix + text
    return f"{prefix}{match['field']}: {match['what']}"


def decode_request(line: bytes) -> Request:
    if len(line) > MAX_FRAME_BYTES:
        raise ProtocolError(TOO_LARGE, f"a request may be at most {MAX_FRAME_BYTES} bytes")
    try:
        envelope = msgspec.json.decode(line, type=_Envelope)
    except msgspec.ValidationError as err:
        raise ProtocolError(BAD_REQUEST, "a request is an object with a method (and an id that is a number, a string "
                            f"or null): {_explain(err)}") from None
    except msgspec.DecodeError as err:
        raise ProtocolError(BAD_REQUEST, f"not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "JSON nested too deep") from None
    return Request(envelope.id, envelope.method, envelope.params)


def decode_params(method: str, raw: msgspec.Raw) -> Params:
    """The params of `method`, checked against its schema (`method` is one of METHODS)."""
    try:
        return msgspec.json.decode(raw, type=METHODS[method])
    except msgspec.ValidationError as err:
        raise ProtocolError(BAD_REQUEST, _explain(err, f"{method}: ")) from None
    except (msgspec.DecodeError, RecursionError) as err:
        raise ProtocolError(BAD_REQUEST, f"{method}: params are not a JSON object: {err}") from None


# -- encoding --------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def result(request_id: Any, value: Any) -> bytes:
    return encode({"id": request_id, "result": value})


def error(request_id: Any, code: str, message: str) -> bytes:
    return encode({"id": request_id, "error": {"code": code, "message": message}})
