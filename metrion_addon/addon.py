"""Metrion's mitmproxy hooks: route, authenticate, limit and forward; meter the answer into SQLite.

Run with `mitmdump -s metrion_addon/addon.py --listen-host 127.0.0.1 --set metrion_config=config.yaml` (or mitmweb).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Coroutine
from typing import NoReturn

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from metrion_addon import cache, contentview, store  # importing contentview registers the LLM stream view for mitmweb
from metrion_addon.auth import Upstream, authenticate, forbid_stray_metrion_token, lift_query_key, requester
from metrion_addon.budgets import COMMIT_WAIT, Hold, needs_disk
from metrion_addon.clock import Clock, clock_from_env
from metrion_addon.config import ConfigError
from metrion_addon.display import FlowDisplay
from metrion_addon.errors import MetrionError
from metrion_addon.forward_proxy import ForwardProxy, one_request_per_connection
from metrion_addon.guard import GuardedStream, guarded, guarded_coroutine
from metrion_addon.headers import drop_metrion_headers, lowercase, redact, redact_request, rewrite
from metrion_addon.health import metrion_version
from metrion_addon.limits import Admission
from metrion_addon.metering import (
    Exchange,
    fallback_record,
    stream_tap,
)
from metrion_addon.metrics import Metrics
from metrion_addon.recording import Recorder
from metrion_addon.redact import redact_query, request_secrets
from metrion_addon.request_body import inspect_body, needs_stream_usage, with_stream_usage
from metrion_addon.responses import OWN_ENDPOINTS, answer_with_error, error_response, own_endpoint, replayed
from metrion_addon.routes import (
    Route,
    is_metrion_path,
    route_metrion_path,
    route_provider_host,
    upstream_target,
)
from metrion_addon.runtime import Runtime
from metrion_addon.shared_budgets import admit_on_redis
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.timeouts import Timeouts
from metrion_addon.upstream import (
    connect_lazily_unless_chosen,
)

log = logging.getLogger(__name__)


_REQUEST_HOOKS = ("request", "http_connect")  # a failure here must answer the request: it is not forwarded yet
_FINAL_HOOKS = ("response", "error")  # a failure here must still leave the row


class Metrion:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or clock_from_env()
        self.metrics = Metrics()  # one per process: a reload keeps the counts
        self.runtime = Runtime(self.clock, self.metrics, lambda records: self.recorder.written(records))
        self.recorder = Recorder(self.runtime)
        self._version = metrion_version()
        self.timeouts = Timeouts(self.recorder, self.contain)
        self.forward_proxy = ForwardProxy(self.runtime)
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
        original_path = flow.request.path
        path, query_key = lift_query_key(original_path)  # Gemini's ?key= becomes x-goog-api-key: never logged
        route = self._route(flow, path)
        if route is None:
            return None
        if query_key is not None and route.provider != "gemini":  # only Google's API takes ?key=: leave others be
            path, query_key = flow.request.path, None
            route = self._route(flow, path)
            assert route is not None
        if query_key is not None:
            flow.request.path = path
            if "x-goog-api-key" not in flow.request.headers:
                flow.request.headers["x-goog-api-key"] = query_key
        headers = lowercase(flow.request.headers)
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.clock(),
                            secrets=request_secrets(headers, original_path))
        self.recorder.exchanges[flow.id] = exchange
        try:
            credentials = self._check(flow, exchange, headers)
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return None
        if exchange.cache is not None and exchange.cache.mode is cache.Mode.LOOKUP and self.runtime.cache is not None:
            return self._request_cached(flow, self.runtime.cache, exchange, headers, credentials)
        return self._admit(flow, exchange, headers, credentials)

    def _admit(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str],
               credentials: Upstream | None) -> Coroutine[None, None, None] | None:
        """Reserve the budget and count the limits, then forward; a coroutine when the limits live on Redis."""
        try:
            now = self.clock()
            if self.runtime.shared is not None:
                return self._request_shared(flow, self.runtime.shared, exchange, headers, credentials, now)
            hold = self._hold(flow, exchange, now)
            assert exchange.identity is not None
            try:
                admission = self.runtime.limits.admit(exchange.identity.token_name, exchange.identity.plan, now)
            except MetrionError:
                self._release(hold)
                raise
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return None
        if needs_disk(hold):
            return self._let_through_on_disk(flow, exchange, admission, hold, headers, credentials)
        self._let_through(flow, exchange, admission, hold, headers, credentials)
        return None

    @guarded_coroutine("request")
    async def _let_through_on_disk(self, flow: http.HTTPFlow, exchange: Exchange, admission: Admission, hold: Hold,
                                   headers: dict[str, str], credentials: Upstream | None) -> None:
        """Forward once the budget reservation is committed, so that a crash from then on keeps it (SQLite)."""
        assert hold.saved is not None and self.runtime.writer is not None
        committed = asyncio.wrap_future(self.runtime.writer.put_durable(hold.saved))
        if not (await asyncio.wait({committed}, timeout=COMMIT_WAIT))[0]:
            self._release(hold)
            self._refuse(flow, exchange, MetrionError(503, "metering_unavailable", (
                f"Metrion could not store this request's budget reservation within {COMMIT_WAIT:g} s; "
                "request not forwarded.")))
            return
        self._let_through(flow, exchange, admission, dataclasses.replace(hold, saved=None), headers, credentials)

    @guarded_coroutine("request")
    async def _request_cached(self, flow: http.HTTPFlow, entries: cache.CacheStore, exchange: Exchange,
                              headers: dict[str, str], credentials: Upstream | None) -> None:
        """Answer from the response cache (rate bucket only: the monthly cap counts what reached a provider)."""
        assert exchange.cache is not None and exchange.identity is not None
        hit = await entries.get(exchange.cache.key, self.clock())
        if hit is None:
            if (admitting := self._admit(flow, exchange, headers, credentials)) is not None:
                await admitting
            return
        name, plan = exchange.identity.token_name, exchange.identity.plan
        try:
            if self.runtime.shared is not None:
                admission = await self.runtime.shared.admit(name, plan, self.clock(), counts=False)
            else:
                admission = self.runtime.limits.admit_cached(name, plan, self.clock())
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return
        assert self.runtime.writer is not None
        for state in admission.saved:
            self.runtime.writer.put(state)
        exchange.limit_headers, exchange.cache_hit, exchange.cache_told = admission.headers, hit, cache.Outcome.HIT
        flow.response = replayed(cache.replay(hit, self.clock()))
        redact_request(flow.request)

    @guarded_coroutine("request")
    async def _request_shared(self, flow: http.HTTPFlow, shared: SharedLimits, exchange: Exchange,
                              headers: dict[str, str], credentials: Upstream | None, now: float) -> None:
        identity = exchange.identity
        assert identity is not None
        try:
            hold, admission = await admit_on_redis(
                self.runtime.budgets, shared, identity.token_name, identity.plan, now, exchange.route,
                flow.request.method, flow.request.raw_content or b"", exchange.request)
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return
        self._let_through(flow, exchange, admission, hold, headers, credentials)

    def _hold(self, flow: http.HTTPFlow, exchange: Exchange, now: float) -> Hold | None:
        """Reserve the most the request can cost from the token's dollar budget (raise 429 if it does not fit)."""
        assert exchange.identity is not None
        return self.runtime.budgets.admit(exchange.identity.token_name, now, exchange.route, flow.request.method,
                                  flow.request.raw_content or b"", exchange.request)

    def _refuse(self, flow: http.HTTPFlow, exchange: Exchange, error: MetrionError) -> None:
        self.metrics.rejected(error.code)
        exchange.failure = error
        answer_with_error(flow, exchange.route.format, error, exchange)
        redact_request(flow.request)

    def _let_through(self, flow: http.HTTPFlow, exchange: Exchange, admission: Admission, hold: Hold | None,
                     headers: dict[str, str], credentials: Upstream | None) -> None:
        assert self.runtime.writer is not None
        exchange.limit_headers = {**admission.headers, **hold.headers} if hold else admission.headers
        for state in (*admission.saved, hold.saved) if hold and hold.saved else admission.saved:
            self.runtime.writer.put(state)
        if hold:
            self.runtime.budgets.track(flow.id, hold)
        drop = {name for name in headers if name.startswith("x-metrion-")}
        drop.add("proxy-authorization")  # sent by forward-proxy clients, for Metrion only
        replace = {"accept-encoding": "identity"}  # the meter must read plain text
        if credentials is not None:
            drop.update(credentials.drop_headers)
            replace.update(credentials.set_headers or {})
            exchange.secrets += request_secrets(credentials.set_headers or {})
        rewrite(flow.request.headers, drop, replace)
        self._forward(flow, exchange)

    def _route(self, flow: http.HTTPFlow, path: str) -> Route | None:
        assert self.runtime.config is not None
        if provider := self.forward_proxy.provider(flow):
            return route_provider_host(provider, flow.request.host, path, self.runtime.urls)
        if not is_metrion_path(path):
            self.forward_proxy.pass_other_host(flow)
            return None
        route = route_metrion_path(path, self.runtime.urls)
        if route is None:
            others = ",".join(name for name in self.runtime.urls if name != "anthropic")
            error = MetrionError(404, "unknown_route", f"Metrion has no route {path.split('?')[0]!r}: "
                                 f"use /api/proxy/v1/messages or /api/proxy/{{{others}}}/v1/...")
            flow.response = error_response(None, error)
        return route

    def _check(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str]) -> Upstream | None:
        """Authenticate and validate the request (the limits come next); raise MetrionError to refuse it.

        `headers` is a lower-cased snapshot: mitmproxy's Headers scan every field on each lookup.
        """
        assert self.runtime.config is not None and self.runtime.writer is not None
        route = exchange.route
        exchange.requester = requester(headers)
        if self.forward_proxy.provider(flow) is not None:
            identity = self.forward_proxy.identity(flow, headers.get("proxy-authorization"))
            credentials = None
        else:
            identity, credentials = authenticate(route.provider, headers, self.runtime.tokens, route.format)
        exchange.identity = identity
        replaced = (*credentials.drop_headers, *(credentials.set_headers or {})) if credentials else ()
        forbid_stray_metrion_token(flow.request.headers.fields, flow.request.path, replaced)
        exchange.request = inspect_body(
            route, flow.request.method, headers.get("content-type", ""), flow.request.raw_content or b""
        )
        scope = cache.scope(identity.token_name, identity.mode, headers, self.runtime.config.cache.share_across_tokens)
        include_usage = self.runtime.config.providers[route.provider].include_usage
        exchange.cache = cache.plan(headers, scope, route, flow.request.method, exchange.request,
                                    flow.request.raw_content or b"", include_usage)
        if trouble := self.runtime.writer.trouble:
            raise MetrionError(503, "metering_unavailable", "Metrion cannot record usage right now "
                               f"({trouble}); request not forwarded.")
        return credentials

    def _release(self, hold: Hold | None) -> None:
        writer = self.runtime.writer
        if hold is not None and writer is not None and (state := self.runtime.budgets.release(hold)) is not None:
            writer.put(state)

    def _forward(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        assert self.runtime.config is not None
        request, route = flow.request, exchange.route
        asks = self.runtime.config.providers[route.provider].include_usage
        if exchange.request and exchange.request.parsed is not None and needs_stream_usage(
            route, exchange.request, asks
        ):
            request.content = with_stream_usage(request.raw_content or b"", exchange.request.parsed)
            exchange.hide_usage_chunk = True
        request.scheme, request.host, request.port, request.path = upstream_target(route.upstream_url)  # in this order
        exchange.forwarded = True
        self.timeouts.start(flow, self.runtime.config.timeout)
        token = exchange.identity.token_name if exchange.identity else None
        flow.metadata["metrion"] = {"provider": route.provider, "token": token}

    # the answer's way down

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.recorder.exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        redact_request(flow.request)
        if exchange.failure is None:  # Metrion's own answers carry these already
            limits = tuple((name.encode(), value.encode()) for name, value in exchange.limit_headers.items())
            flow.response.headers.fields += limits
        timer = self.timeouts.get(flow.id)
        if timer is None:
            return
        timer.touch()
        content_type = flow.response.headers.get("content-type", "")
        if tap := stream_tap(exchange, flow.response.status_code, content_type, timer.touch):
            flow.response.stream = GuardedStream(tap, lambda: tap.held_back,
                                                 functools.partial(self._note_internal_error, flow.id))
        if exchange.cache is not None and exchange.cache_hit is None and self.runtime.config is not None:
            exchange.cache_told = cache.outcome(exchange.cache)
            flow.response.headers[cache.HEADER] = exchange.cache_told.value
            if exchange.stream is not None:
                flow.response.stream = cache.StreamRecorder(flow.response.stream,
                                                            self.runtime.config.cache.max_entry_bytes)

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
        """An unexpected exception in `hook`: never forward the request, always leave its row."""
        if hook == "_abandon" and isinstance(arg, str):
            self.recorder.put(arg, fallback_record(self.recorder.exchanges[arg], None, description))
        if not isinstance(arg, http.HTTPFlow):
            return  # lifecycle and connection hooks: the guard logged it; no request is waiting on them
        flow = arg
        if hook in _REQUEST_HOOKS:
            self._refuse_after_internal_error(flow, description)
        elif hook in _FINAL_HOOKS:
            self.timeouts.stop(flow.id)
            redact_request(flow.request)
            if exchange := self.recorder.exchanges.get(flow.id):
                status = flow.response.status_code if flow.response else None
                self.recorder.put(flow.id, fallback_record(exchange, status, description))
        else:
            self._note_internal_error(flow.id, description)

    def _refuse_after_internal_error(self, flow: http.HTTPFlow, description: str) -> None:
        self.timeouts.stop(flow.id)
        flow.metadata.pop("metrion", None)
        error = MetrionError(500, "metrion_internal_error",
                             f"Metrion failed while handling this request ({description}); it was not forwarded.")
        exchange = self.recorder.exchanges.get(flow.id) or self._exchange_after_internal_error(flow)
        error_format = exchange.route.format if exchange else None
        if exchange is not None:
            exchange.failure = error
        answer_with_error(flow, error_format, error, exchange)
        drop_metrion_headers(flow.request.headers)
        redact(flow.request.headers)

    def _exchange_after_internal_error(self, flow: http.HTTPFlow) -> Exchange | None:
        """The exchange of a request that failed before Metrion routed it; None if it is no provider route."""
        if self.runtime.config is None or flow.request.method == "CONNECT":
            return None
        path, _ = lift_query_key(flow.request.path)
        route = None
        if provider := self.forward_proxy.provider(flow):
            route = route_provider_host(provider, flow.request.host, path, self.runtime.urls)
        elif is_metrion_path(path):
            route = route_metrion_path(path, self.runtime.urls)
        if route is None:
            return None
        flow.request.path = path  # a ?key= never stays in the flow
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.clock(),
                            requester=requester({"x-metrion-user": flow.request.headers.get("x-metrion-user", "")}))
        self.recorder.exchanges[flow.id] = exchange
        return exchange

    def _note_internal_error(self, flow_id: str, description: str) -> None:
        """Metering failed mid-answer: the answer goes on, and the row will say why its usage may be missing."""
        if exchange := self.recorder.exchanges.get(flow_id):
            exchange.internal_error = description


def _refuse_to_start(line: str) -> NoReturn:
    """Print `line` and end the process now: mitmproxy would log a traceback for a script and listen anyway.

    os._exit, because SystemExit raised in a script's configure is swallowed by mitmproxy's script loader task.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(2)


__all__ = ["Metrion", "contentview"]
addons = [Metrion(), FlowDisplay()]  # FlowDisplay after Metrion: it logs the refusals Metrion marked
