"""Daemon configuration: TOML file, then MONITOR_* environment variables, then flags.

Paths follow where a service's files belong: as root /run/monitor/monitor.sock and
/var/lib/monitor; otherwise under $XDG_RUNTIME_DIR and $XDG_STATE_HOME; under systemd,
$RUNTIME_DIRECTORY and $STATE_DIRECTORY win. Unknown keys are an error, not a typo
that silently does nothing, and every value is checked against its declared type and
range (msgspec, as the socket's params are): an interval is positive and finite, a
buffer holds at least one event, a path or command holds no NUL byte; an error names
the key. Webhook endpoints, global hooks and `[nats]` come from
the file only: it is root's (as root), and a URL or command is a privilege to grant.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket as socketlib
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from monitor.errors import MonitorError
from monitor.events import TRANSITION_TYPES
from monitor.logs import LOG_FORMATS, LOG_LEVELS
from monitor.webhook_format import AGENTCTL, AGENTCTL_TYPES, FORMATS, STANDARD, secret_problem

log = logging.getLogger(__name__)


class ConfigError(MonitorError):
    pass


HOOK_NAMES = ("on_start", "on_complete")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook endpoint: where events of its types are POSTed, signed with its secrets."""

    name: str
    url: str
    secrets: tuple[str, ...] = field(repr=False)  # each signs (standard); agentctl's format has one
    events: frozenset[str] | None = None  # None: every type (the format's)
    timeout_s: float = 15.0
    allow_private: bool = False  # loopback, private, link-local (cloud metadata) destinations
    max_age_s: float = 3 * 24 * 3600.0  # retried until the event is this old, then given up
    retry_first_s: float = 5.0  # the first retry's delay; each next one is 4x, up to retry_max_s
    retry_max_s: float = 6 * 3600.0
    max_in_flight: int = 4
    format: str = "standard"  # or "agentctl" (monitor.webhook_format)

    @property
    def wanted(self) -> frozenset[str] | None:
        """The event types sent to it (None: every one): agentctl's format has only session.stopped."""
        if self.format == AGENTCTL:
            return AGENTCTL_TYPES if self.events is None else self.events & AGENTCTL_TYPES
        return self.events

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the secrets."""
        return {"name": self.name, "url": self.url, "format": self.format,
                "events": sorted(self.events) if self.events is not None else None,
                "timeout_s": self.timeout_s, "allow_private": self.allow_private, "max_age_s": self.max_age_s}


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """`[nats]`: where this daemon publishes its events and keeps its fleet state (JetStream)."""

    servers: tuple[str, ...] = field(repr=False)  # nats://[user:password@]host:port; may hold a secret
    host: str = ""  # this daemon's name in the fleet (default: the host name)
    stream: str = "MONITOR"
    subject_prefix: str = "monitor"
    events: frozenset[str] | None = None  # None: every type
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    duplicate_window_s: float = 3600.0  # the stream's: a resend within it is dropped by Nats-Msg-Id
    max_age_s: float = 30 * 24 * 3600.0  # the stream keeps events this long (0: until limits)
    max_bytes: int = -1  # the stream's size limit (-1: none); the oldest go first
    heartbeat_s: float = 10.0  # a host whose heartbeat is 3x this old shows as unreachable
    timeout_s: float = 5.0  # to connect, and for each PubAck or key-value answer
    retry_first_s: float = 0.5  # while NATS is unreachable: 2x backoff with jitter from here ...
    retry_max_s: float = 30.0  # ... up to here

    def secrets(self) -> list[str]:
        """Every secret text in this table, so that an error message can be cleaned of them."""
        found = [s for s in (self.token, self.password) if s]
        for url in self.servers:
            parts = urllib.parse.urlsplit(url)
            found += [s for s in (parts.password, parts.username if parts.password is None else None) if s]
        return found

    def public(self) -> dict[str, Any]:
        """What may be shown: servers without their user info, which credentials are used (not them)."""
        auth = [name for name in ("creds_file", "nkey_seed_file", "token", "user", "tls_cert") if getattr(self, name)]
        return {"servers": [redact_url(u) for u in self.servers], "host": self.host, "stream": self.stream,
                "subject_prefix": self.subject_prefix, "events": sorted(self.events) if self.events is not None else None,
                "auth": auth, "heartbeat_s": self.heartbeat_s}


def redact_url(url: str) -> str:
    """The URL without its user info (a token or a password may be written there)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = "***@" + host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path
    state_dir: Path
    source: str | None = None  # None: netlink, else pidfd, else poll
    relist_interval_s: float = 30.0
    child_grace_s: float = 5.0
    max_connections: int = 256
    idle_timeout_s: float = 600.0
    log_level: str = "info"
    log_format: str = "auto"  # auto (journald under systemd, else text), text, journald, json
    subscriber_buffer: int = 10_000
    retain_events_s: float = 7 * 24 * 3600.0
    hook_timeout_s: float = 300.0
    metrics_listen: str | None = None  # HOST:PORT of an HTTP /metrics listener, e.g. 127.0.0.1:9464
    orphans: str = "keep"  # a session's descendants alive at its stop: keep (reported) or kill; unless it says
    hooks: dict[str, str] = field(default_factory=dict)  # on_start / on_complete for every session
    webhooks: tuple[Endpoint, ...] = ()
    nats: NatsConfig | None = None  # publishing and fleet state; None: this host keeps to itself

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def exit_dir(self) -> Path:
        return self.state_dir / "exits"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def default_paths(env: Mapping[str, str] = os.environ) -> tuple[Path, Path]:
    """(socket, state dir) for this user, honouring systemd's and XDG's directories.

    Without $XDG_RUNTIME_DIR a user's socket lives in its own state directory, never in a
    shared directory such as /tmp, where another user could have made the path first."""
    root = os.geteuid() == 0
    if env.get("STATE_DIRECTORY"):
        state = Path(env["STATE_DIRECTORY"].split(":")[0])
    elif root:
        state = Path("/var/lib/monitor")
    else:
        state = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "monitor"
    if env.get("RUNTIME_DIRECTORY"):
        runtime = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif root:
        runtime = Path("/run/monitor")
    elif env.get("XDG_RUNTIME_DIR"):
        runtime = Path(env["XDG_RUNTIME_DIR"]) / "monitor"
    else:
        runtime = state
    return runtime / "monitor.sock", state


