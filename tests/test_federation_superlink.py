"""python -m federation.superlink: the SQLite connections Flower's SuperLink opens wait as long as
asked for a lock, the other pragmas stay Flower's, its HTTP server stops within the grace it is
given, and its own options never reach Flower. Its SuperExec watchdog runs against a real
SuperLink in tests/test_launcher.py."""

import sqlite3

import pytest

from federation.superlink import DEFAULT_BUSY_TIMEOUT_S, _busy_timeout, _seconds, bound_shutdown, set_busy_timeout


def _pragmas_of_a_new_connection() -> dict[str, int | str]:
    import flwr.supercore.sql_mixin as sql

    conn = sqlite3.connect(":memory:")
    sql._set_sqlite_pragmas(conn, None)  # what Flower runs on every connection it opens
    return {
        name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("busy_timeout", "foreign_keys", "cache_size")
    }


def test_connections_wait_as_long_as_asked_and_keep_flowers_other_pragmas():
    import flwr.supercore.sql_mixin as sql

    original = sql.SQLITE_PRAGMAS
    try:
        assert _pragmas_of_a_new_connection()["busy_timeout"] == 5000  # Flower 1.42's own wait
        set_busy_timeout(120)
        assert _pragmas_of_a_new_connection() == {"busy_timeout": 120_000, "foreign_keys": 1, "cache_size": -64000}
    finally:
        sql.SQLITE_PRAGMAS = original


def test_the_option_is_taken_out_of_flowers_arguments():
    assert _busy_timeout(["--port", "8000", "--busy-timeout-s", "30", "--insecure"]) == (
        30.0,
        ["--port", "8000", "--insecure"],
    )
    assert _busy_timeout(["--insecure"]) == (DEFAULT_BUSY_TIMEOUT_S, ["--insecure"])
    with pytest.raises(SystemExit, match="must be > 0"):
        _busy_timeout(["--busy-timeout-s", "0"])


def test_the_http_server_is_told_how_long_to_wait_for_open_connections_on_stop(monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))  # the server itself is not run here
    bound_shutdown(7.5)
    uvicorn.run(app=None, port=1)
    assert seen == {"app": None, "port": 1, "timeout_graceful_shutdown": 7.5}
    uvicorn.run(app=None, timeout_graceful_shutdown=2)  # an explicit value stays
    assert seen["timeout_graceful_shutdown"] == 2
    assert _seconds(["--shutdown-grace-s=3", "--insecure"], "--shutdown-grace-s", 10) == (3.0, ["--insecure"])
    with pytest.raises(SystemExit, match="--shutdown-grace-s must be > 0"):
        _seconds(["--shutdown-grace-s", "-1"], "--shutdown-grace-s", 10)
