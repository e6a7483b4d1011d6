"""Metrion's mitmproxy hooks, a thin layer: route → guard → admit → forward (gate.py); answer → meter → record
(recording.py). What a config runs is in runtime.py; every hook goes through guard.py's fail-closed wrapper.

Run with `mitmdump -s metrion_addon/addon.py --listen-host 127.0.0.1 --set metrion_config=config.yaml` (or mitmweb).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import sys
from collections.abc import Coroutine
from typing import NoReturn

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from metrion_addon import contentview, store  # importing contentview registers the LLM stream view for mitmweb
from metrion_addon.clock import Clock, clock_from_env
from metrion_addon.config import ConfigError
from metrion_addon.display import FlowDisplay
from metrion_addon.failures import Failures
from metrion_addon.forward_proxy import ForwardProxy, one_request_per_connection
from metrion_addon.gate import Gate
from metrion_addon.guard import guarded
from metrion_addon.headers import redact_request
from metrion_addon.health import metrion_version
from metrion_addon.metrics import Metrics
from metrion_addon.recording import Recorder
from metrion_addon.responses import OWN_ENDPOINTS, own_endpoint
from metrion_addon.runtime import Runtime
from metrion_addon.timeouts import Timeouts
from metrion_addon.upstream import connect_lazily_unless_chosen

log = logging.getLogger(__name__)


class Metrion:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or clock_from_env()
        self.metrics = Metrics()  # one per process: a reload keeps the counts
        self.runtime = Runtime(self.clock, self.metrics, lambda records: self.recorder.written(records))
        self.recorder = Recorder(self.runtime)
        self._version = metrion_version()
        self.timeouts = Timeouts(self.recorder, self.contain)
        self.forward_proxy = ForwardProxy(self.runtime)
        self.failures = Failures(self.recorder, self.forward_proxy, self.timeouts)
        self.gate = Gate(self.recorder, self.forward_proxy, self.timeouts, self.contain)
        self._running = False

    # lifecycle

    def load(self, loader) -> None:
        loader.add_option(
            "metrion_config",
            str | None,
            None,
            "Path of Metrion's YAML config (tokens, plans, limits, provider URLs, database). "
            "Default: ./config.yaml, else ./config.example.yaml.",
        )

    def configure(self, updated: set[str]) -> None:
        if "metrion_config" not in updated:
            return
        connect_lazily_unless_chosen()
        try:
            self.runtime.open(ctx.options.metrion_config, self._reload)
        except ConfigError as e:
            self._bad_config(f"metrion: {e}", e)
        self.timeouts.watch()

    def _bad_config(self, line: str, cause: Exception) -> NoReturn:
        if self.runtime.config is None and not self._running:  # start-up: one line, no proxy behind a broken meter
            _refuse_to_start(line)
        raise exceptions.OptionsError(line) from cause

    @guarded
    def _reload(self) -> None:
        self.runtime.reload()

    @guarded
    def running(self) -> None:
        self._running = True
        # Only a UI (mitmweb's or the console's flow view) shows the cost once the writer has priced a row.
        self.recorder.loop = asyncio.get_running_loop() if ctx.master.addons.get("view") is not None else None
        self.runtime.start()
        _freeze_startup_objects()
        if (config := self.runtime.config) is not None:
            log.info("metrion: metering %d token(s) into %s", len(config.tokens), store.shown(config.database))

    @guarded
    def done(self) -> None:
        for flow_id in list(self.recorder.exchanges):
            self._abandon(flow_id)
        self.timeouts.close()
        self.runtime.close()

    @guarded
    def _abandon(self, flow_id: str) -> None:
        self.recorder.record(None, self.recorder.exchanges[flow_id], status=None, body=None,
                             error="Metrion shut down before the request finished", flow_id=flow_id)

    # forward-proxy tunnels

    @guarded
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or self.runtime.config is None:
            return
        self.forward_proxy.connect(flow)

    @guarded
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        one_request_per_connection(data.server, self.runtime.upstream_hosts)

    # the request's way up

    @guarded
    def request(self, flow: http.HTTPFlow) -> Coroutine[None, None, None] | None:
        """Admit and forward, or answer. With limits on Redis this returns a coroutine, which mitmproxy awaits:
        the one round trip never blocks the loop, and a single instance pays nothing for it."""
        if flow.response or flow.error or not flow.live or self.runtime.config is None:
            return None
        if flow.request.path in OWN_ENDPOINTS and self.forward_proxy.provider(flow) is None:
            flow.response = own_endpoint(flow.request.path, self.runtime, self._version)
            return None
        return self.gate.request(flow)

    # the answer's way down

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.recorder.exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        redact_request(flow.request)
        self.recorder.answer_started(exchange, flow.response, self.timeouts.get(flow.id),
                                     functools.partial(self.failures.note, flow.id))

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.recorder.exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        self.timeouts.stop(flow.id)
        redact_request(flow.request)
        self.recorder.answered(flow, exchange, flow.response)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.recorder.exchanges.get(flow.id)
        if exchange is None:
            return
        self.timeouts.stop(flow.id)
        redact_request(flow.request)
        self.recorder.failed(flow, exchange)

    # failures of Metrion's own code (guard.py)

    def contain(self, hook: str, arg: object, description: str) -> None:
        """guard.py caught an exception in `hook` on `arg`: refuse, record or note it (failures.py)."""
        self.failures.contain(hook, arg, description)


def _freeze_startup_objects() -> None:
    """Once per process, after start-up: leave what start-up made (config, prices, mitmproxy's and Metrion's
    modules) out of the garbage collector's full passes. Each of those scanned them all and held the event loop
    for ~65 ms; measured in bench/RESULTS.md. Garbage made later is collected as usual."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


_startup_frozen = False


def _refuse_to_start(line: str) -> NoReturn:
    """Print `line` and end the process now: mitmproxy would log a traceback for a script and listen anyway.

    os._exit, because SystemExit raised in a script's configure is swallowed by mitmproxy's script loader task.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(2)


__all__ = ["Metrion", "contentview"]
addons = [Metrion(), FlowDisplay()]  # FlowDisplay after Metrion: it logs the refusals Metrion marked
