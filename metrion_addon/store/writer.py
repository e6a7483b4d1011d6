"""The one writer thread: rows and counters arrive through a queue and go to a Backend in small transactions.

It never dies and never lies: a bad row is isolated into a dead letter, an outage keeps a bounded backlog.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from .records import (
    AlertEvent,
    BucketState,
    BudgetState,
    CacheTouch,
    CacheWrite,
    Counter,
    DeadLetter,
    MonthlyCount,
    RequestRecord,
    storable,
    uuid7,
)

log = logging.getLogger(__name__)

Pricer = Callable[[RequestRecord], tuple[float | None, str | None]]
Settler = Callable[[RequestRecord], BudgetState | None]
_CLOSE = object()


@dataclass(frozen=True)
class _OnDisk:
    """A counter whose caller waits until it is committed (`put_durable`)."""

    item: Counter
    done: Future[None]
BACKLOG_ROWS = 100_000  # rows held in memory while the database fails (about 1 KB each)
CHUNK_ROWS = 500  # rows per transaction: a recovering database never needs room for the whole backlog at once


class Backend(Protocol):
    """Where the writer puts rows: SQLite today (sqlite.py); another database implements the same three calls."""

    def write(self, records: Sequence[RequestRecord], counters: Sequence[Counter],
              dead_letters: Sequence[DeadLetter] = ()) -> None:
        """Store rows, latest counter values and dead letters in one transaction, or nothing (and raise)."""

    def is_outage(self, error: Exception) -> bool:
        """True when `error` says the database as a whole fails (full, locked, gone), not one of the rows."""

    def idle(self) -> bool:
        """Nothing to write for a while: catch up on the backend's own work (replay a spool); True if more is left."""

    def close(self) -> None:
        """Release the connection; called once, after the writer's thread stopped."""


