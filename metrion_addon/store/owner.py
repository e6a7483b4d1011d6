"""One Metrion process per SQLite database: a lock file beside the database names the process that owns it.

Two processes counting limits on their own would each allow the whole limit; the second one refuses to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class DatabaseInUse(Exception):
    """Another live process holds the database; the message is one line naming it."""


@dataclass(frozen=True)
class Ownership:
    """The held lock; the operating system releases it when the process ends, however it ends."""

    path: Path
    file: IO[str]

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.file.close()


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def claim(database: Path) -> Ownership:
    """Own `database` for this process, or raise DatabaseInUse naming the process that does.

    Call it only where this process keeps the limits itself: with limits in a shared store, several
    processes may write rows into one database.
    """
    path = lock_path(database)
    file = path.open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        owner = file.read().strip() or "unknown"
        file.close()
        raise DatabaseInUse(
            f"{database} is in use by another Metrion process (pid {owner}); two processes on one SQLite "
            "database would each enforce the whole limits. Stop it, give this one its own `database:`, or "
            "keep limits in a shared store (`shared: {redis: ...}` in the config) to run several."
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return Ownership(path, file)
