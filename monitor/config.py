"""Daemon configuration: TOML file, then MONITOR_* environment variables, then flags.

Paths follow where a service's files belong: as root /run/monitor/monitor.sock and
/var/lib/monitor; otherwise under $XDG_RUNTIME_DIR and $XDG_STATE_HOME; under systemd,
$RUNTIME_DIRECTORY and $STATE_DIRECTORY win. Unknown keys are an error, not a typo
that silently does nothing.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError


class ConfigError(MonitorError):
    pass


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
          "max_connections": int, "idle_timeout_s": float, "log_level": str}


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
        config = replace(config, **{k: _coerce(k, v, str(file)) for k, v in data.items()})
    from_env = {}
    for f in fields(Config):
        name = "MONITOR_" + f.name.upper()
        if env.get(name):
            from_env[f.name] = _coerce(f.name, env[name], name)
    config = replace(config, **from_env)
    if overrides:
        config = replace(config, **{k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    if config.source is not None and config.source not in ("netlink", "pidfd", "poll"):
        raise ConfigError(f"source {config.source!r}: choose netlink, pidfd or poll")
    return config
