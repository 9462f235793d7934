"""What every fault test checks of the ledger afterwards."""
from __future__ import annotations

from ..conftest import query, run


def key_rows(database: str, key: str) -> list:
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at", key[:10]))


def assert_ledger_consistent(database: str) -> None:
    """Nothing pending; every window's posted is the sum of what its rows billed (a row settled
    twice would count twice), nothing left reserved or held, no window over its allowance."""
    assert run(query(database, "SELECT count(*) AS n FROM usage_ledger WHERE state = 'pending'"))[0]["n"] == 0
    # the fault tests use plain plans: no top-up or overage window takes a share of a row
    assert run(query(database, "SELECT count(*) AS n FROM usage_ledger WHERE extra_window_id IS NOT NULL"))[0]["n"] == 0
    windows = run(query(database, """
        SELECT w.id, w.allowance, w.posted, w.reserved, w.held,
               (SELECT coalesce(sum(l.billed_tokens), 0) FROM usage_ledger l
                 WHERE w.id IN (l.window_id, l.week_window_id) AND l.state <> 'pending') AS billed
          FROM quota_windows w"""))
    assert windows
    wrong = [dict(w) for w in windows
             if (w["posted"], w["reserved"], w["held"]) != (w["billed"], 0, 0) or w["posted"] > w["allowance"]]
    assert wrong == [], wrong
