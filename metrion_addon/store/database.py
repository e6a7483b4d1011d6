"""Which database holds the request log, decided once from `database:`: a SQLite file, or a PostgreSQL URL.

`open_log` gives the proxy its backend (and what it reads at start-up); `read_only` gives the CLI, the dashboard and
the alert monitor a connection the query layer reads, whichever database it is.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from . import postgres
from .spool import Spool, SpoolingBackend
from .sqlite import SQLiteBackend, connect, create_schema
from .writer import Backend

Error = (sqlite3.Error, psycopg.Error)  # what reading either database may raise


@dataclass
class Log:
    """The opened log: `conn` for start-up reads (counters, budgets, alert history), `backend` for the writer."""

    conn: Any
    backend: Backend

    @property
    def spool(self) -> Spool | None:
        return self.backend.spool if isinstance(self.backend, SpoolingBackend) else None

    def describe(self) -> str:
        """What /metrion/health says about the database."""
        if not isinstance(self.backend, SpoolingBackend):
            return "sqlite"
        if self.backend.outage is not None:
            return f"postgresql unreachable ({self.backend.outage}); rows spooled"
        return "postgresql"


def open_log(database: Path | str, spool_directory: Path, spool_bytes: int) -> Log:
    """Connect, create the schema if missing, and build the backend; raises OSError or the database's own error."""
    if isinstance(database, Path):
        conn = connect(database)
        create_schema(conn)
        return Log(conn, SQLiteBackend(conn))
    pg = postgres.connect(database)
    postgres.create_schema(pg)
    spool = Spool.claim(spool_directory, spool_bytes)
    return Log(pg, SpoolingBackend(postgres.PostgresBackend(database, pg), spool))


def shown(database: Path | str) -> str:
    """The database as messages and logs may show it: a PostgreSQL URL without its password."""
    return str(database) if isinstance(database, Path) else postgres.shown(database)


def writable(database: Path | str) -> Any:
    """A connection that writes (the CLI's own alert test notifications): autocommit on PostgreSQL."""
    return connect(database) if isinstance(database, Path) else postgres.connect(database)


class Unavailable(Exception):
    """The log cannot be read yet: no database, or the proxy has not created its tables."""


def read_only(database: Path | str, needed: tuple[str, ...] = ("requests",)) -> Any:
    """A read-only connection to the log; Unavailable when it or one of the `needed` tables does not exist."""
    if isinstance(database, Path):
        if not database.is_file():
            raise Unavailable(f"no database at {database} yet: start the proxy (it creates it)")
        conn: Any = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
    else:
        try:
            conn = postgres.connect(database, read_only=True)
        except psycopg.Error as e:
            raise Unavailable(f"cannot reach the database {shown(database)}: {str(e).strip()}") from e
    missing = [table for table in needed if not has_table(conn, table)]
    if missing:
        conn.close()
        raise Unavailable(f"{shown(database)} has no {', '.join(missing)} table yet: start the proxy once "
                          "(it creates them)")
    return conn


def has_table(conn: Any, name: str) -> bool:
    if isinstance(conn, sqlite3.Connection):
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    else:
        query = "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?"
    return conn.execute(query, (name,)).fetchone() is not None


def columns(conn: Any, table: str) -> set[str]:
    if isinstance(conn, sqlite3.Connection):
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    query = ("SELECT column_name FROM information_schema.columns"
             " WHERE table_schema = current_schema() AND table_name = ?")
    return {name for (name,) in conn.execute(query, (table,))}
