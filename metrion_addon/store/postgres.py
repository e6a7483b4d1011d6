"""The PostgreSQL backend: SQLite's schema in PostgreSQL's types, and one transaction per batch of rows.

`Connection` takes the SQLite dialect's `?` and `:name` placeholders, so the one query layer runs on both databases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg.adapt import Loader
from psycopg.types.string import TextLoader

from metrion_addon import aggregates

from .records import COLUMNS, REQUIRED, AlertEvent, Counter, DeadLetter, RequestRecord
from .sqlite import write_counters

_SCHEMA_LOCK = 0x6D6574726F6E  # "metron": instances starting together create the schema one after the other
_TYPES = {"int": "BIGINT", "float": "DOUBLE PRECISION", "str": "TEXT", "bool": "BIGINT"}
# A connection that hangs (a cut network) fails within seconds instead of holding the writer; a batch takes well
# under a second, so a writer's statement still running after 5 s means trouble (its batch goes to the spool),
# while the dashboard's and the CLI's reads over long periods get a minute.
_CONNECT = {"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 2, "tcp_user_timeout": 10_000}
_WRITING = "-c statement_timeout=5000"
_READING = "-c statement_timeout=60000 -c default_transaction_read_only=on"
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|(?<!:):(\w+)|%")


def shown(url: str) -> str:
    """`url` without its password, for logs and messages."""
    return re.sub(r"(password=)[^&\s]*", r"\1***", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite-dialect SQL with psycopg's placeholders: `?` is `%s`, `:name` is `%(name)s`, a literal `%` is `%%`."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text.startswith("'"):
            return text.replace("%", "%%")
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        return f"%({match.group(1)})s"

    return _TOKEN.sub(replace, sql)


def _value(value: Any) -> Any:
    if type(value) is bool:  # stored as 0/1, as SQLite does, so that queries read them alike
        return int(value)
    if type(value) is str and "\x00" in value:  # the one character PostgreSQL text cannot hold
        return value.replace("\x00", "\ufffd")
    return value


def _values(params: Any) -> Any:
    if isinstance(params, dict):
        return {name: _value(value) for name, value in params.items()}
    return [_value(value) for value in params]


class _Numeric(Loader):
    """sum() over BIGINT is NUMERIC in PostgreSQL: read whole numbers as int and others as float, as SQLite gives."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return int(text) if text.lstrip("-").isdigit() else float(text)


