"""The README's library example runs as written."""

from __future__ import annotations

import re
import subprocess

from conftest import PYTHON, ROOT


def run_example(name: str) -> list[str]:
    """Run the README's python block marked `<!-- example: NAME -->`; its output lines."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- example: {name}.*?```python\n(.*?)```", readme, re.S)
    assert block is not None, f"the README lost its {name} example"
    result = subprocess.run([PYTHON, "-c", block.group(1)], cwd=ROOT, capture_output=True, text=True, timeout=60)
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