def default_config_file(env: Mapping[str, str] = os.environ) -> Path:
    if os.geteuid() == 0:
        return Path("/etc/monitor/config.toml")
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "monitor" / "config.toml"


_NO_NUL = r"^[^\x00]*$"
_DAY_S = 24 * 3600.0
_YEARS_S = 10 * 365 * _DAY_S


_DaySeconds = Annotated[float, msgspec.Meta(gt=0, le=_DAY_S)]  # finite, positive, at most a day
_LongSeconds = Annotated[float, msgspec.Meta(gt=0, le=_YEARS_S)]
_PathText = Annotated[str, msgspec.Meta(min_length=1, max_length=4095, pattern=_NO_NUL)]
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_NO_NUL)]
_Command = Annotated[str, msgspec.Meta(min_length=1, max_length=65536, pattern=_NO_NUL)]

# Each setting's type and range. Paths are checked as text, then made Paths.
_SETTINGS: dict[str, Any] = {
    "socket": _PathText, "state_dir": _PathText, "source": Literal["netlink", "pidfd", "poll"],
    "relist_interval_s": _DaySeconds, "child_grace_s": _DaySeconds,
    "max_connections": Annotated[int, msgspec.Meta(ge=1, le=65536)], "idle_timeout_s": _DaySeconds,
    "log_level": Annotated[str, msgspec.Meta(pattern="(?i)^(" + "|".join(LOG_LEVELS) + ")$")],
    "log_format": Annotated[str, msgspec.Meta(pattern="^(" + "|".join(LOG_FORMATS) + ")$")],
    "subscriber_buffer": Annotated[int, msgspec.Meta(ge=1, le=10_000_000)], "retain_events_s": _LongSeconds,
    "hook_timeout_s": _DaySeconds, "metrics_listen": _Text, "orphans": Literal["keep", "kill"],
}
_PATHS = ("socket", "state_dir")
_FILE_ONLY = ("hooks", "webhooks", "nats")


