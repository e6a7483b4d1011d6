"""Live reload of the config file: noticed by polling its stat (or on SIGHUP), applied by the addon.

What cannot change in a running process (the database, the shared Redis) is named here, so a reload can refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def needs_restart(old: Config, new: Config) -> str | None:
    """Why `new` cannot replace `old` in a running process, or None if it can."""
    if new.database != old.database:
        return "database: changing it needs a restart"
    if new.shared != old.shared:
        return "shared: changing it needs a restart"
    if new.spool != old.spool:
        return "spool: changing it needs a restart"
    return None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ConfigWatcher:
    """Calls `reload()` on the event loop when the file at `path` changes, or when the process gets SIGHUP."""

    def __init__(self, path: Path, reload: Callable[[], None]) -> None:
        self.path = path
        self._reload = reload
        self._stamp = _stamp(path)
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start watching on the running loop (idempotent)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._poll())
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals off the main thread
            self._loop.add_signal_handler(signal.SIGHUP, self._changed)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(signal.SIGHUP)
        self._loop = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._stamp:
                self._changed()

    def _changed(self) -> None:
        self._stamp = _stamp(self.path)
        try:
            self._reload()
        except Exception:  # the watcher must outlive any failed reload: the old config stays in force
            log.exception("metrion: reloading %s failed; keeping the running config", self.path)
