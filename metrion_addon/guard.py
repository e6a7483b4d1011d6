"""The fail-closed wrapper every Metrion hook goes through: an unexpected exception never lets a request past.

A hook that raises hands its argument to the addon's `contain(hook, arg, description)`; if that raises too, the
flow is killed (never forwarded). Stream callbacks that raise fall back to forwarding the provider's bytes as is.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from mitmproxy import http

log = logging.getLogger(__name__)

Chunks = bytes | list[bytes]


class Containment(Protocol):
    def contain(self, hook: str, arg: Any, description: str) -> None:
        """Make the failure of `hook` on `arg` safe: answer or record it. Must not let a request through."""


def describe(error: BaseException) -> str:
    """Type and place of an exception, never its message (messages can quote secrets or request bytes)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}"


def guarded[**P, R](hook: Callable[P, R]) -> Callable[P, R | None]:
    """Wrap a method `hook(self, arg, ...)` of a Containment so that no exception escapes it unhandled.

    `arg` (a flow for flow hooks, None for lifecycle hooks) is what contain() is given.
    """

    @functools.wraps(hook)
    def run(self: Containment, *args: Any) -> R | None:
        try:
            return hook(self, *args)  # type: ignore[call-arg]
        except Exception as error:
            _contain(self, hook.__name__, args[0] if args else None, error)
            return None

    return run  # type: ignore[return-value]


def guarded_coroutine(name: str) -> Callable[[Callable[..., Coroutine[Any, Any, None]]],
                                             Callable[..., Coroutine[Any, Any, None]]]:
    """`guarded` for the part of hook `name` that runs as a coroutine (mitmproxy awaits what a hook returns)."""

    def wrap(hook: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Coroutine[Any, Any, None]]:
        @functools.wraps(hook)
        async def run(self: Containment, *args: Any) -> None:
            try:
                await hook(self, *args)
            except Exception as error:
                _contain(self, name, args[0] if args else None, error)

        return run

    return wrap


def _contain(self: Containment, hook: str, arg: Any, error: Exception) -> None:
    description = describe(error)
    log.error("metrion: internal error in %s: %s", hook, description)
    try:
        self.contain(hook, arg, description)
    except Exception as second:
        log.error("metrion: containing it failed too (%s)", describe(second))
        if isinstance(arg, http.HTTPFlow) and arg.killable:
            arg.kill()  # last resort: a killed flow is never forwarded


class GuardedStream:
    """A `response.stream` callback that survives its tap: on the tap's first exception, report it once and
    forward everything from then on untouched (what the tap held back first), so the client never hangs."""

    def __init__(self, tap: Callable[[bytes], Chunks], held: Callable[[], bytes],
                 on_error: Callable[[str], None]) -> None:
        self._tap = tap
        self._held = held
        self._on_error = on_error
        self._failed = False

    def __call__(self, data: bytes) -> Chunks:
        if not self._failed:
            try:
                return self._tap(data)
            except Exception as error:
                self._failed = True
                description = describe(error)
                log.error("metrion: internal error in the stream tap: %s", description)
                self._on_error(description)
                held = _safe(self._held)
                return [chunk for chunk in (held, data) if chunk]
        return [data] if data else []


def _safe(read: Callable[[], bytes]) -> bytes:
    try:
        return read()
    except Exception:
        return b""
