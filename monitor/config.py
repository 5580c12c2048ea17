"""Daemon configuration: TOML file, then MONITOR_* environment variables, then flags.

Paths follow where a service's files belong: as root /run/monitor/monitor.sock and
/var/lib/monitor; otherwise under $XDG_RUNTIME_DIR and $XDG_STATE_HOME; under systemd,
$RUNTIME_DIRECTORY and $STATE_DIRECTORY win. Unknown keys are an error, not a typo
that silently does nothing. Webhook endpoints and global hooks come from the file
only: it is root's (as root), and a URL or command is a privilege to grant.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError
from monitor.events import TRANSITION_TYPES
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
    hooks: dict[str, str] = field(default_factory=dict)  # on_start / on_complete for every session
    webhooks: tuple[Endpoint, ...] = ()

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
    """(socket, state dir) for this user, honouring systemd's and XDG's directories."""
    root = os.geteuid() == 0
    if env.get("RUNTIME_DIRECTORY"):
        runtime = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif root:
        runtime = Path("/run/monitor")
    else:
        runtime = Path(env.get("XDG_RUNTIME_DIR") or f"/tmp/monitor-{os.getuid()}") / "monitor"
    if env.get("STATE_DIRECTORY"):
        state = Path(env["STATE_DIRECTORY"].split(":")[0])
    elif root:
        state = Path("/var/lib/monitor")
    else:
        state = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "monitor"
    return runtime / "monitor.sock", state


def default_config_file(env: Mapping[str, str] = os.environ) -> Path:
    if os.geteuid() == 0:
        return Path("/etc/monitor/config.toml")
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "monitor" / "config.toml"


_TYPES = {"socket": Path, "state_dir": Path, "source": str, "relist_interval_s": float, "child_grace_s": float,
          "max_connections": int, "idle_timeout_s": float, "log_level": str, "log_format": str, "subscriber_buffer": int,
          "retain_events_s": float, "hook_timeout_s": float, "metrics_listen": str}
_FILE_ONLY = ("hooks", "webhooks")


def _coerce(key: str, value: Any, origin: str) -> Any:
    if key not in _TYPES:
        raise ConfigError(f"{origin}: unknown setting {key!r} (known: {', '.join(sorted(_TYPES))})")
    kind = _TYPES[key]
    try:
        if kind is Path:
            return Path(str(value)).expanduser()
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {key} = {value!r} is not a {kind.__name__}: {err}") from None


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
    from_env = {}
    for f in fields(Config):
        if f.name in _FILE_ONLY:
            continue
        name = "MONITOR_" + f.name.upper()
        if env.get(name):
            from_env[f.name] = _coerce(f.name, env[name], name)
    config = replace(config, **from_env)
    if overrides:
        config = replace(config, **{k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    if config.source is not None and config.source not in ("netlink", "pidfd", "poll"):
        raise ConfigError(f"source {config.source!r}: choose netlink, pidfd or poll")
    if config.log_format not in ("auto", "text", "journald", "json"):
        raise ConfigError(f"log_format {config.log_format!r}: choose auto, text, journald or json")
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
        if not isinstance(command, str) or not command.strip():
            raise ConfigError(f"{origin}: hooks.{key} is a shell command")
    return dict(value)


_ENDPOINT_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "url": str, "secret": (str, list), "events": list, "timeout_s": (int, float),
                  "allow_private": bool, "max_age_s": (int, float), "retry_first_s": (int, float),
                  "retry_max_s": (int, float), "max_in_flight": int, "format": str}


def _webhooks(value: Any, origin: str) -> tuple[Endpoint, ...]:
    """[[webhooks]] tables: checked whole, so a typo fails the start, not a delivery at 3 am."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{origin}: webhooks are [[webhooks]] tables")
    endpoints = []
    for number, table in enumerate(value, start=1):
        where = f"{origin}: webhook {table.get('name') or number}"
        for key, item in table.items():
            kind = _ENDPOINT_KEYS.get(key)
            if kind is None:
                raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(_ENDPOINT_KEYS))})")
            if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
                raise ConfigError(f"{where}: {key} has the wrong type")
        url = table.get("url")
        if not url:
            raise ConfigError(f"{where}: url is required")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: url {url!r} is not an http(s) URL")
        secret = table.get("secret")
        secrets = tuple(secret) if isinstance(secret, list) else (secret,) if secret else ()
        if not secrets or not all(isinstance(s, str) and len(s) >= 16 for s in secrets):
            raise ConfigError(f"{where}: secret is required, at least 16 characters (24 random bytes is the norm)")
        events = table.get("events")
        if events is not None:
            unknown = set(events) - set(TRANSITION_TYPES)
            if unknown or not events:
                raise ConfigError(f"{where}: events {sorted(unknown) or events} (known: {', '.join(TRANSITION_TYPES)})")
        format_ = _format(table, secrets, events, where)
        allow_private = bool(table.get("allow_private", False))
        literal = ip_literal(parts.hostname)
        if literal is not None and not allow_private and (refusal := non_public_kind(literal)):
            raise ConfigError(f"{where}: {parts.hostname} is not a public address ({refusal}); set allow_private = true to send there")
        tuning: dict[str, Any] = {k: float(table[k]) for k in ("timeout_s", "max_age_s", "retry_first_s", "retry_max_s") if k in table}
        if "max_in_flight" in table:
            tuning["max_in_flight"] = table["max_in_flight"]
        endpoint = Endpoint(name=str(table.get("name") or parts.hostname), url=url, secrets=secrets, format=format_,
                            events=frozenset(events) if events is not None else None, allow_private=allow_private, **tuning)
        if endpoint.timeout_s <= 0 or endpoint.max_age_s <= 0 or endpoint.retry_first_s <= 0 or endpoint.max_in_flight < 1:
            raise ConfigError(f"{where}: timeouts, ages and max_in_flight must be positive")
        endpoints.append(endpoint)
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}: webhook names must differ (give each a name): {names}")
    return tuple(endpoints)


def _format(table: dict[str, Any], secrets: tuple[str, ...], events: list[str] | None, where: str) -> str:
    """The endpoint's format, checked against its secrets and events."""
    format_ = table.get("format", STANDARD)
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
    return str(format_)
