"""The request log and limit counters: what is stored (records), where (a backend) and who writes it (Writer).

Callers import from here; the backend (sqlite.py or postgres.py) is chosen once, by database.py's open_log.
"""

from .database import Error, Log, Unavailable, has_table, open_log, read_only, shown, writable
from .owner import DatabaseInUse, Ownership, claim
from .records import (
    COLUMNS,
    AlertEvent,
    BucketState,
    BudgetState,
    CacheEntry,
    CacheTouch,
    CacheWrite,
    Counter,
    DeadLetter,
    MonthlyCount,
    RequestRecord,
    storable,
)
from .sqlite import (
    SQLiteBackend,
    connect,
    create_schema,
    insert_alert_event,
    latest_alerts,
    load_alert_history,
    load_budgets,
    load_counters,
)
from .writer import Backend, Pricer, Settler, Writer

__all__ = [
    "COLUMNS",
    "AlertEvent",
    "Backend",
    "BucketState",
    "BudgetState",
    "CacheEntry",
    "CacheTouch",
    "CacheWrite",
    "Counter",
    "DatabaseInUse",
    "DeadLetter",
    "Error",
    "Log",
    "MonthlyCount",
    "Ownership",
    "Pricer",
    "RequestRecord",
    "SQLiteBackend",
    "Settler",
    "Unavailable",
    "Writer",
    "claim",
    "connect",
    "create_schema",
    "has_table",
    "insert_alert_event",
    "latest_alerts",
    "load_alert_history",
    "load_budgets",
    "load_counters",
    "open_log",
    "read_only",
    "shown",
    "storable",
    "writable",
]
