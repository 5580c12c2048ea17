"""Running under a service manager: the systemd notify protocol (without systemd), the unit
and plist files, and the configuration's sources and errors."""

from __future__ import annotations

import plistlib
import re
import shutil
import signal
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, Procs

from monitor.config import ConfigError, load_config


def test_the_daemon_speaks_the_systemd_notify_protocol(procs: Procs, tmp_path: Path) -> None:
    """READY=1 only once it serves, WATCHDOG=1 from its loop, STOPPING=1 on SIGTERM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    sock = tmp_path / "run" / "monitor.sock"
    try:
        daemon = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(sock), "--state-dir", str(tmp_path / "state"),
                             "daemon", cwd=ROOT, env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000",
                                                      "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready and sock.exists()  # ready means serving
        assert "WATCHDOG=1" in notify.recv(4096).decode()
        daemon.send_signal(signal.SIGTERM)
        messages = []
        while "STOPPING=1" not in "".join(messages):
            messages.append(notify.recv(4096).decode())
        assert daemon.wait(10) == 0
    finally:
        notify.close()


def _unit(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


UNIT = ROOT / "scripts" / "monitor.service"
# Directives that every process the daemon forks inherits (a mount namespace, seccomp filters, the
# capability bounding set, ...): each broke launched commands, webhooks or metrics once.
LEAKING = ("ProtectSystem", "ProtectHome", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "PrivateTmp", "PrivateDevices",
           "PrivateNetwork", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictAddressFamilies",
           "RestrictNamespaces", "LockPersonality", "SystemCallArchitectures", "SystemCallFilter", "MemoryDenyWriteExecute",
           "CapabilityBoundingSet", "NoNewPrivileges", "ProtectClock", "ProtectHostname", "RestrictRealtime")


def test_the_systemd_unit_says_what_the_daemon_needs() -> None:
    unit = _unit(UNIT)
    assert unit["Type"] == "notify" and unit["ExecStart"] == "/opt/monitor/bin/monitor daemon"  # the README's install
    assert unit["RuntimeDirectory"] == unit["StateDirectory"] == "monitor"
    assert unit["Restart"] == "on-failure" and unit["KillMode"] == "process"  # sessions outlive a restart


def test_the_systemd_unit_leaks_no_sandbox_into_launched_commands() -> None:
    """Regression: ProtectSystem=strict made `monitor launch -- sh -c 'echo built > build.out'` fail
    with a read-only file system, and RestrictAddressFamilies=AF_UNIX AF_NETLINK killed the daemon
    when metrics_listen was set and left every webhook pending."""
    unit = _unit(UNIT)
    assert [name for name in LEAKING if name in unit] == []


def test_the_systemd_units_documentation_is_installed_by_pip(tmp_path: Path) -> None:
    """Documentation= names files that `pip install` puts under the prefix (/opt/monitor)."""
    documents = [url.removeprefix("file:///opt/monitor/") for url in _unit(UNIT)["Documentation"].split()]
    assert documents and all(not d.startswith("file:") for d in documents)
    subprocess.run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=120)
    [wheel] = tmp_path.glob("monitor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = {name.split(".data/data/", 1)[1] for name in archive.namelist() if ".data/data/" in name}
    assert set(documents) <= data


def test_systemd_analyze_verify_finds_nothing_wrong_with_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    prefix = Path(PYTHON).parent.parent  # the venv stands in for /opt/monitor: verify checks that ExecStart runs
    unit = tmp_path / "monitor.service"
    unit.write_text(UNIT.read_text().replace("/opt/monitor/", f"{prefix}/"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "monitor.service" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_launchd_plist_parses() -> None:
    plist = plistlib.loads((ROOT / "scripts" / "dev.monitor.daemon.plist").read_bytes())
    assert plist["ProgramArguments"][-1] == "daemon" and plist["RunAtLoad"] is True


def test_config_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('source = "pidfd"\nrelist_interval_s = 10\nsocket = "/tmp/a.sock"\n')
    config = load_config(file, env={"MONITOR_RELIST_INTERVAL_S": "5", "HOME": str(tmp_path)},
                         overrides={"socket": "/tmp/b.sock", "state_dir": None})
    assert (config.source, config.relist_interval_s, str(config.socket)) == ("pidfd", 5.0, "/tmp/b.sock")


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1\n", "unknown setting 'colour'"),
    ("relist_interval_s = true\n", "relist_interval_s = True: Expected `float`, got `bool`"),
    ("relist_interval_s = -1\n", "relist_interval_s = -1: Expected `float` > 0.0"),
    ("relist_interval_s = nan\n", "relist_interval_s = nan: Expected `float` > 0.0"),
    ("retain_events_s = inf\n", "retain_events_s = inf: Expected `float` <= "),
    ("subscriber_buffer = 0\n", "subscriber_buffer = 0: Expected `int` >= 1"),
    ("max_connections = 1.5\n", "max_connections = 1.5: Expected `int`, got `float`"),
    ("source = 'kqueue'\n", "source = 'kqueue': Invalid enum value 'kqueue'"),
    ("log_format = 'xml'\n", "log_format = 'xml': Expected `str`: one of auto, text, journald, json"),
    ('socket = "/run/a\\u0000b"\n', "socket = '/run/a\\x00b': Expected text without NUL bytes"),
    ("not toml", "cannot read config"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "config.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(file, env={"HOME": str(tmp_path)})


def test_the_daemon_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("colour = 1\n")
    result = subprocess.run([PYTHON, "-m", "monitor", "daemon", "--config", str(tmp_path / "c.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "unknown setting 'colour'" in result.stderr
