"""The local journal of a PostgreSQL log: batches that PostgreSQL could not take wait in a file until it is back.

Each batch is one JSON line, appended and fsynced before the writer moves on; replayed rows keep their uid, so a
batch replayed twice (a crash mid-replay) is stored once. One file per running instance, held with flock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .postgres import PostgresBackend
from .records import (
    COLUMNS,
    AlertEvent,
    BucketState,
    BudgetState,
    Counter,
    DeadLetter,
    MonthlyCount,
    RequestRecord,
)

log = logging.getLogger(__name__)

_KINDS: dict[str, type] = {kind.__name__: kind for kind in (BucketState, MonthlyCount, BudgetState, AlertEvent)}
SLOTS = 64  # instances on one host sharing one spool directory
_ORPHAN_SECONDS = 30.0  # how often an idle writer looks for journals that stopped instances left behind
_REPLAY_PER_WRITE = 4  # spooled batches replayed after each new one: the spool drains while traffic goes on


@dataclass(frozen=True)
class Batch:
    records: list[RequestRecord]
    counters: list[Counter]
    dead_letters: list[DeadLetter]


def encode(batch: Batch) -> bytes:
    document = {
        "rows": [[getattr(record, name) for name in COLUMNS] for record in batch.records],
        # cache writes and touches never reach a PostgreSQL writer: the cache is on Redis then
        "counters": [[type(c).__name__, dataclasses.astuple(c)] for c in batch.counters if type(c).__name__ in _KINDS],
        "dead": [[d.ts, d.error, d.row] for d in batch.dead_letters],
    }
    return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Batch:
    document = json.loads(line)
    return Batch(
        [RequestRecord(**dict(zip(COLUMNS, row, strict=True))) for row in document["rows"]],
        [_KINDS[kind](*values) for kind, values in document["counters"]],
        [DeadLetter(*values) for values in document["dead"]],
    )


class SpoolFull(Exception):
    """The journal has reached its size bound."""


class Spool:
    """An append-only journal file with a read position; emptied (truncated) once everything in it was replayed."""

    def __init__(self, path: Path, file: IO[bytes], max_bytes: int) -> None:
        """Use the journal at `path`, whose `file` this process holds (flock)."""
        self.max_bytes = max_bytes
        self.path, self._file = path, file
        self._position = 0  # bytes replayed so far
        self.rows = 0  # rows in the journal not replayed yet
        self._file.seek(0)
        whole = 0
        for line in self._file:
            if not line.endswith(b"\n"):  # cut short by a crash mid-append: never fsynced whole, never acknowledged
                break
            whole += len(line)
            try:
                self.rows += len(json.loads(line)["rows"])
            except (ValueError, KeyError, TypeError):  # replay stops there and says so (see next())
                log.error("metrion: unreadable line in the spool %s ending at byte %d", self.path, whole)
        self._file.truncate(whole)
        self._size = whole
        if self.rows:
            log.warning("metrion: %d rows of an earlier run wait in the spool %s; replaying them", self.rows, self.path)

    @property
    def bytes(self) -> int:
        """Size of the journal on disk (replayed lines included until it is emptied); read by other threads."""
        return self._size

    @property
    def empty(self) -> bool:
        return self.bytes <= self._position

    def append(self, batch: Batch) -> None:
        """Write `batch` durably (fsync), or raise SpoolFull / OSError and write nothing that counts."""
        line = encode(batch)
        end = self.bytes
        if end + len(line) > self.max_bytes:
            raise SpoolFull(f"the spool {self.path} holds {end} bytes, its bound is {self.max_bytes}")
        try:
            self._file.seek(end)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._file.truncate(end)  # a partly written line must not be read back
            raise
        self._size = end + len(line)
        self.rows += len(batch.records)

    def next(self) -> tuple[Batch, int] | None:
        """The oldest batch not replayed yet, and where it ends; None when there is none."""
        self._file.seek(self._position)
        line = self._file.readline()
        if not line.endswith(b"\n"):
            return None
        try:
            return decode(line), self._position + len(line)
        except (ValueError, TypeError, KeyError) as e:  # cannot happen unless the file was edited: keep it, say so
            log.error("metrion: unreadable line in the spool %s at byte %d, left in place: %s", self.path,
                      self._position, e)
            return None

    def replayed(self, batch: Batch, end: int) -> None:
        """`batch`, ending at byte `end`, is in the database: move on; empty the file once all of it is."""
        self._position = end
        self.rows -= len(batch.records)
        if self._position >= self.bytes:
            self._file.truncate(0)
            os.fsync(self._file.fileno())
            self._size = 0
            self._position = 0
            self.rows = 0

    def close(self) -> None:
        self._file.close()  # releases the lock; what was not replayed waits for the next instance in this slot

    @classmethod
    def claim(cls, directory: Path, max_bytes: int) -> Spool:
        """This instance's journal: the first of `directory` that no running process holds."""
        directory.mkdir(parents=True, exist_ok=True)
        for slot in range(SLOTS):
            if (found := cls._hold(directory / f"spool-{slot}.jsonl", max_bytes)) is not None:
                return found
        raise OSError(f"all {SLOTS} spool files in {directory} are held by running processes")

    @classmethod
    def orphan(cls, directory: Path, max_bytes: int) -> Spool | None:
        """A journal of `directory` with rows in it that no running process holds (its instance stopped and no
        other took its slot), now held by this process; None when there is none."""
        for path in sorted(directory.glob("spool-*.jsonl")):
            if path.stat().st_size == 0 or (found := cls._hold(path, max_bytes)) is None:
                continue
            if found.rows:
                return found
            found.close()
        return None

    @classmethod
    def _hold(cls, path: Path, max_bytes: int) -> Spool | None:
        file = path.open("a+b")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None
        return cls(path, file, max_bytes)


