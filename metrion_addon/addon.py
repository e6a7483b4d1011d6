"""Metrion's mitmproxy hooks: route, authenticate, limit and forward; meter the answer into SQLite.

Run with `mitmdump -s metrion_addon/addon.py --listen-host 127.0.0.1 --set metrion_config=config.yaml` (or mitmweb).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import NoReturn
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import server_hooks

from metrion_addon import cache, contentview, store  # importing contentview registers the LLM stream view for mitmweb
from metrion_addon.auth import Upstream, authenticate, identify_forward, lift_query_key, other_host_identity, requester
from metrion_addon.budgets import Budgets, Hold, MemoryBudgetCounters, TokenBudget, token_budgets
from metrion_addon.clock import Clock, clock_from_env
from metrion_addon.config import Config, ConfigError, find_config, load_config
from metrion_addon.display import REJECTED_MARK as _REJECTED_MARK
from metrion_addon.display import FlowDisplay
from metrion_addon.errors import MetrionError, error_body, error_headers, provider_error_message
from metrion_addon.guard import GuardedStream, guarded, guarded_coroutine
from metrion_addon.health import health, metrion_version
from metrion_addon.limits import Admission, Limits
from metrion_addon.metering import (
    Exchange,
    build_record,
    disconnect_error,
    fallback_record,
    metadata,
    stream_tap,
    summary,
)
from metrion_addon.metrics import CONTENT_TYPE, Metrics
from metrion_addon.notify import AlertMonitor
from metrion_addon.pricing import Pricer, context_window
from metrion_addon.redact import redact_query, request_secrets
from metrion_addon.reload import ConfigWatcher, needs_restart
from metrion_addon.request_body import inspect_body, needs_stream_usage, with_stream_usage
from metrion_addon.routes import (
    Route,
    host_provider,
    is_metrion_path,
    provider_hosts,
    route_metrion_path,
    route_provider_host,
)
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.upstream import (
    IdleTimer,
    answer_upstream_failures,
    cancel_upstream,
    connect_lazily_unless_chosen,
    watch_response_bodies,
)

log = logging.getLogger(__name__)

_OWN_ENDPOINTS = ("/metrion/health", "/metrion/metrics")

_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"x-goog-api-key", b"x-metrion-token", b"proxy-authorization")
_REDACTED = b"[redacted]"
_REQUEST_HOOKS = ("request", "http_connect")  # a failure here must answer the request: it is not forwarded yet
_FINAL_HOOKS = ("response", "error")  # a failure here must still leave the row


class Metrion:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or clock_from_env()
        self.config: Config | None = None
        self.writer: store.Writer | None = None
        self.log: store.Log | None = None  # the request log the writer writes: SQLite or PostgreSQL
        self._ownership: store.Ownership | None = None
        self.cache: cache.CacheStore | None = None
        self.monitor: AlertMonitor | None = None
        self.limits = Limits(1, {})
        self.shared: SharedLimits | None = None  # the limits on Redis, when the config has `shared:`
        self.metrics = Metrics()  # one per process: a reload keeps the counts
        self._watcher: ConfigWatcher | None = None
        self._version = metrion_version()
        self.budgets = Budgets({}, MemoryBudgetCounters(), Pricer({}), lambda provider, model: None)
        self._tokens: dict = {}
        self._exchanges: dict[str, Exchange] = {}
        self._timers: dict[str, IdleTimer] = {}
        self._flows: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()
        self._tunnels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client conn -> Identity
        self._upstream_hosts: set[str] = set()
        self._urls: dict[str, str] = {}
        self._hosts: dict[str, str] = {}  # provider hosts recognised in forward-proxy use
        self._loop: asyncio.AbstractEventLoop | None = None
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
            config = load_config(find_config(ctx.options.metrion_config))
            self._close_writer()
            if config.shared is None:  # limits in Redis (`shared:`): several processes may share the database
                self._ownership = _claim_database(config)
            opened = _open_database(config)
        except ConfigError as e:
            self._bad_config(f"metrion: {e}", e)
        self._close_shared()
        self._stop_watching()
        buckets, months = store.load_counters(opened.conn)
        pricer, budget_pricer, budgets, window = _pricing(config)
        self.budgets = Budgets(budgets, MemoryBudgetCounters(store.load_budgets(opened.conn)), budget_pricer, window)
        self.log = opened
        self.writer = store.Writer(opened.backend, price=pricer, on_written=self._written,
                                   settle=self.budgets.settle)
        self.writer.start()
        self.metrics.watch_backlog(lambda writer=self.writer: writer.backlog)
        self.metrics.watch_spool(lambda: opened.spool.rows if opened.spool else 0,
                                 lambda: opened.spool.bytes if opened.spool else 0)
        self.cache = opened.cache_store(self.writer, config.cache.max_bytes)
        if config.alerts.rules:
            self.monitor = AlertMonitor(config.alerts, config.database, self.clock, self.writer.put,
                                        store.load_alert_history(opened.conn))
            self.monitor.start()
        caps = _caps(config)
        self.limits = Limits(config.rate_limit, caps, buckets, months)
        if config.shared is not None:
            shared = SharedLimits(config.shared, config.rate_limit, caps, config.limits_fingerprint(), months)
            try:
                shared.connect(self.clock())
            except ConfigError as e:
                self._bad_config(f"metrion: {config.path}: {e}", e)
            self.shared = shared
            with contextlib.suppress(RuntimeError):  # no loop yet at start-up: running() starts it
                shared.start()
        self._use(config)
        self._watcher = ConfigWatcher(config.path, self._reload)
        with contextlib.suppress(RuntimeError):
            self._watcher.start()
        answer_upstream_failures(self._answer_upstream_failure)
        watch_response_bodies(self._body_data)

    def _use(self, config: Config) -> None:
        """Route and authenticate by `config` from the next request on."""
        self.config = config
        self._tokens = config.token_by_hash()
        self._urls = {name: provider.url for name, provider in config.providers.items()}
        self._hosts = provider_hosts(self._urls)
        self._upstream_hosts = {urlsplit(url).hostname for url in self._urls.values()}

    def _bad_config(self, line: str, cause: Exception) -> NoReturn:
        if self.config is None and not self._running:  # start-up: one line, no proxy behind a broken meter
            _refuse_to_start(line)
        raise exceptions.OptionsError(line) from cause

    @guarded
    def _reload(self) -> None:
        """The config file changed (or SIGHUP): apply tokens, plans, limits, prices and providers in place.

        Connections, flows in flight and every counter stay; a file that does not load keeps the running config.
        """
        assert self.config is not None and self.writer is not None
        try:
            config = load_config(self.config.path)
            if problem := needs_restart(self.config, config):
                raise ConfigError(f"{config.path}: {problem}")
        except ConfigError as e:
            log.error("metrion: %s; keeping the running config", e)
            return
        pricer, budget_pricer, budgets, window = _pricing(config)
        self.writer.reprice(pricer)
        self.budgets.reconfigure(budgets, budget_pricer, window)
        caps = _caps(config)
        self.limits.reconfigure(config.rate_limit, caps)
        if self.shared is not None:
            self.shared.reconfigure(config.rate_limit, caps, config.limits_fingerprint())
        if config.alerts != self.config.alerts:
            self._replace_monitor(config)
        self._use(config)
        log.info("metrion: reloaded %s: %d token(s)", config.path, len(config.tokens))

    def _replace_monitor(self, config: Config) -> None:
        """New alert rules: the old monitor stops on a thread of its own (it may be delivering), a new one starts."""
        assert self.writer is not None
        old, self.monitor = self.monitor, None
        if old is not None:
            threading.Thread(target=old.close, name="metrion-alerts-stop", daemon=True).start()
        if config.alerts.rules:
            with contextlib.closing(store.read_only(config.database, ())) as conn:
                history = store.load_alert_history(conn)
            self.monitor = AlertMonitor(config.alerts, config.database, self.clock, self.writer.put, history)
            self.monitor.start()
            self.monitor.poke()  # evaluate the new rules now, not at the next written row

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    @guarded
    def running(self) -> None:
        self._running = True
        # Only a UI (mitmweb's or the console's flow view) shows the cost once the writer has priced a row.
        self._loop = asyncio.get_running_loop() if ctx.master.addons.get("view") is not None else None
        if self.shared is not None:
            self.shared.start()
        if self._watcher is not None:
            self._watcher.start()
        if self.config is not None:
            log.info("metrion: metering %d token(s) into %s", len(self.config.tokens),
                     store.shown(self.config.database))

    @guarded
    def done(self) -> None:
        for flow_id in list(self._exchanges):
            self._abandon(flow_id)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        answer_upstream_failures(None)
        self._stop_watching()
        watch_response_bodies(None)
        self._close_writer()
        self._close_shared()

    @guarded
    def _abandon(self, flow_id: str) -> None:
        self._record(None, self._exchanges[flow_id], status=None, body=None,
                     error="Metrion shut down before the request finished", flow_id=flow_id)

    def _close_writer(self) -> None:
        if self.monitor is not None:  # first: its last notifications are recorded by the writer
            self.monitor.close()
            self.monitor = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.log = None
        if self._ownership is not None:
            self._ownership.release()
            self._ownership = None

    def _close_shared(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    # forward-proxy tunnels

    @guarded
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or self.config is None:
            return
        credentials = flow.request.headers.get("proxy-authorization")
        try:
            if host_provider(flow.request.host, flow.request.port, self._hosts):
                self._tunnels[flow.client_conn] = identify_forward(credentials, self._tokens)
            elif self.config.block_other_hosts:
                raise MetrionError(403, "host_blocked", _blocked(flow.request.host))
            elif identity := other_host_identity(credentials, self._tokens, tunnel=None,
                                                 open_to_all=self.config.allow_other_hosts_without_token):
                self._tunnels[flow.client_conn] = identity
        except MetrionError as e:
            flow.response = self._error_response(None, e)
            flow.marked = _REJECTED_MARK
        _redact(flow.request.headers)  # CONNECT flows are kept and saved like any other

    @guarded
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # One upstream connection per flow (HTTP/1.1) lets a timeout close exactly one request.
        address = data.server.address
        if address and address[0] in self._upstream_hosts and not data.server.alpn_offers:
            data.server.alpn_offers = (b"http/1.1",)

    # the request's way up

    @guarded
    def request(self, flow: http.HTTPFlow) -> Coroutine[None, None, None] | None:
        """Admit and forward, or answer. With limits on Redis this returns a coroutine, which mitmproxy awaits:
        the one round trip never blocks the loop, and a single instance pays nothing for it."""
        if flow.response or flow.error or not flow.live or self.config is None:
            return None
        if flow.request.path in _OWN_ENDPOINTS and host_provider(flow.request.host, flow.request.port,
                                                                  self._hosts) is None:
            flow.response = self._own_endpoint(flow.request.path)
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
        headers = _lowercase(flow.request.headers)
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.clock(),
                            secrets=request_secrets(headers, original_path))
        self._exchanges[flow.id] = exchange
        try:
            credentials = self._check(flow, exchange, headers)
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return None
        if exchange.cache is not None and exchange.cache.mode is cache.Mode.LOOKUP and self.cache is not None:
            return self._request_cached(flow, self.cache, exchange, headers, credentials)
        return self._admit(flow, exchange, headers, credentials)

    def _admit(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str],
               credentials: Upstream | None) -> Coroutine[None, None, None] | None:
        """Reserve the budget and count the limits, then forward; a coroutine when the limits live on Redis."""
        try:
            now = self.clock()
            hold = self._hold(flow, exchange, now)
            if self.shared is not None:
                return self._request_shared(flow, self.shared, exchange, headers, credentials, hold, now)
            assert exchange.identity is not None
            try:
                admission = self.limits.admit(exchange.identity.token_name, exchange.identity.plan, now)
            except MetrionError:
                self._release(hold)
                raise
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return None
        self._let_through(flow, exchange, admission, hold, headers, credentials)
        return None

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
            if self.shared is not None:
                admission = await self.shared.admit(name, plan, self.clock(), counts=False)
            else:
                admission = self.limits.admit_cached(name, plan, self.clock())
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return
        assert self.writer is not None
        for state in admission.saved:
            self.writer.put(state)
        exchange.limit_headers, exchange.cache_hit, exchange.cache_told = admission.headers, hit, cache.Outcome.HIT
        flow.response = _replayed(cache.replay(hit, self.clock()))
        _redact_flow(flow)

    @guarded_coroutine("request")
    async def _request_shared(self, flow: http.HTTPFlow, shared: SharedLimits, exchange: Exchange,
                              headers: dict[str, str], credentials: Upstream | None, hold: Hold | None,
                              now: float) -> None:
        assert exchange.identity is not None
        try:
            admission = await shared.admit(exchange.identity.token_name, exchange.identity.plan, now)
        except MetrionError as e:
            self._release(hold)
            self._refuse(flow, exchange, e)
            return
        self._let_through(flow, exchange, admission, hold, headers, credentials)

    def _hold(self, flow: http.HTTPFlow, exchange: Exchange, now: float) -> Hold | None:
        """Reserve the most the request can cost from the token's dollar budget (raise 429 if it does not fit)."""
        assert exchange.identity is not None
        return self.budgets.admit(exchange.identity.token_name, now, exchange.route, flow.request.method,
                                  flow.request.raw_content or b"", exchange.request)

    def _own_endpoint(self, path: str) -> http.Response:
        """GET /metrion/health for load balancers, GET /metrion/metrics for Prometheus."""
        if path == "/metrion/metrics":
            return http.Response.make(200, self.metrics.render(), {"content-type": CONTENT_TYPE})
        assert self.config is not None and self.writer is not None
        shared = self.shared
        spool = self.log.spool if self.log else None
        state = health(writer_error=self.writer.trouble, backlog=self.writer.backlog, database=self.log.describe(),
                       spool_rows=spool.rows if spool else 0, spool_bytes=spool.bytes if spool else 0,
                       redis_error=False if shared is None else shared.error,
                       redis_closed=shared is not None and shared.on_failure == "closed", version=self._version)
        return http.Response.make(state.status, json.dumps(state.body).encode(),
                                  {"content-type": "application/json", "cache-control": "no-store"})

    def _refuse(self, flow: http.HTTPFlow, exchange: Exchange, error: MetrionError) -> None:
        self.metrics.rejected(error.code)
        exchange.failure = error
        flow.response = self._error_response(exchange.route.format, error, exchange)
        flow.marked = _REJECTED_MARK
        _redact_flow(flow)

    def _let_through(self, flow: http.HTTPFlow, exchange: Exchange, admission: Admission, hold: Hold | None,
                     headers: dict[str, str], credentials: Upstream | None) -> None:
        assert self.writer is not None
        exchange.limit_headers = {**admission.headers, **hold.headers} if hold else admission.headers
        for state in (*admission.saved, hold.saved) if hold and hold.saved else admission.saved:
            self.writer.put(state)
        if hold:
            self.budgets.track(flow.id, hold)
        drop = {name for name in headers if name.startswith("x-metrion-")}
        drop.add("proxy-authorization")  # sent by forward-proxy clients, for Metrion only
        replace = {"accept-encoding": "identity"}  # the meter must read plain text
        if credentials is not None:
            drop.update(credentials.drop_headers)
            replace.update(credentials.set_headers or {})
            exchange.secrets += request_secrets(credentials.set_headers or {})
        _rewrite(flow.request.headers, drop, replace)
        self._forward(flow, exchange)

    def _route(self, flow: http.HTTPFlow, path: str) -> Route | None:
        assert self.config is not None
        if provider := host_provider(flow.request.host, flow.request.port, self._hosts):
            return route_provider_host(provider, flow.request.host, path, self._urls)
        if not is_metrion_path(path):
            self._pass_other_host(flow)
            return None
        route = route_metrion_path(path, self._urls)
        if route is None:
            others = ",".join(name for name in self._urls if name != "anthropic")
            error = MetrionError(404, "unknown_route", f"Metrion has no route {path.split('?')[0]!r}: "
                                 f"use /api/proxy/v1/messages or /api/proxy/{{{others}}}/v1/...")
            flow.response = self._error_response(None, error)
        return route

    def _pass_other_host(self, flow: http.HTTPFlow) -> None:
        """Traffic that is not Metrion's: blocked, or passed on for a token holder (or anyone, if configured)."""
        assert self.config is not None
        headers = flow.request.headers
        try:
            if self.config.block_other_hosts:
                raise MetrionError(403, "host_blocked", _blocked(flow.request.host))
            other_host_identity(headers.get("proxy-authorization"), self._tokens,
                                tunnel=self._tunnels.get(flow.client_conn),
                                open_to_all=self.config.allow_other_hosts_without_token)
        except MetrionError as e:
            flow.response = self._error_response(None, e)
            flow.marked = _REJECTED_MARK
            _redact(headers)
            return
        _rewrite(headers, {"proxy-authorization"}, {})  # the proxy's credential is for Metrion, never the host

    def _check(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str]) -> Upstream | None:
        """Authenticate and validate the request (the limits come next); raise MetrionError to refuse it.

        `headers` is a lower-cased snapshot: mitmproxy's Headers scan every field on each lookup.
        """
        assert self.config is not None and self.writer is not None
        route = exchange.route
        exchange.requester = requester(headers)
        if host_provider(flow.request.host, flow.request.port, self._hosts) is not None:
            identity = self._tunnels.get(flow.client_conn) or identify_forward(
                headers.get("proxy-authorization"), self._tokens
            )
            credentials = None
        else:
            identity, credentials = authenticate(route.provider, headers, self._tokens, route.format)
        exchange.identity = identity
        exchange.request = inspect_body(
            route, flow.request.method, headers.get("content-type", ""), flow.request.raw_content or b""
        )
        scope = cache.scope(identity.token_name, identity.mode, headers, self.config.cache.share_across_tokens)
        include_usage = self.config.providers[route.provider].include_usage
        exchange.cache = cache.plan(headers, scope, route, flow.request.method, exchange.request,
                                    flow.request.raw_content or b"", include_usage)
        if trouble := self.writer.trouble:
            raise MetrionError(503, "metering_unavailable", "Metrion cannot record usage right now "
                               f"({trouble}); request not forwarded.")
        return credentials

    def _release(self, hold: Hold | None) -> None:
        if hold is not None and self.writer is not None and (state := self.budgets.release(hold)) is not None:
            self.writer.put(state)

    def _forward(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        assert self.config is not None
        request, route = flow.request, exchange.route
        asks = self.config.providers[route.provider].include_usage
        if exchange.request and exchange.request.parsed is not None and needs_stream_usage(
            route, exchange.request, asks
        ):
            request.content = with_stream_usage(request.raw_content or b"", exchange.request.parsed)
            exchange.hide_usage_chunk = True
        request.scheme, request.host, request.port, request.path = _target(route.upstream_url)  # in this order
        exchange.forwarded = True
        self._timers[flow.id] = IdleTimer(self.config.timeout, lambda: self._time_out(flow))
        token = exchange.identity.token_name if exchange.identity else None
        flow.metadata["metrion"] = {"provider": route.provider, "token": token}

    # the answer's way down

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        _redact_flow(flow)
        if exchange.failure is None:  # Metrion's own answers carry these already
            limits = tuple((name.encode(), value.encode()) for name, value in exchange.limit_headers.items())
            flow.response.headers.fields += limits
        timer = self._timers.get(flow.id)
        if timer is None:
            return
        timer.touch()
        content_type = flow.response.headers.get("content-type", "")
        if tap := stream_tap(exchange, flow.response.status_code, content_type, timer.touch):
            flow.response.stream = GuardedStream(tap, lambda: tap.held_back,
                                                 functools.partial(self._note_internal_error, flow.id))
        if exchange.cache is not None and exchange.cache_hit is None and self.config is not None:
            exchange.cache_told = cache.outcome(exchange.cache)
            flow.response.headers[cache.HEADER] = exchange.cache_told.value
            if exchange.stream is not None:
                flow.response.stream = cache.StreamRecorder(flow.response.stream, self.config.cache.max_entry_bytes)

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        self._stop_timer(flow.id)
        _redact_flow(flow)
        response = flow.response
        body = None if exchange.stream is not None else _plain_body(response)
        if exchange.failure is not None:
            error = exchange.failure.message
        elif response.status_code >= 400:
            error = f"provider: {provider_error_message(body) or response.reason}"
        else:
            error = None
        start = flow.request.timestamp_start
        # A whole answer settles at its cost; so does a connection that never opened (nothing reached the provider).
        settles = exchange.failure is None or flow.server_conn.timestamp_tcp_setup is None
        record = self._record(
            flow, exchange, status=response.status_code, body=body, error=error,
            latency_ms=((response.timestamp_end or time.time()) - start) * 1000,
            ttfb_ms=None if exchange.failure else (response.timestamp_start - start) * 1000, complete=settles,
        )
        if exchange.cache is not None and exchange.cache_hit is None:
            self._store_reply(response, exchange, record)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None:
            return
        self._stop_timer(flow.id)
        _redact_flow(flow)
        message = flow.error.msg if flow.error else "unknown error"
        if exchange.timed_out and self.config is not None:
            message = f"upstream silent for {self.config.timeout:g} s; connection closed"
        elif message == "Client disconnected.":
            message = disconnect_error(exchange)  # None once the provider's terminal event reached the client
        response = flow.response
        start = flow.request.timestamp_start
        self._record(
            flow, exchange, status=response.status_code if response else None, body=None,
            error=message, latency_ms=(time.time() - start) * 1000,
            ttfb_ms=(response.timestamp_start - start) * 1000 if response and response.timestamp_start else None,
        )

    # timeouts and upstream failures

    @guarded
    def _time_out(self, flow: http.HTTPFlow) -> None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None:
            return
        exchange.timed_out = True
        if not cancel_upstream(flow):
            log.warning("metrion: flow %s timed out but had no upstream connection to close", flow.id)

    @guarded
    def _body_data(self, flow: http.HTTPFlow) -> None:
        """Any byte from the provider means it is not silent, body bytes of a buffered reply included."""
        if timer := self._timers.get(flow.id):
            timer.touch()

    @guarded
    def _answer_upstream_failure(self, flow: http.HTTPFlow, message: str) -> http.Response | None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None or self.config is None:
            return None
        if exchange.timed_out:
            error = MetrionError(504, "upstream_timeout",
                                 f"The provider did not respond within {self.config.timeout:g} s.")
        else:
            error = MetrionError(502, "upstream_unreachable", f"Metrion could not reach the provider: {message}")
        exchange.failure = error
        flow.marked = _REJECTED_MARK
        return self._error_response(exchange.route.format, error, exchange)

    def _stop_timer(self, flow_id: str) -> None:
        if timer := self._timers.pop(flow_id, None):
            timer.cancel()

    # rows and annotations

    def _record(self, flow: http.HTTPFlow | None, exchange: Exchange, *, status: int | None, body: bytes | None,
                error: str | None, latency_ms: float | None = None, ttfb_ms: float | None = None,
                flow_id: str | None = None, complete: bool = False) -> store.RequestRecord:
        flow_id = flow.id if flow else flow_id
        record = build_record(exchange, status=status, body=body, latency_ms=latency_ms, ttfb_ms=ttfb_ms,
                              error=error, flow_id=flow_id)
        if exchange.cache is not None:
            record = cache.account(record, exchange.cache_told, exchange.cache_hit)
        if flow is not None:
            flow.metadata["metrion"] = metadata(record)
            flow.comment = summary(record)
            if self._loop is not None:  # a UI will want the cost once the row is priced
                self._flows[flow.id] = flow
        self._put(flow_id, record, complete)
        return record

    def _store_reply(self, response: http.Response, exchange: Exchange, record: store.RequestRecord) -> None:
        assert exchange.cache is not None and self.config is not None
        recorder = response.stream if isinstance(response.stream, cache.StreamRecorder) else None
        body = recorder.body if recorder is not None else response.raw_content
        meter = exchange.stream
        entry = cache.entry_for(exchange.cache, record, _lowercase(response.headers), body, stream=meter is not None,
                                complete=meter is None or meter.complete, now=self.clock(),
                                max_bytes=self.config.cache.max_entry_bytes)
        if entry is not None and self.cache is not None:
            self.cache.put(entry, record)

    def _put(self, flow_id: str | None, record: store.RequestRecord, complete: bool = False) -> None:
        """Hand the row to the writer; the exchange is finished only now (contain() looks for unfinished ones).

        `complete`: the provider's whole answer arrived, so the row's cost replaces its budget reservation.
        """
        self._exchanges.pop(flow_id or "", None)
        self.budgets.finish(flow_id, complete)  # before the writer can see the row
        if self.writer is not None:
            self.writer.put(record)

    # failures of Metrion's own code (guard.py)

    def contain(self, hook: str, arg: object, description: str) -> None:
        """An unexpected exception in `hook`: never forward the request, always leave its row."""
        if hook == "_abandon" and isinstance(arg, str):
            self._put(arg, fallback_record(self._exchanges[arg], None, description))
        if not isinstance(arg, http.HTTPFlow):
            return  # lifecycle and connection hooks: the guard logged it; no request is waiting on them
        flow = arg
        if hook in _REQUEST_HOOKS:
            self._refuse_after_internal_error(flow, description)
        elif hook in _FINAL_HOOKS:
            self._stop_timer(flow.id)
            _redact_flow(flow)
            if exchange := self._exchanges.get(flow.id):
                status = flow.response.status_code if flow.response else None
                self._put(flow.id, fallback_record(exchange, status, description))
        else:
            self._note_internal_error(flow.id, description)

    def _refuse_after_internal_error(self, flow: http.HTTPFlow, description: str) -> None:
        self._stop_timer(flow.id)
        flow.metadata.pop("metrion", None)
        error = MetrionError(500, "metrion_internal_error",
                             f"Metrion failed while handling this request ({description}); it was not forwarded.")
        exchange = self._exchanges.get(flow.id) or self._exchange_after_internal_error(flow)
        error_format = exchange.route.format if exchange else None
        if exchange is not None:
            exchange.failure = error
        flow.response = self._error_response(error_format, error, exchange)
        flow.marked = _REJECTED_MARK
        headers = flow.request.headers
        _rewrite(headers, {name.decode("latin-1").lower() for name, _ in headers.fields
                           if name.lower().startswith(b"x-metrion-")}, {})
        _redact(headers)

    def _exchange_after_internal_error(self, flow: http.HTTPFlow) -> Exchange | None:
        """The exchange of a request that failed before Metrion routed it; None if it is no provider route."""
        if self.config is None or flow.request.method == "CONNECT":
            return None
        path, _ = lift_query_key(flow.request.path)
        route = None
        if provider := host_provider(flow.request.host, flow.request.port, self._hosts):
            route = route_provider_host(provider, flow.request.host, path, self._urls)
        elif is_metrion_path(path):
            route = route_metrion_path(path, self._urls)
        if route is None:
            return None
        flow.request.path = path  # a ?key= never stays in the flow
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.clock(),
                            requester=requester({"x-metrion-user": flow.request.headers.get("x-metrion-user", "")}))
        self._exchanges[flow.id] = exchange
        return exchange

    def _note_internal_error(self, flow_id: str, description: str) -> None:
        """Metering failed mid-answer: the answer goes on, and the row will say why its usage may be missing."""
        if exchange := self._exchanges.get(flow_id):
            exchange.internal_error = description

    def _written(self, records: list[store.RequestRecord]) -> None:
        """Called on the writer thread once rows are written: count them, let alert rules look again, and show
        their cost in mitmweb."""
        self.metrics.rows_written(records)
        if self.monitor is not None:
            self.monitor.poke()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._annotate, records)

    def _annotate(self, records: list[store.RequestRecord]) -> None:
        flows = []
        for record in records:
            flow = self._flows.pop(record.flow_id, None) if record.flow_id else None
            if flow is not None:
                flow.metadata["metrion"] = metadata(record)
                flow.comment = summary(record)
                flows.append(flow)
        if flows:
            ctx.master.addons.trigger(hooks.UpdateHook(flows))

    def _error_response(self, error_format: str | None, error: MetrionError, exchange: Exchange | None = None
                        ) -> http.Response:
        headers = {**(exchange.limit_headers if exchange else {}), **error_headers(error)}
        return http.Response.make(error.status, error_body(error_format, error), headers)


