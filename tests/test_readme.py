"""The README's library example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT, Procs


def run_example(name: str, env: dict[str, str] | None = None) -> list[str]:
    """Run the README's python block marked `<!-- example: NAME -->`; its output lines."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- example: {name}.*?```python\n(.*?)```", readme, re.S)
    assert block is not None, f"the README lost its {name} example"
    result = subprocess.run([PYTHON, "-c", block.group(1)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_library_example_runs() -> None:
    lines = run_example("library")
    _pid, code, signal, source = lines[0].split()
    # relist: on a slow machine the child may have ended before the source listened (a zombie then)
    assert (code, signal) == ("3", "None") and source in ("netlink", "pidfd", "poll", "relist")
    assert lines[-1].startswith("process.exited")


def test_engine_example_runs() -> None:
    lines = run_example("engine")
    assert lines[0].split()[1] == "running" and "refused:" in lines[1] and "is locked by process" in lines[1]
    state, reason, code, evidence = lines[2].split()
    assert (state, reason, code) == ("stopped", "exited", "3") and evidence in ("netlink", "pidfd", "poll", "relist")
    assert lines[3] == "[]"


def test_client_example_runs_against_a_real_daemon(procs: Procs, tmp_path: Path) -> None:
    from test_daemon import Daemon

    daemon = Daemon(procs, tmp_path / "run" / "monitor.sock", tmp_path / "state")
    lines = run_example("client", env={"MONITOR_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)})
    reason, code, evidence = lines[0].split()
    assert (reason, code) == ("exited", "3") and evidence in ("netlink", "pidfd", "exit_file", "poll")
    assert lines[1] == "[]"
    daemon.proc.terminate()
    daemon.proc.wait(10)