def _explain(err: msgspec.ValidationError) -> str:
    text = str(err).replace(f"`str` matching regex {_NO_NUL!r}", "text without NUL bytes")
    if "matching regex '^(" in text or "matching regex '(?i)^(" in text:  # a choice: say the choices
        text = text.split(" matching regex ")[0] + ": one of " + text.split("^(")[1].split(")$")[0].replace("|", ", ")
    return text


def _coerce(key: str, value: Any, origin: str, *, text: bool = False) -> Any:
    """`value` of setting `key`, checked; `text`: it came as a string (an environment variable)."""
    if key not in _SETTINGS:
        raise ConfigError(f"{origin}: unknown setting {key!r} (known: {', '.join(sorted(_SETTINGS))})")
    try:
        checked = msgspec.convert(value, _SETTINGS[key], strict=not text)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{origin}: {key} = {value!r}: {_explain(err)}") from None
    return Path(checked).expanduser() if key in _PATHS else checked


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] = os.environ,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The file (if it exists, or as named), then MONITOR_<KEY> variables, then `overrides`."""
    socket, state_dir = default_paths(env)
    config = Config(socket=socket, state_dir=state_dir)
    file = Path(path) if path is not None else default_config_file(env)
    if file.exists() or path is not None:
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config {file}: {err}") from None
        tables = {k: data.pop(k) for k in _FILE_ONLY if k in data}
        config = replace(config, **{k: _coerce(k, v, str(file)) for k, v in data.items()})
        if "hooks" in tables:
            config = replace(config, hooks=_hooks(tables["hooks"], str(file)))
        if "webhooks" in tables:
            config = replace(config, webhooks=_webhooks(tables["webhooks"], str(file)))
            if file.stat().st_mode & 0o077:
                log.warning("%s holds webhook secrets but others may read it: chmod 600 %s", file, file)
        if "nats" in tables:
            config = replace(config, nats=nats_config(tables["nats"], str(file)))
            if config.nats is not None and config.nats.secrets() and file.stat().st_mode & 0o077:
                log.warning("%s holds NATS credentials but others may read it: chmod 600 %s", file, file)
    from_env = {}
    for f in fields(Config):
        if f.name in _FILE_ONLY:
            continue
        name = "MONITOR_" + f.name.upper()
        if env.get(name):
            from_env[f.name] = _coerce(f.name, env[name], name, text=True)
    config = replace(config, **from_env)
    if overrides:
        config = replace(config, **{k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    if config.metrics_listen is not None:
        listen_address(config.metrics_listen)
    longest = max((e.max_age_s for e in config.webhooks), default=0.0)
    if config.retain_events_s < longest:
        raise ConfigError(f"retain_events_s ({config.retain_events_s:g}) must cover the longest webhook max_age_s ({longest:g})")
    return config


def listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"metrics_listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]"), int(port)


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` spells, if it spells one: without a zone, an IPv4-mapped one as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def non_public_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What a non-global address is, which webhooks are not sent to by default; None if global.
    The one destination policy: the config checks literals with it, delivery every resolved address."""
    if ip.is_global:
        return None
    return ("loopback" if ip.is_loopback else "link-local (cloud metadata lives there)" if ip.is_link_local
            else "private" if ip.is_private else "not a public address")


