"""The one writer thread: rows and counters arrive through a queue and go to a Backend in batches.

The event loop never waits on storage; a failed write keeps its rows and retries, and close() flushes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .records import AlertEvent, BucketState, BudgetState, CacheTouch, CacheWrite, Counter, MonthlyCount, RequestRecord

log = logging.getLogger(__name__)

Pricer = Callable[[RequestRecord], tuple[float | None, str | None]]
Settler = Callable[[RequestRecord], BudgetState | None]
_CLOSE = object()


class Backend(Protocol):
    """Where the writer puts rows: SQLite today (sqlite.py); another database implements the same two calls."""

    def write(self, records: Sequence[RequestRecord], counters: Sequence[Counter]) -> None:
        """Store the rows and the latest counter values in one transaction, or nothing (and raise)."""

    def close(self) -> None:
        """Release the connection; called once, on the writer's thread or after it stopped."""


class Writer:
    """Owns the backend on its own thread; rows arrive through a queue and are written in batches."""

    def __init__(
        self,
        backend: Backend,
        price: Pricer | None = None,
        on_written: Callable[[list[RequestRecord]], None] | None = None,
        retry_seconds: float = 1.0,
        batch_seconds: float = 0.05,
        settle: Settler | None = None,
    ) -> None:
        self._backend = backend
        self._price = price
        self._settle = settle  # a priced row's budget settlement, written in the same transaction as the row
        self._on_written = on_written
        self._retry_seconds = retry_seconds
        self._batch_seconds = batch_seconds  # gather rows this long: fewer wake-ups and commits under load
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-writer", daemon=True)
        self.error: str | None = None  # the last write error, None while writes succeed
        self._held = 0  # rows of the batch being retried

    @property
    def healthy(self) -> bool:
        return self.error is None

    def reprice(self, price: Pricer) -> None:
        """Price the rows of later batches with `price` (a reloaded config's prices)."""
        self._price = price

    @property
    def backlog(self) -> int:
        """Items not written yet: queued, plus the rows of a batch waiting to be retried."""
        return self._queue.qsize() + self._held

    def start(self) -> None:
        self._thread.start()

    def put(self, item: RequestRecord | Counter) -> None:
        self._queue.put(item)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued so far, then stop the thread and close the connection."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("metrion: the database writer did not finish within %.0f s", timeout)
                return
        self._backend.close()

    def _run(self) -> None:
        records: list[RequestRecord] = []
        counters: dict[tuple[type, str, str], Counter] = {}
        closing = False
        while True:
            if not records and not counters and not closing:
                closing = self._take(self._queue.get(), records, counters)
                if not closing:
                    time.sleep(self._batch_seconds)
            while not closing:  # drain whatever else is waiting: that is the batch
                try:
                    closing = self._take(self._queue.get_nowait(), records, counters)
                except queue.Empty:
                    break
            if records or counters:
                if self._write(records, counters):
                    records, counters = [], {}
                elif closing:
                    log.error("metrion: %d request rows could not be written: %s", len(records), self.error)
                    return
                else:
                    time.sleep(self._retry_seconds)
                    continue
            if closing:
                return

    @staticmethod
    def _take(item: object, records: list[RequestRecord], counters: dict) -> bool:
        if item is _CLOSE:
            return True
        if isinstance(item, RequestRecord):
            records.append(item)
        elif isinstance(item, BucketState):
            counters[(BucketState, item.token_name, "")] = item
        elif isinstance(item, MonthlyCount):
            counters[(MonthlyCount, item.token_name, item.month)] = item
        elif isinstance(item, BudgetState):
            _keep_latest(counters, item)
        elif isinstance(item, AlertEvent):  # events are inserted, never merged: each gets a key of its own
            counters[(AlertEvent, str(id(item)), item.ts)] = item
        elif isinstance(item, CacheWrite):
            counters[(CacheWrite, item.entry.key, "")] = item
        elif isinstance(item, CacheTouch):
            counters[(CacheTouch, item.key, "")] = item
        return False

    def _write(self, records: list[RequestRecord], counters: dict[tuple[type, str, str], Counter]) -> bool:
        for record in records:
            if self._price and record.price_source is None:
                record.cost_usd, record.price_source = self._price(record)
            if self._settle and (state := self._settle(record)) is not None:
                _keep_latest(counters, state)
        try:
            self._backend.write(records, list(counters.values()))
        except Exception as e:  # any backend's error: keep the batch and retry
            if self.error is None:
                log.error("metrion: database write failed, will retry: %s", e)
            self.error = str(e)
            self._held = len(records)
            return False
        self._held = 0
        if self.error is not None:
            log.warning("metrion: database writes work again")
        self.error = None
        if self._on_written and records:
            self._on_written(records)
        return True


def _keep_latest(counters: dict, state: BudgetState) -> None:
    """Budget snapshots come from two threads: the newest version wins, whichever arrived last."""
    key = (BudgetState, state.token_name, state.month)
    if (known := counters.get(key)) is None or known.version < state.version:
        counters[key] = state
