"""The request's way up: route it, check who sends it, reserve its budget and count its limits (locally, or on
Redis in one awaited round trip), answer it from the response cache, then send it on (forwarding.py) or refuse it.

A refusal is a provider-shaped error; whatever happens, the exchange is in the recorder so its row is written.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine

from mitmproxy import http

from metrion_addon import cache
from metrion_addon.auth import Upstream, authenticate, forbid_stray_metrion_token, lift_query_key, requester
from metrion_addon.budgets import COMMIT_WAIT, SETTLING_WAIT, Hold, needs_disk
from metrion_addon.errors import MetrionError
from metrion_addon.forward_proxy import ForwardProxy
from metrion_addon.forwarding import Forwarding
from metrion_addon.guard import guarded_coroutine
from metrion_addon.headers import lowercase, redact_request
from metrion_addon.limits import Admission
from metrion_addon.metering import Exchange
from metrion_addon.recording import Recorder
from metrion_addon.redact import redact_query
from metrion_addon.request_body import inspect_body
from metrion_addon.responses import answer_with_error, error_response, replayed
from metrion_addon.routes import Route, is_metrion_path, route_metrion_path, route_provider_host
from metrion_addon.shared_budgets import admit_on_redis
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.timeouts import Timeouts


class Gate:
    def __init__(self, recorder: Recorder, forward_proxy: ForwardProxy, timeouts: Timeouts,
                 contain: Callable[[str, object, str], None]) -> None:
        self.runtime = recorder.runtime
        self.recorder = recorder
        self.forward_proxy = forward_proxy
        self.forwarding = Forwarding(self.runtime, timeouts)
        self.contain = contain  # guard.py hands a failure of the coroutines below to the addon's containment

    def request(self, flow: http.HTTPFlow) -> Coroutine[None, None, None] | None:
        """Admit and forward `flow`, or answer it; a coroutine when the answer needs an awaited lookup."""
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
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.runtime.clock(),
                            secret_sources=((headers, original_path),))
        self.recorder.exchanges[flow.id] = exchange
        try:
            credentials = self._check(flow, exchange, headers)
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return None
        entries = self.runtime.cache
        if exchange.cache is not None and exchange.cache.mode is cache.Mode.LOOKUP and entries is not None:
            return self._request_cached(flow, entries, exchange, headers, credentials)
        return self._admit(flow, exchange, headers, credentials)

    def _route(self, flow: http.HTTPFlow, path: str) -> Route | None:
        urls = self.runtime.urls
        if provider := self.forward_proxy.provider(flow):
            return route_provider_host(provider, flow.request.host, path, urls)
        if not is_metrion_path(path):
            self.forward_proxy.pass_other_host(flow)
            return None
        route = route_metrion_path(path, urls)
        if route is None:
            others = ",".join(name for name in urls if name != "anthropic")
            error = MetrionError(404, "unknown_route", f"Metrion has no route {path.split('?')[0]!r}: "
                                 f"use /api/proxy/v1/messages or /api/proxy/{{{others}}}/v1/...")
            flow.response = error_response(None, error)
        return route

    def _check(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str]) -> Upstream | None:
        """Authenticate and validate the request (the limits come next); raise MetrionError to refuse it.

        `headers` is a lower-cased snapshot: mitmproxy's Headers scan every field on each lookup.
        """
        config, writer = self.runtime.config, self.runtime.writer
        assert config is not None and writer is not None
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
        scope = cache.scope(identity.token_name, identity.mode, headers, config.cache.share_across_tokens)
        include_usage = config.providers[route.provider].include_usage
        exchange.cache = cache.plan(headers, scope, route, flow.request.method, exchange.request,
                                    flow.request.raw_content or b"", include_usage)
        if trouble := writer.trouble:
            raise MetrionError(503, "metering_unavailable", "Metrion cannot record usage right now "
                               f"({trouble}); request not forwarded.")
        return credentials

    def _admit(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str],
               credentials: Upstream | None, settled: bool = False) -> Coroutine[None, None, None] | None:
        """Reserve the budget and count the limits, then forward; a coroutine when the limits live on Redis, when
        the reservation must reach the disk first, or when a budget refusal waits for finished requests to settle
        (`settled`: that wait is over)."""
        assert exchange.identity is not None
        name, budgets = exchange.identity.token_name, self.runtime.budgets
        settled_before = budgets.settlements(name)  # a settle after this may make the refusal below premature
        try:
            now = self.runtime.clock()
            if self.runtime.shared is not None:
                return self._request_shared(flow, self.runtime.shared, exchange, headers, credentials, now)
            hold = self._hold(flow, exchange, now)
            try:
                admission = self.runtime.limits.admit(name, exchange.identity.plan, now)
            except MetrionError:
                self._release(hold)
                raise
        except MetrionError as e:
            if not settled and e.code == "budget_exceeded" and budgets.settling(name, settled_before):
                return self._admit_once_settled(flow, exchange, headers, credentials)
            self._refuse(flow, exchange, e)
            return None
        if needs_disk(hold):
            return self._let_through_on_disk(flow, exchange, admission, hold, headers, credentials)
        self.forwarding.let_through(flow, exchange, admission, hold, headers, credentials)
        return None

    @guarded_coroutine("request")
    async def _admit_once_settled(self, flow: http.HTTPFlow, exchange: Exchange, headers: dict[str, str],
                                  credentials: Upstream | None) -> None:
        """Refused while finished requests of the token still held their whole reservation: ask again once their rows
        settled them (at most SETTLING_WAIT later), so back-to-back requests are refused only when the budget is."""
        assert exchange.identity is not None
        await self.runtime.budgets.until_settled(exchange.identity.token_name, SETTLING_WAIT)
        if (admitting := self._admit(flow, exchange, headers, credentials, settled=True)) is not None:
            await admitting

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
        self.forwarding.let_through(flow, exchange, admission, dataclasses.replace(hold, saved=None), headers,
                                    credentials)

    @guarded_coroutine("request")
    async def _request_cached(self, flow: http.HTTPFlow, entries: cache.CacheStore, exchange: Exchange,
                              headers: dict[str, str], credentials: Upstream | None) -> None:
        """Answer from the response cache (rate bucket only: the monthly cap counts what reached a provider)."""
        assert exchange.cache is not None and exchange.identity is not None
        clock = self.runtime.clock
        hit = await entries.get(exchange.cache.key, clock())
        if hit is None:
            if (admitting := self._admit(flow, exchange, headers, credentials)) is not None:
                await admitting
            return
        name, plan = exchange.identity.token_name, exchange.identity.plan
        try:
            if self.runtime.shared is not None:
                admission = await self.runtime.shared.admit(name, plan, clock(), counts=False)
            else:
                admission = self.runtime.limits.admit_cached(name, plan, clock())
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return
        assert self.runtime.writer is not None
        for state in admission.saved:
            self.runtime.writer.put(state)
        exchange.limit_headers, exchange.cache_hit, exchange.cache_told = admission.headers, hit, cache.Outcome.HIT
        flow.response = replayed(cache.replay(hit, clock()))
        redact_request(flow.request)

    @guarded_coroutine("request")
    async def _request_shared(self, flow: http.HTTPFlow, shared: SharedLimits, exchange: Exchange,
                              headers: dict[str, str], credentials: Upstream | None, now: float) -> None:
        """Admit on Redis; a budget refusal while this instance's finished requests of the token still hold their
        whole reservation asks again once they settled (the script refuses a budget before counting the limits)."""
        identity, budgets = exchange.identity, self.runtime.budgets
        assert identity is not None

        def admit(now: float) -> Coroutine[None, None, tuple[Hold | None, Admission]]:
            return admit_on_redis(budgets, shared, identity.token_name, identity.plan, now, exchange.route,
                                  flow.request.method, flow.request.raw_content or b"", exchange.request)

        try:
            settled_before = budgets.settlements(identity.token_name)
            try:
                hold, admission = await admit(now)
            except MetrionError as e:
                if e.code != "budget_exceeded" or not budgets.settling(identity.token_name, settled_before):
                    raise
                await budgets.until_settled(identity.token_name, SETTLING_WAIT)
                hold, admission = await admit(self.runtime.clock())
        except MetrionError as e:
            self._refuse(flow, exchange, e)
            return
        self.forwarding.let_through(flow, exchange, admission, hold, headers, credentials)

    def _hold(self, flow: http.HTTPFlow, exchange: Exchange, now: float) -> Hold | None:
        """Reserve the most the request can cost from the token's dollar budget (raise 429 if it does not fit)."""
        assert exchange.identity is not None
        return self.runtime.budgets.admit(exchange.identity.token_name, now, exchange.route, flow.request.method,
                                          flow.request.raw_content or b"", exchange.request)

    def _release(self, hold: Hold | None) -> None:
        writer = self.runtime.writer
        if hold is not None and writer is not None and (state := self.runtime.budgets.release(hold)) is not None:
            writer.put(state)

    def _refuse(self, flow: http.HTTPFlow, exchange: Exchange, error: MetrionError) -> None:
        self.runtime.metrics.rejected(error.code)
        exchange.failure = error
        answer_with_error(flow, exchange.route.format, error, exchange)
        redact_request(flow.request)
