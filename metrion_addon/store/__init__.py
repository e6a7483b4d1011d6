"""The request log and limit counters: what is stored (records), where (a backend) and who writes it (Writer).

Callers import from here; a backend module (sqlite.py today) is chosen once, in the addon's configure.
"""

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
    "MonthlyCount",
    "Ownership",
    "Pricer",
    "RequestRecord",
    "SQLiteBackend",
    "Settler",
    "Writer",
    "claim",
    "connect",
    "create_schema",
    "insert_alert_event",
    "latest_alerts",
    "load_alert_history",
    "load_budgets",
    "load_counters",
    "storable",
]