class Connection:
    """A psycopg connection (autocommit; `transaction()` for more) that speaks the SQLite dialect's placeholders."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection) -> None:
        self.raw = raw
        raw.adapters.register_loader("numeric", _Numeric)
        raw.adapters.register_loader("uuid", TextLoader)  # `uid` reads back as the text SQLite holds

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor:
        return self.raw.execute(translate(sql), _values(params))

    def executemany(self, sql: str, rows: Iterable[Any]) -> None:
        with self.raw.cursor() as cursor:
            cursor.executemany(translate(sql), [_values(row) for row in rows])

    def transaction(self) -> Any:
        return self.raw.transaction()

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # autocommit: each statement is its own transaction, as sqlite3's `with conn` commits


def connect(url: str, read_only: bool = False) -> Connection:
    return Connection(psycopg.connect(url, autocommit=True, options=_READING if read_only else _WRITING, **_CONNECT))


def _column_type(name: str, annotation: object) -> str:
    if name == "uid":
        return "UUID"
    return _TYPES[str(annotation).split(" ")[0]]


_FIELDS = {field.name: field.type for field in dataclasses.fields(RequestRecord)}


def create_schema(conn: Connection) -> None:
    """Create the tables and indexes if they are missing (idempotent, and safe while other instances do it too)."""
    columns = ", ".join(f"{name} {_column_type(name, _FIELDS[name])}{' NOT NULL' if name in REQUIRED else ''}"
                        for name in COLUMNS)
    alert_columns = ", ".join(f"{field.name} {_TYPES[str(field.type).split(' ')[0]]}"
                              f"{' NOT NULL' if field.name in ('ts', 'rule', 'level', 'channel') else ''}"
                              for field in dataclasses.fields(AlertEvent))
    statements = [
        f"CREATE TABLE IF NOT EXISTS requests (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, {columns})",
        *(f"ALTER TABLE requests ADD COLUMN IF NOT EXISTS {name} {_column_type(name, _FIELDS[name])}"
          for name in COLUMNS),
        *(f"CREATE INDEX IF NOT EXISTS idx_requests_{'_'.join(index)} ON requests ({', '.join(index)})"
          for index in (["ts"], ["token_name", "ts"], ["provider", "ts"], ["model", "ts"], ["requested_model", "ts"],
                        ["requester", "ts"])),
        "CREATE UNIQUE INDEX IF NOT EXISTS idx_requests_uid ON requests (uid)",
        "CREATE TABLE IF NOT EXISTS rate_buckets (token_name TEXT PRIMARY KEY, tokens DOUBLE PRECISION, "
        "updated_at DOUBLE PRECISION)",
        "CREATE TABLE IF NOT EXISTS monthly_usage (token_name TEXT, month TEXT, requests BIGINT, "
        "PRIMARY KEY (token_name, month))",
        "CREATE TABLE IF NOT EXISTS budget_usage (token_name TEXT, month TEXT, spent_nanousd BIGINT, "
        "reserved_nanousd BIGINT, version BIGINT, PRIMARY KEY (token_name, month))",
        f"CREATE TABLE IF NOT EXISTS alert_events (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
        f"{alert_columns})",
        "CREATE INDEX IF NOT EXISTS idx_alert_events_rule_ts ON alert_events (rule, ts)",
        "CREATE TABLE IF NOT EXISTS dead_letters (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
        "ts TEXT, error TEXT, row TEXT)",
        *aggregates.table_definitions(integer="BIGINT", clustered=""),
        # The response cache is on Redis with PostgreSQL (shared.redis is required); the table is here, empty, so
        # that the schema is SQLite's and `metrion cache stats` reads both alike.
        "CREATE TABLE IF NOT EXISTS cache_entries (key TEXT PRIMARY KEY, token_name TEXT NOT NULL, "
        "provider TEXT NOT NULL, model TEXT, status BIGINT NOT NULL, headers TEXT NOT NULL, body BYTEA NOT NULL, "
        "stream BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
        "last_used DOUBLE PRECISION NOT NULL, size BIGINT NOT NULL, cost_usd DOUBLE PRECISION)",
    ]
    with conn.transaction():
        conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in statements:
            conn.raw.execute(statement)


_NAMES = ", ".join(COLUMNS)
# Rows arrive by COPY (a fifth of a multi-row INSERT's time) into a temporary table emptied at each commit, and go on
# from there in one statement that skips uids already stored and says which rows it inserted; `arrival` keeps their
# order, so ids follow it as in SQLite.
_INCOMING = (f"CREATE TEMP TABLE IF NOT EXISTS incoming ON COMMIT DELETE ROWS AS SELECT 0 AS arrival, {_NAMES}"
             " FROM requests WITH NO DATA")
_COPY = f"COPY incoming (arrival, {_NAMES}) FROM STDIN"
_MOVE = (f"INSERT INTO requests ({_NAMES}) SELECT {_NAMES} FROM incoming ORDER BY arrival"
         " ON CONFLICT (uid) DO NOTHING RETURNING uid")


class PostgresBackend:
    """Writes batches over one connection, owned by the writer thread; reconnects after an outage.

    A row whose `uid` is already stored is skipped, and only the rows actually inserted reach the aggregates:
    writing a batch twice (a retry after a lost commit acknowledgement, a replayed spool) counts it once.
    """

    def __init__(self, url: str, conn: Connection | None = None) -> None:
        self._url = url
        self._conn = conn
        self._prepared: Connection | None = None  # the connection whose session has the `incoming` table

    def write(self, records: Sequence[RequestRecord], counters: Sequence[Counter],
              dead_letters: Sequence[DeadLetter] = ()) -> None:
        if self._conn is None or self._conn.broken:
            self._reconnect()
        conn = self._conn
        assert conn is not None
        try:
            if self._prepared is not conn:  # outside the transaction: one made in it would die with its rollback
                conn.raw.execute(_INCOMING)
                self._prepared = conn
            with conn.transaction():
                inserted = self._insert(conn, records)
                aggregates.add_to_hourly(conn, inserted)  # type: ignore[arg-type]
                # The response cache is never here: with PostgreSQL it lives on Redis (shared.redis is required).
                write_counters(conn, counters, dead_letters)  # type: ignore[arg-type]
        except Exception as e:
            if self.is_outage(e):
                self._drop()
            raise

    @staticmethod
    def _insert(conn: Connection, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        if not records:
            return []
        with conn.raw.cursor() as cursor:
            with cursor.copy(_COPY) as copy:
                for arrival, record in enumerate(records):
                    copy.write_row([arrival, *(_value(getattr(record, name)) for name in COLUMNS)])
            new = {str(uid) for (uid,) in cursor.execute(_MOVE)}
        return [record for record in records if record.uid is None or record.uid in new]

    def is_outage(self, error: Exception) -> bool:
        # OperationalError: the server is gone, shutting down, out of disk, or a statement timed out;
        # InterfaceError: the connection is closed. A DataError or IntegrityError belongs to one row.
        return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)

    def idle(self) -> bool:
        return False

    def _reconnect(self) -> None:
        self._drop()
        self._conn = connect(self._url)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop()