def _pricing(config: Config) -> tuple[Pricer, Pricer, dict[str, TokenBudget], Callable[[str, str], int | None]]:
    """`config`'s row pricer (warmed), the budgets' own pricer, the token budgets and the context-window lookup."""
    price_ids = {name: provider.price_as for name, provider in config.providers.items()}
    pricer = Pricer(config.prices, price_ids)
    pricer.warm()
    limits = {token.name: (config.budget_usd(token), config.unpriced(token)) for token in config.tokens}
    return (pricer, Pricer(config.prices, price_ids), token_budgets(limits),
            functools.partial(context_window, price_ids))


def _caps(config: Config) -> dict[str, int | None]:
    return {name: plan.monthly_requests for name, plan in config.plans.items()}


def _open_database(config: Config) -> store.Log:
    try:
        return store.open_log(config.database, config.spool.directory, config.spool.max_bytes)
    except (*store.Error, OSError) as e:
        error = str(e).strip().replace("\n", " ")
        raise ConfigError(f"{config.path}: database: cannot use {store.shown(config.database)}: {error}") from e


def _claim_database(config: Config) -> store.Ownership:
    try:
        return store.claim(config.database)
    except store.DatabaseInUse as e:
        raise ConfigError(f"{config.path}: database: {e}") from e


