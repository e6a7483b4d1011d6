"""Test-only mitmproxy script, loaded after the addon: makes Metrion's own code raise on demand.

`x-fault: <hook>` raises at the start of that Metrion hook, `x-fault: <hook>-after` once the hook has done its
work; a streamed answer chunk containing `FAULT` makes the stream tap raise. Proves guard.py contains any failure.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import ctx, http

from metrion_addon import metering
from metrion_addon.guard import guarded

HOOKS = ("http_connect", "request", "responseheaders", "response", "error")


class InjectedFault(RuntimeError):
    pass


def _faulty(hook: Callable) -> Callable:
    def run(self, flow: http.HTTPFlow, *rest: object) -> object:
        fault = flow.request.headers.get("x-fault", "")
        if fault == hook.__name__:
            raise InjectedFault(hook.__name__)
        result = hook(self, flow, *rest)
        if fault == f"{hook.__name__}-after":
            raise InjectedFault(fault)
        return result

    run.__name__ = hook.__name__
    return run


def _faulty_tap(tap: Callable) -> Callable:
    def call(self: metering.StreamTap, data: bytes) -> object:
        result = tap(self, data)
        if b"FAULT" in data:
            raise InjectedFault("stream")
        return result

    return call


def running() -> None:
    cls = type(ctx.master.addons.get("metrion"))
    for name in HOOKS:
        setattr(cls, name, guarded(_faulty(getattr(cls, name).__wrapped__)))
    metering.StreamTap.__call__ = _faulty_tap(metering.StreamTap.__call__)
