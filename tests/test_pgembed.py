"""The embedded PostgreSQL after its owner is SIGKILLed: the next start takes it over and stops it."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from .conftest import CODEPLAN, ROOT, Server, base_env, free_port


def postmaster(data_dir: Path) -> psutil.Process:
    pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    process = psutil.Process(pid)
    assert process.name() == "postgres"
    return process


def stopped(process: psutil.Process, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def codeplan_run(data_dir: Path, started: list[Server]) -> Server:
    port = free_port()
    # no database URL: the embedded server in data_dir; no upstream: the built-in simulator
    server = Server(CODEPLAN + ["run"], base_env(CODEPLAN_DATA_DIR=str(data_dir), CODEPLAN_PORT=str(port)),
                    port, "/healthz")
    started.append(server)
    try:
        return server.start()
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; its output:\n{server.output()[-3000:]}") from None


@pytest.fixture
def started():
    """Every `codeplan run` a test starts, stopped at its end whatever happened."""
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def data_dir(started):
    # not pytest's tmp_path: concurrent pytest sessions of the same user prune each other's
    # base temp folders, and a data folder vanishing under a running server fails the test
    folder = Path(tempfile.mkdtemp(prefix="codeplan-test-orphan-"))
    yield folder
    for server in started:
        server.stop()
    try:  # whatever a failed test left running
        process = postmaster(folder)
        process.terminate()
        process.wait(10)
    except (OSError, ValueError, psutil.Error):
        pass
    shutil.rmtree(folder, ignore_errors=True)


def test_a_start_after_a_sigkill_takes_the_orphan_over_and_stops_it_on_exit(data_dir, started):
    first = codeplan_run(data_dir, started)
    server = postmaster(data_dir)
    first.kill()  # SIGKILL: no atexit, no cleanup
    time.sleep(0.5)
    assert server.is_running(), "the embedded server died with its owner: nothing to test"
    dead = json.loads((data_dir / "pgdata" / ".handle_pids.json").read_text())
    assert dead == [first.process.pid]

    second = codeplan_run(data_dir, started)
    assert postmaster(data_dir).pid == server.pid  # joined, not a second server
    assert "taken over" in second.output()
    assert json.loads((data_dir / "pgdata" / ".handle_pids.json").read_text()) == [second.process.pid]
    second.stop()  # SIGTERM: a graceful exit
    assert stopped(server), "the orphaned server outlived the process that took it over"


def test_a_one_shot_command_after_a_sigkill_stops_the_orphan(data_dir, started):
    first = codeplan_run(data_dir, started)
    server = postmaster(data_dir)
    first.kill()
    time.sleep(0.5)
    assert server.is_running()
    done = subprocess.run(CODEPLAN + ["migrate"], env=base_env(CODEPLAN_DATA_DIR=str(data_dir)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert stopped(server)


def test_a_live_owner_keeps_the_server_when_a_one_shot_command_exits(data_dir, started):
    running = codeplan_run(data_dir, started)
    try:
        server = postmaster(data_dir)
        done = subprocess.run(CODEPLAN + ["migrate"], env=base_env(CODEPLAN_DATA_DIR=str(data_dir)),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        time.sleep(0.5)
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    finally:
        running.stop()
    assert stopped(server)


def test_a_stale_postmaster_pid_naming_another_program_is_cleared(data_dir, started):
    first = codeplan_run(data_dir, started)
    lock = (data_dir / "pgdata" / "postmaster.pid").read_text()
    first.stop()
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        # as after a reboot: the old lock file, its pid now someone else's
        (data_dir / "pgdata" / "postmaster.pid").write_text(f"{stranger.pid}\n" + lock.split("\n", 1)[1])
        second = codeplan_run(data_dir, started)
        assert postmaster(data_dir).pid != stranger.pid
        second.stop()
    finally:
        stranger.kill()
        stranger.wait()