class SpoolingBackend:
    """PostgreSQL with a local journal: while it is unreachable, batches go to the spool and the writer carries on;
    once it answers, new batches go to it first and the spool is replayed behind them, a batch per transaction.

    Past the spool's bound the outage is the writer's again: it keeps rows in memory and Metrion answers 503.
    """

    def __init__(self, backend: PostgresBackend, spool: Spool, retry_seconds: float = 1.0) -> None:
        self._backend = backend
        self.spool = spool
        self._orphan: Spool | None = None  # another instance's leftover journal, being replayed
        self._look_at = 0.0  # when to look for one next
        self._retry_seconds = retry_seconds
        self._retry_at = 0.0  # while PostgreSQL is unreachable, batches go straight to the spool until then
        self.outage: str | None = None  # why PostgreSQL is not being written now

    def write(self, records: Sequence[RequestRecord], counters: Sequence[Counter],
              dead_letters: Sequence[DeadLetter] = ()) -> None:
        if self.outage is None or time.monotonic() >= self._retry_at:
            try:
                self._backend.write(records, counters, dead_letters)
            except Exception as e:
                if not self._backend.is_outage(e):
                    raise
                self._note_outage(e)
            else:
                self.outage = None
                self._catch_up(self.spool, _REPLAY_PER_WRITE)
                return
        try:
            self.spool.append(Batch(list(records), list(counters), list(dead_letters)))
        except (SpoolFull, OSError) as e:
            raise SpoolUnavailable(f"PostgreSQL unreachable ({self.outage}) and {e}") from e

    def idle(self) -> bool:
        if self.outage is not None and time.monotonic() < self._retry_at:
            return False
        if not self.spool.empty:
            return self._catch_up(self.spool, 1)
        if self._orphan is None:
            if time.monotonic() < self._look_at:
                return False
            self._look_at = time.monotonic() + _ORPHAN_SECONDS
            self._orphan = Spool.orphan(self.spool.path.parent, self.spool.max_bytes)
            if self._orphan is None:
                return False
            log.warning("metrion: replaying %d rows a stopped instance left in %s", self._orphan.rows,
                        self._orphan.path)
        more = self._catch_up(self._orphan, 1)
        if self._orphan.empty:
            self._orphan.close()
            self._orphan = None
        return more

    def _catch_up(self, spool: Spool, batches: int) -> bool:
        """Replay up to `batches` batches of `spool`; True if more are left and PostgreSQL takes them."""
        try:
            for _ in range(batches):
                if not self._replay_one(spool):
                    return False
        except Exception as e:
            if not self._backend.is_outage(e):
                raise
            self._note_outage(e)
            return False
        self.outage = None
        return not spool.empty

    def _replay_one(self, spool: Spool) -> bool:
        found = spool.next()
        if found is None:
            return False
        batch, end = found
        try:
            self._backend.write(batch.records, batch.counters, batch.dead_letters)
        except Exception as e:
            if self._backend.is_outage(e):
                raise
            self._replay_apart(batch)
        spool.replayed(batch, end)
        if spool.empty:
            log.warning("metrion: the spool %s is replayed into PostgreSQL and empty", spool.path)
        return True

    def _replay_apart(self, batch: Batch) -> None:
        """A spooled batch the database refuses (not an outage): counters alone, then each row alone, a row refused
        alone becoming a dead letter, as the writer does with new batches."""
        self._backend.write([], batch.counters, batch.dead_letters)
        for record in batch.records:
            try:
                self._backend.write([record], [], [])
            except Exception as e:
                if self._backend.is_outage(e):
                    raise
                log.error("metrion: PostgreSQL refused a spooled row (%s); kept in dead_letters", e)
                self._backend.write([], [], [DeadLetter.of(record, e)])

    def _note_outage(self, error: Exception) -> None:
        if self.outage is None:
            log.error("metrion: PostgreSQL unreachable, spooling rows to %s until it is back: %s", self.spool.path,
                      error)
        self.outage = str(error).strip() or type(error).__name__
        self._retry_at = time.monotonic() + self._retry_seconds

    def is_outage(self, error: Exception) -> bool:
        return isinstance(error, SpoolUnavailable) or self._backend.is_outage(error)

    def close(self) -> None:
        self._backend.close()
        self.spool.close()
        if self._orphan is not None:
            self._orphan.close()


class SpoolUnavailable(Exception):
    """PostgreSQL is unreachable and the spool cannot take the batch (full, or the disk fails)."""
