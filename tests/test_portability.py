"""Where the Linux facilities are missing (macOS), monitor imports and the poll source works."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest
from conftest import PYTHON, ROOT

# The modules a macOS process imports: the package, the CLI, and the portable sources.
MACOS_MODULES = ["monitor/__init__.py", "monitor/cli.py", "monitor/wrapper.py", "monitor/sources/poll.py",
                 "monitor/sources/fake.py", "monitor/sources/inotify.py"]

AS_ON_MACOS = textwrap.dedent(
    """
    import asyncio, importlib.abc, json, subprocess, sys
    LINUX_ONLY = {"monitor.sources.netlink", "monitor.sources.pidfd", "monitor.sources.native",
                  "monitor._cnproc_native", "pyroute2", "inotify_simple"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in LINUX_ONLY or name.split(".")[0] in LINUX_ONLY:
                raise ImportError(f"{name} is Linux-only")
            return None

    import psutil  # the real one for this OS, imported before the platform is faked
    sys.meta_path.insert(0, Refuse())
    sys.platform = "darwin"
    sys.path.insert(0, %r)
    import monitor, monitor.cli
    from monitor import identity
    identity.HAVE_PROC = False  # no /proc: psutil only

    async def main():
        child = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 3"])
        event = await monitor.wait_for_exit(child.pid, timeout=10, interval_s=0.05)
        child.wait()
        return {"source": event.source, "exit_code": event.exit_code, "pid_ok": event.key.pid == child.pid,
                "loaded": sorted(m for m in sys.modules if m in LINUX_ONLY)}

    print(json.dumps(asyncio.run(main())))
    """
) % str(ROOT)


def test_import_and_poll_without_linux_only_modules() -> None:
    result = subprocess.run([PYTHON, "-c", AS_ON_MACOS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # psutil alone cannot know a status: None, never a made-up 0.
    assert out == {"source": "poll", "exit_code": None, "pid_ok": True, "loaded": []}
    assert "falling back" in result.stderr or "unavailable" in result.stderr


def test_macos_modules_type_check_for_darwin() -> None:
    mypy = shutil.which("mypy", path=str(ROOT / ".venv" / "bin")) or shutil.which("mypy")
    if mypy is None:
        pytest.skip("mypy is not installed")
    result = subprocess.run([mypy, "--platform", "darwin", *MACOS_MODULES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