def _hooks(value: Any, origin: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: [hooks] is a table of on_start / on_complete commands")
    for key, command in value.items():
        if key not in HOOK_NAMES:
            raise ConfigError(f"{origin}: unknown hook {key!r} (known: {', '.join(HOOK_NAMES)})")
        if not isinstance(command, str) or not command.strip() or "\0" in command:
            raise ConfigError(f"{origin}: hooks.{key} is a shell command (without NUL bytes)")
    return dict(value)


class _EndpointTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A [[webhooks]] table as written: its keys, their types and ranges (UNSET: not given)."""

    name: _Text | None = None
    url: _Text | None = None
    secret: _Text | list[_Text] | None = None
    events: list[_Text] | None = None
    allow_private: bool = False
    timeout_s: _DaySeconds | msgspec.UnsetType = msgspec.UNSET
    max_age_s: _LongSeconds | msgspec.UnsetType = msgspec.UNSET
    retry_first_s: _DaySeconds | msgspec.UnsetType = msgspec.UNSET
    retry_max_s: _LongSeconds | msgspec.UnsetType = msgspec.UNSET
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=1024)] | msgspec.UnsetType = msgspec.UNSET
    format: _Text = STANDARD


_TUNING = ("timeout_s", "max_age_s", "retry_first_s", "retry_max_s", "max_in_flight")


def _webhooks(value: Any, origin: str) -> tuple[Endpoint, ...]:
    """[[webhooks]] tables: checked whole, so a typo fails the start, not a delivery at 3 am."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{origin}: webhooks are [[webhooks]] tables")
    endpoints = []
    for number, raw in enumerate(value, start=1):
        where = f"{origin}: webhook {raw.get('name') or number}"
        try:
            table = msgspec.convert(raw, _EndpointTable)
        except msgspec.ValidationError as err:
            text = _explain(err)
            if text.startswith("Object contains unknown field"):
                key = text.split("`")[1]
                raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(_EndpointTable.__struct_fields__)})") from None
            raise ConfigError(f"{where}: {text.replace(' - at `$.', ': ').rstrip('`')}") from None
        url = table.url
        if not url:
            raise ConfigError(f"{where}: url is required")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: url {url!r} is not an http(s) URL")
        secret = table.secret
        secrets = tuple(secret) if isinstance(secret, list) else (secret,) if secret else ()
        if not secrets or not all(len(s) >= 16 for s in secrets):
            raise ConfigError(f"{where}: secret is required, at least 16 characters (24 random bytes is the norm)")
        events = table.events
        if events is not None:
            unknown = set(events) - set(TRANSITION_TYPES)
            if unknown or not events:
                raise ConfigError(f"{where}: events {sorted(unknown) or events} (known: {', '.join(TRANSITION_TYPES)})")
        format_ = _format(table.format, secrets, events, where)
        allow_private = table.allow_private
        literal = ip_literal(parts.hostname)
        if literal is not None and not allow_private and (refusal := non_public_kind(literal)):
            raise ConfigError(f"{where}: {parts.hostname} is not a public address ({refusal}); set allow_private = true to send there")
        tuning = {k: getattr(table, k) for k in _TUNING if getattr(table, k) is not msgspec.UNSET}
        endpoint = Endpoint(name=table.name or parts.hostname, url=url, secrets=secrets, format=format_,
                            events=frozenset(events) if events is not None else None, allow_private=allow_private, **tuning)
        endpoints.append(endpoint)
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}: webhook names must differ (give each a name): {names}")
    return tuple(endpoints)


def _format(format_: str, secrets: tuple[str, ...], events: list[str] | None, where: str) -> str:
    """The endpoint's format, checked against its secrets and events."""
    if format_ not in FORMATS:
        raise ConfigError(f"{where}: format {format_!r}: choose {' or '.join(FORMATS)}")
    for secret in secrets:
        if (problem := secret_problem(format_, secret)) is not None:
            raise ConfigError(f"{where}: secret: {problem}")
    if format_ == AGENTCTL:
        if len(secrets) > 1:
            raise ConfigError(f"{where}: format \"agentctl\" takes one secret: its receivers check exactly one signature "
                              "(rotate by changing it here and at the receiver together)")
        if events is not None and not set(events) & AGENTCTL_TYPES:
            raise ConfigError(f"{where}: format \"agentctl\" sends session.stopped only; events {events} would send nothing")
    return format_


