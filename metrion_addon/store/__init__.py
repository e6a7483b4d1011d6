"""The request log and limit counters: what is stored (records), where (a backend) and who writes it (Writer).

Callers import from here; a backend module (sqlite.py today) is chosen once, in the addon's configure.
"""

from .records import COLUMNS, BucketState, CacheEntry, CacheTouch, CacheWrite, Counter, MonthlyCount, RequestRecord
from .sqlite import SQLiteBackend, connect, create_schema, load_counters
from .writer import Backend, Pricer, Writer

__all__ = [
    "COLUMNS",
    "Backend",
    "BucketState",
    "CacheEntry",
    "CacheTouch",
    "CacheWrite",
    "Counter",
    "MonthlyCount",
    "Pricer",
    "RequestRecord",
    "SQLiteBackend",
    "Writer",
    "connect",
    "create_schema",
    "load_counters",
]
