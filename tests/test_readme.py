"""The README's library example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT, Procs

from monitor.client import Client


def run_example(name: str, env: dict[str, str] | None = None) -> list[str]:
    """Run the README's python block marked `<!-- example: NAME -->`; its output lines."""
    result = subprocess.run([PYTHON, "-c", readme_block(name, "python")], cwd=ROOT, capture_output=True, text=True, timeout=60,
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


def readme_block(name: str, language: str) -> str:
    block = re.search(rf"<!-- example: {name}.*?```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, f"the README lost its {name} example"
    return block.group(1)


def test_webhook_config_and_receiver_examples_work_together(procs: Procs, tmp_path: Path) -> None:
    """A new user's path: the README's config, pointed at the README's receiver, with a
    session that exits 7: the receiver verifies the signature and prints the real status."""
    import socket

    from test_daemon import Daemon

    from monitor.config import load_config

    config = tmp_path / "config.toml"
    config.write_text(readme_block("webhook-config", "toml"))
    endpoint, agentctl = load_config(config, env={}).webhooks  # the example, as written, is valid
    assert (endpoint.format, agentctl.format) == ("standard", "agentctl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    receiver = procs.spawn(PYTHON, "-c", readme_block("receiver", "python"), stdout=subprocess.PIPE,
                           env={**os.environ, "PORT": str(port), "WEBHOOK_SECRET": endpoint.secrets[0]})
    config.write_text(config.read_text().replace(f'url = "{endpoint.url}"', f'url = "http://127.0.0.1:{port}/hook"\nallow_private = true'))
    daemon = Daemon(procs, tmp_path / "run" / "monitor.sock", tmp_path / "state", "--config", str(config))
    try:
        with Client(daemon.socket) as client:
            session = client.call("session.launch", argv=["sh", "-c", "exit 7"], cwd=str(tmp_path))
        assert receiver.stdout is not None
        line = receiver.stdout.readline().decode().split()
        assert line == ["session.stopped", session["id"], "7"]
    finally:
        receiver.terminate()
        receiver.wait(10)
        daemon.proc.terminate()
        daemon.proc.wait(10)


def test_the_first_five_minutes_walk_runs_as_written(procs: Procs, tmp_path: Path) -> None:
    """The README's walk, as a new user types it in a second terminal, against a real daemon: no
    traceback, nothing undocumented, and what each step says it does."""
    from test_daemon import Daemon

    daemon = Daemon(procs, tmp_path / "run" / "monitor.sock", tmp_path / "state")
    env = {**os.environ, "MONITOR_SOCKET": str(daemon.socket), "TMPDIR": str(tmp_path)}  # mktemp -d: in tmp_path
    env.pop("VIRTUAL_ENV", None)
    try:
        walk = subprocess.run(["sh", "-c", readme_block("walk", "sh")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=env, stdin=subprocess.DEVNULL)
    finally:
        daemon.proc.terminate()
        daemon.proc.wait(10)
    assert walk.returncode == 0, walk.stderr
    assert "Traceback" not in walk.stderr and walk.stderr == "", walk.stderr
    out = walk.stdout.splitlines()
    assert out[0] == "exit status 3"  # launch --wait: the command's own status
    assert [p.read_text() for p in tmp_path.glob("tmp.*/build.out")] == ["built\n"]  # it wrote where it ran
    header = out.index(next(line for line in out if line.startswith("ID ")))
    assert out[header].split() == ["ID", "PID", "STATE", "STARTED", "CWD", "COMMAND"]
    row = out[header + 1].split()
    session_id = row[0]
    assert row[2] == "running" and row[-2:] == ["sleep", "600"]
    stop = dict(line.split(":", 1) for line in out[header + 2:] if line[:1].isalpha() and ":" in line)
    assert stop["id"].strip() == session_id and stop["state"].strip().startswith("killed, SIGTERM (")
    story = [line.split() for line in out if line.startswith("#")]
    assert [e[2] for e in story][-1] == "session.stopped" and "session.started" in [e[2] for e in story]
    assert all(e[3] == session_id for e in story if e[2].startswith("session."))
