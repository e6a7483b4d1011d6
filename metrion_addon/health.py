"""Whether this instance can meter right now, as a load balancer asks it: GET /metrion/health.

A pure function of what the writer and the shared limits report; 503 when a request would be refused for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any


@dataclass(frozen=True)
class Health:
    status: int  # 200 or 503
    body: dict[str, Any]


def metrion_version() -> str:
    try:
        return version("metrion")
    except PackageNotFoundError:
        return "unknown"


def health(*, writer_error: str | None, backlog: int, database: str, redis_error: str | bool | None,
           redis_closed: bool, version: str, spool_rows: int = 0, spool_bytes: int = 0) -> Health:
    """`redis_error`: False when no Redis is configured, None while it answers, else why not.

    `redis_closed`: whether losing Redis refuses requests (`on_failure: closed`) rather than serving a share.
    """
    redis = "not configured" if redis_error is False else "ok" if redis_error is None else f"unreachable: {redis_error}"
    can_meter = writer_error is None and not (redis_error not in (False, None) and redis_closed)
    body = {
        "status": "ok" if can_meter else "unavailable",
        "writer": "ok" if writer_error is None else f"failing: {writer_error}",
        "database": database,
        "redis": redis,
        "version": version,
        "backlog": backlog,
        "spool": {"rows": spool_rows, "bytes": spool_bytes},  # rows waiting for an unreachable PostgreSQL
    }
    return Health(200 if can_meter else 503, body)