_NATS_KEYS: dict[str, type | tuple[type, ...]] = {
    "servers": (list, str), "host": str, "stream": str, "subject_prefix": str, "events": list, "creds_file": str,
    "nkey_seed_file": str, "token": str, "user": str, "password": str, "tls_ca": str, "tls_cert": str, "tls_key": str,
    "duplicate_window_s": (int, float), "max_age_s": (int, float), "max_bytes": int, "heartbeat_s": (int, float),
    "timeout_s": (int, float), "retry_first_s": (int, float), "retry_max_s": (int, float)}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a JetStream stream (and bucket) name, and one subject token


def nats_config(value: Any, origin: str) -> NatsConfig | None:
    """[nats]: checked whole at start-up. Without `servers` there is nothing to publish to: None."""
    where = f"{origin}: [nats]"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is a table")
    for key, item in value.items():
        kind = _NATS_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(_NATS_KEYS))})")
        if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
            raise ConfigError(f"{where}: {key} has the wrong type")
    servers = value.get("servers")
    if not servers:
        return None
    servers = (servers,) if isinstance(servers, str) else tuple(servers)
    for url in servers:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError(f"{where}: server {redact_url(url) if isinstance(url, str) else url!r} is not a nats:// or tls:// URL")
    stream, prefix = value.get("stream", "MONITOR"), value.get("subject_prefix", "monitor")
    if not _NAME.match(stream):
        raise ConfigError(f"{where}: stream {stream!r} may hold only letters, digits, _ and -")
    if not prefix or not all(_NAME.match(token) for token in prefix.split(".")):
        raise ConfigError(f"{where}: subject_prefix {prefix!r} is dot-separated tokens of letters, digits, _ and - (no wildcards)")
    events = value.get("events")
    if events is not None:
        unknown = set(events) - set(TRANSITION_TYPES)
        if unknown or not events:
            raise ConfigError(f"{where}: events {sorted(unknown) or events} (known: {', '.join(TRANSITION_TYPES)})")
    if bool(value.get("user")) != bool(value.get("password")):
        raise ConfigError(f"{where}: user and password go together")
    if bool(value.get("tls_cert")) != bool(value.get("tls_key")):
        raise ConfigError(f"{where}: tls_cert and tls_key go together")
    for key in ("creds_file", "nkey_seed_file", "tls_ca", "tls_cert", "tls_key"):
        if value.get(key) and not os.path.isfile(os.path.expanduser(value[key])):
            raise ConfigError(f"{where}: {key} {value[key]!r} is not a file")
    numbers: dict[str, Any] = {k: float(value[k]) for k in ("duplicate_window_s", "max_age_s", "heartbeat_s", "timeout_s",
                                                             "retry_first_s", "retry_max_s") if k in value}
    if "max_bytes" in value:
        numbers["max_bytes"] = value["max_bytes"]
    paths = {k: os.path.expanduser(value[k]) for k in ("creds_file", "nkey_seed_file", "tls_ca", "tls_cert", "tls_key") if value.get(k)}
    config = NatsConfig(servers=servers, host=value.get("host") or socketlib.gethostname(), stream=stream, subject_prefix=prefix,
                        events=frozenset(events) if events is not None else None, token=value.get("token"), user=value.get("user"),
                        password=value.get("password"), **paths, **numbers)
    intervals = (config.heartbeat_s, config.timeout_s, config.retry_first_s, config.retry_max_s, config.duplicate_window_s)
    if not all(math.isfinite(x) and x > 0 for x in intervals) or not (math.isfinite(config.max_age_s) and config.max_age_s >= 0):
        raise ConfigError(f"{where}: intervals, timeouts and the duplicate window must be positive and finite")
    if config.max_age_s and config.duplicate_window_s > config.max_age_s:
        raise ConfigError(f"{where}: duplicate_window_s ({config.duplicate_window_s:g}) cannot exceed max_age_s ({config.max_age_s:g})")
    return config
