"""The README's library example runs as written."""

from __future__ import annotations

import re
import subprocess

from conftest import PYTHON, ROOT


def test_library_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: library.*?```python\n(.*?)```", readme, re.S)
    assert block is not None, "the README lost its library example"
    result = subprocess.run([PYTHON, "-c", block.group(1)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    _pid, code, signal, source = lines[0].split()
    assert (code, signal) == ("3", "None") and source in ("netlink", "pidfd", "poll")
    assert lines[-1].startswith("process.exited")