class Writer:
    """Owns the backend on its own thread; callers only ever put items on a queue.

    `healthy` means rows are being written now: no write is failing, and none has waited on a stuck write
    for more than `stall_seconds`. While unhealthy, rows of requests that were never forwarded are counted
    (`rejected_while_failing`), not kept; the backlog holds up to `backlog_rows` other rows, and rows of
    forwarded requests are kept even past that (no request is forwarded while the writer is unhealthy).
    """

    def __init__(
        self,
        backend: Backend,
        price: Pricer | None = None,
        on_written: Callable[[list[RequestRecord]], None] | None = None,
        retry_seconds: float = 1.0,
        batch_seconds: float = 0.05,
        settle: Settler | None = None,
        settles_now: Callable[[RequestRecord], bool] | None = None,
        stall_seconds: float = 10.0,
        backlog_rows: int = BACKLOG_ROWS,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self._backend = backend
        self._price = price
        self._settle = settle  # a priced row's budget settlement, written in the same transaction as the row
        # Rows whose budget reservation waits for them: taken (priced, settled) at once, not at the end of the batch
        # window, so a finished request's reservation does not hold back budget for up to `batch_seconds`.
        self._settles_now = settles_now
        self._arrived = threading.Event()
        self._committing: list[Future[None]] = []  # callers of put_durable waiting for the next commit
        self._on_written = on_written
        self._retry_seconds = retry_seconds
        self._batch_seconds = batch_seconds  # gather rows this long: fewer wake-ups and commits under load
        self._stall_seconds = stall_seconds
        self._backlog_rows = backlog_rows
        self._chunk_rows = chunk_rows
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-writer", daemon=True)
        # Owned by the writer thread; read (never written) by others.
        self._backlog: deque[RequestRecord] = deque()
        self._counters: dict[tuple[type, str, str], Counter] = {}
        self._dead: list[DeadLetter] = []
        self._closing = False
        self._busy_since: float | None = None  # when the write in progress started
        self.error: str | None = None  # why writes fail now; None while they succeed
        self.dropped = 0  # rows of unforwarded requests dropped because the backlog was full
        self.dead_letters = 0  # rows the database refused, stored as dead letters
        self.rejected_while_failing = 0  # requests refused while unhealthy: counted, no row (event loop only)

    @property
    def trouble(self) -> str | None:
        """Why rows are not being written now, or None when they are."""
        if self.error is not None:
            return f"database write failed: {self.error}"
        if not self._thread.is_alive():
            return "the database writer is not running"
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self._stall_seconds:
            return f"a database write has been stuck for more than {self._stall_seconds:g} s"
        return None

    @property
    def healthy(self) -> bool:
        return self.trouble is None

    def reprice(self, price: Pricer) -> None:
        """Price the rows of later batches with `price` (a reloaded config's prices)."""
        self._price = price

    @property
    def backlog(self) -> int:
        """Items not written yet: queued, plus the rows waiting in the writer (during an outage, say)."""
        return self._queue.qsize() + len(self._backlog)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: RequestRecord | Counter) -> None:
        if isinstance(item, RequestRecord) and not item.forwarded and self.error is not None:
            self.rejected_while_failing += 1
            return
        self._queue.put(item)
        if self._settles_now is not None and isinstance(item, RequestRecord) and self._settles_now(item):
            self._arrived.set()

    def put_durable(self, item: Counter) -> Future[None]:
        """Queue `item` and commit it at once (with whatever else is queued); the future is done once it is on disk.

        For a budget reservation that must survive a crash of the process once its request reached the provider.
        While the database fails the future stays pending: the caller decides how long to wait.
        """
        done: Future[None] = Future()
        self._queue.put(_OnDisk(item, done))
        self._arrived.set()
        return done

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued so far, then stop the thread and close the connection."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("metrion: the database writer did not finish within %.0f s; %s", timeout, self._unwritten())
                return
        self._backend.close()

    # the writer thread

    def _run(self) -> None:
        while True:
            try:
                self._serve()
                return
            except Exception as e:  # a bug in the writer itself: say so (503s) and serve again with the same backlog
                log.exception("metrion: the database writer failed; restarting it")
                self.error = f"the database writer failed: {type(e).__name__}: {e}"
                self._busy_since = None
                self._wait(self._retry_seconds)

    def _serve(self) -> None:
        while True:
            if not self._pending():
                if self._closing:
                    return
                self._take(self._next())
                self._window(self._batch_seconds)
            self._drain()  # whatever else is waiting: that is the batch
            if self._flush():
                continue
            if self._closing:
                log.error("metrion: stopping while the database fails (%s): %s", self.error, self._unwritten())
                return
            self._wait(self._retry_seconds)

    def _next(self) -> object:
        """The next item; while none comes, the backend catches up on its own work."""
        while True:
            try:
                return self._queue.get(timeout=self._retry_seconds)
            except queue.Empty:
                pass
            self._busy_since = time.monotonic()
            try:
                while self._backend.idle() and self._queue.empty():
                    self._busy_since = time.monotonic()
            finally:
                self._busy_since = None

    def _window(self, seconds: float) -> None:
        """Let a batch gather for `seconds`: take what arrives early only when a row's budget waits for it, and end
        the window at once when a caller waits for a commit (`put_durable`)."""
        deadline = time.monotonic() + seconds
        while not self._closing and not self._committing and (left := deadline - time.monotonic()) > 0:
            if not self._arrived.wait(left):
                return
            self._arrived.clear()
            self._drain()

    def _drain(self) -> None:
        while not self._closing:
            try:
                self._take(self._queue.get_nowait())
            except queue.Empty:
                return

    def _pending(self) -> bool:
        return bool(self._backlog or self._counters or self._dead)

    def _wait(self, seconds: float) -> None:
        """Sleep between retries, still taking items from the queue, and waking at once for close()."""
        deadline = time.monotonic() + seconds
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            try:
                self._take(self._queue.get(timeout=left))
            except queue.Empty:
                return

    def _take(self, item: object) -> None:
        if item is _CLOSE:
            self._closing = True
        elif isinstance(item, _OnDisk):
            self._take(item.item)
            self._committing.append(item.done)
        elif isinstance(item, RequestRecord):
            if not item.forwarded and len(self._backlog) >= self._backlog_rows:
                self.dropped += 1
                return
            try:
                record = storable(item)
            except Exception as e:  # keep the row as it came rather than lose it
                self._dead_letter(item, e)
                return
            if record.uid is None:
                record.uid = uuid7()
            if self._price and record.price_source is None:
                try:
                    record.cost_usd, record.price_source = self._price(record)
                except Exception:  # stored unpriced (cost_usd NULL): an unknown cost beats a lost row
                    log.exception("metrion: could not price a row; stored without cost")
            if self._settle:  # once per row; with a normal backlog the settlement rides in the row's transaction
                try:
                    if (state := self._settle(record)) is not None:
                        _keep_latest(self._counters, state)
                except Exception:
                    log.exception("metrion: could not settle a row's budget")
            self._backlog.append(record)
        elif isinstance(item, BucketState):
            self._counters[(BucketState, item.token_name, "")] = item
        elif isinstance(item, MonthlyCount):
            self._counters[(MonthlyCount, item.token_name, item.month)] = item
        elif isinstance(item, BudgetState):
            _keep_latest(self._counters, item)
        elif isinstance(item, AlertEvent):  # events are inserted, never merged: each gets a key of its own
            self._counters[(AlertEvent, str(id(item)), item.ts)] = item
        elif isinstance(item, CacheWrite):
            self._counters[(CacheWrite, item.entry.key, "")] = item
        elif isinstance(item, CacheTouch):
            self._counters[(CacheTouch, item.key, "")] = item

    def _flush(self) -> bool:
        """Write the backlog in chunks; False when the database fails (what is left stays queued)."""
        while self._pending():
            if not self._write_chunk([self._backlog[i] for i in range(min(self._chunk_rows, len(self._backlog)))]):
                return False
        return True

    def _write_chunk(self, records: list[RequestRecord]) -> bool:
        try:
            self._transaction(records, list(self._counters.values()), list(self._dead))
        except Exception as e:
            if records and not self._backend.is_outage(e):
                return self._isolate(records)
            return self._failing(e)
        self._written(records)
        return True

    def _isolate(self, records: list[RequestRecord]) -> bool:
        """Counters and dead letters alone, then each row alone; a row refused alone becomes a dead letter."""
        try:
            self._transaction([], list(self._counters.values()), list(self._dead))
        except Exception as e:  # nothing row-specific in this one: the database fails
            return self._failing(e)
        for record in records:
            try:
                self._transaction([record], [], [])
            except Exception as e:
                if self._backend.is_outage(e):
                    return self._failing(e)
                self._backlog.popleft()
                self._dead_letter(record, e)
                continue
            self._written([record])
        return True

    def _transaction(self, records: list[RequestRecord], counters: list[Counter], dead: list[DeadLetter]) -> None:
        self._busy_since = time.monotonic()
        try:
            self._backend.write(records, counters, dead)
        finally:
            self._busy_since = None
        if counters:
            self._counters.clear()
            for done in self._committing:  # every one of them was among these counters
                if done.set_running_or_notify_cancel():  # False: the caller gave up waiting
                    done.set_result(None)
            self._committing.clear()
        del self._dead[: len(dead)]
        self._recovered(len(records))

    def _dead_letter(self, record: RequestRecord, error: Exception) -> None:
        log.error("metrion: the database refused a row (%s: %s); kept in dead_letters", type(error).__name__, error)
        self._dead.append(DeadLetter.of(record, error))
        self.dead_letters += 1

    def _written(self, records: list[RequestRecord]) -> None:
        for _ in records:
            self._backlog.popleft()
        if self._on_written and records:
            try:
                self._on_written(records)
            except Exception:  # only a UI annotation: the rows are safe
                log.exception("metrion: showing written rows failed")

    def _failing(self, error: Exception) -> bool:
        if self.error is None:
            log.error("metrion: database write failed, will retry and answer 503 meanwhile: %s", error)
        self.error = str(error) or type(error).__name__
        return False

    def _recovered(self, written: int) -> None:
        if self.error is None:
            return
        self.error = None
        log.warning("metrion: database writes work again (%d rows waiting, %d written in this first transaction); "
                    "%d requests were answered 503 meanwhile and left no row", len(self._backlog), written,
                    self.rejected_while_failing)

    def _unwritten(self) -> str:
        forwarded = sum(1 for record in self._backlog if record.forwarded)
        return (f"{len(self._backlog)} request rows ({forwarded} of forwarded requests), {len(self._counters)} "
                f"counter updates and {len(self._dead)} dead letters could not be written; "
                f"{self.dropped} unforwarded rows were dropped past the backlog limit and "
                f"{self.rejected_while_failing} requests refused while failing left no row")


def _keep_latest(counters: dict, state: BudgetState) -> None:
    """Budget snapshots come from two threads: the newest version wins, whichever arrived last."""
    key = (BudgetState, state.token_name, state.month)
    if (known := counters.get(key)) is None or known.version < state.version:
        counters[key] = state