def _refuse_to_start(line: str) -> NoReturn:
    """Print `line` and end the process now: mitmproxy would log a traceback for a script and listen anyway.

    os._exit, because SystemExit raised in a script's configure is swallowed by mitmproxy's script loader task.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(2)


def _replayed(replay: cache.Replay) -> http.Response:
    now = time.time()
    reason = status_codes.RESPONSES.get(replay.status, "").encode()
    return http.Response(b"HTTP/1.1", replay.status, reason, http.Headers(replay.headers), replay.body, None, now, now)


def _plain_body(response: http.Response) -> bytes | None:
    if "content-encoding" not in response.headers:
        return response.raw_content
    try:
        return response.content  # decoded: the provider ignored accept-encoding: identity
    except ValueError:
        return response.raw_content


def _lowercase(headers: http.Headers) -> dict[str, str]:
    """The request headers as a plain dict with lower-case names (read from the raw fields: fast)."""
    return {name.decode("latin-1").lower(): value.decode("utf-8", "surrogateescape") for name, value in headers.fields}


def _rewrite(headers: http.Headers, drop: set[str], replace: dict[str, str]) -> None:
    """Drop and replace request headers in one pass over the raw fields (each Headers call is a full scan)."""
    gone = {name.encode() for name in (*drop, *replace)}
    kept = tuple(field for field in headers.fields if field[0].lower() not in gone)
    headers.fields = kept + tuple((name.encode(), value.encode()) for name, value in replace.items())


@functools.lru_cache(maxsize=256)
def _target(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), path


def _redact_flow(flow: http.HTTPFlow) -> None:
    """Once the request is sent (or refused): no credential header or credential query parameter stays in it."""
    _redact(flow.request.headers)
    path = flow.request.path
    if "?" in path and (redacted := redact_query(path)) != path:
        flow.request.path = redacted


def _redact(headers: http.Headers) -> None:
    """Keep secrets out of mitmweb, saved flows and logs once they have been used (idempotent)."""
    fields = headers.fields
    for i, (name, value) in enumerate(fields):
        if name.lower() in _CREDENTIAL_HEADERS and not value.endswith(_REDACTED):
            scheme, _, secret = value.partition(b" ")
            kept = scheme + b" " if secret and scheme.lower() in (b"bearer", b"basic") else b""
            fields = (*fields[:i], (name, kept + _REDACTED), *fields[i + 1 :])
    headers.fields = fields


def _blocked(host: str) -> str:
    return f"Metrion: {host} is not an AI provider host, and this proxy blocks other hosts."


__all__ = ["Metrion", "contentview"]
addons = [Metrion(), FlowDisplay()]  # FlowDisplay after Metrion: it logs the refusals Metrion marked
