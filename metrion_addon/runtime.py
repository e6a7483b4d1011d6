"""What a loaded config runs: the writer, response cache, alert monitor, limits and dollar budgets (each local or on
Redis) and the routing tables; opened in `configure`, changed in place on reload, closed at shutdown.

No mitmproxy imports: the addon turns a ConfigError raised here into its one-line refusal or an OptionsError.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from metrion_addon import cache, store
from metrion_addon.budgets import Budgets, MemoryBudgetCounters, TokenBudget, token_budgets
from metrion_addon.clock import Clock
from metrion_addon.config import Config, ConfigError, find_config, load_config
from metrion_addon.limits import Limits
from metrion_addon.metrics import Metrics
from metrion_addon.notify import AlertMonitor
from metrion_addon.pricing import Pricer, context_window
from metrion_addon.reload import ConfigWatcher, needs_restart
from metrion_addon.routes import provider_hosts
from metrion_addon.shared_budgets import SharedBudgetCounters
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.store.cache import SQLiteCacheStore
from metrion_addon.store.redis_cache import RedisCacheStore

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, clock: Clock, metrics: Metrics,
                 on_written: Callable[[list[store.RequestRecord]], None]) -> None:
        self.clock = clock
        self.metrics = metrics
        self._on_written = on_written
        self.config: Config | None = None
        self.writer: store.Writer | None = None
        self.log: store.Log | None = None  # the request log the writer writes: SQLite or PostgreSQL
        self.cache: cache.CacheStore | None = None
        self.monitor: AlertMonitor | None = None
        self.limits = Limits(1, {})
        self.shared: SharedLimits | None = None  # the limits on Redis, when the config has `shared:`
        self.budgets = Budgets({}, MemoryBudgetCounters(), Pricer({}), lambda provider, model: None)
        self.tokens: dict = {}
        self.urls: dict[str, str] = {}
        self.hosts: dict[str, str] = {}  # provider hosts recognised in forward-proxy use
        self.upstream_hosts: set[str | None] = set()
        self._ownership: store.Ownership | None = None
        self._watcher: ConfigWatcher | None = None

    def open(self, path: str | None, on_change: Callable[[], None]) -> None:
        """Load the config at `path` (or the default one) and open everything it asks for, replacing what ran.

        Raises ConfigError (with the config's path) if the config, the database or Redis cannot be used.
        """
        config = load_config(find_config(path))
        self._close_writer()
        if config.shared is None:  # limits in Redis (`shared:`): several processes may share the database
            self._ownership = claim_database(config)
        opened = open_database(config)
        conn = opened.conn
        self._close_shared()
        self._stop_watching()
        buckets, months = store.load_counters(conn)
        caps = monthly_caps(config)
        self.limits = Limits(config.rate_limit, caps, buckets, months)
        pricer, budget_pricer, budgets, window = pricing(config)
        counters: MemoryBudgetCounters | SharedBudgetCounters = MemoryBudgetCounters(store.load_budgets(conn))
        if config.shared is not None:  # limits, budgets and the cache live in Redis
            shared = SharedLimits(config.shared, config.rate_limit, caps, config.limits_fingerprint(), months)
            try:
                shared.connect(self.clock())
            except ConfigError as e:
                raise ConfigError(f"{config.path}: {e}") from e
            self.shared = shared
            with contextlib.suppress(RuntimeError):  # no loop yet at start-up: start() starts it
                shared.start()
            counters = SharedBudgetCounters(shared, config.shared.redis, store.load_budgets(conn))
        self.budgets = Budgets(budgets, counters, budget_pricer, window)
        self.log = opened
        self.writer = store.Writer(opened.backend, price=pricer, on_written=self._on_written,
                                   settle=self.budgets.settle, settles_now=self.budgets.waits_for)
        self.writer.start()
        self.metrics.watch_backlog(lambda writer=self.writer: writer.backlog)
        self.metrics.watch_spool(lambda: opened.spool.rows if opened.spool else 0,
                                 lambda: opened.spool.bytes if opened.spool else 0)
        if self.shared is not None:
            self.cache = RedisCacheStore(self.shared.client, config.cache.max_bytes, pricer)
        else:  # SQLite: a PostgreSQL log always comes with shared limits
            self.cache = SQLiteCacheStore(Path(config.database), self.writer, config.cache.max_bytes)
        if config.alerts.rules:
            self.monitor = AlertMonitor(config.alerts, config.database, self.clock, self.writer.put,
                                        store.load_alert_history(conn))
            self.monitor.start()
        self._use(config)
        self._watcher = ConfigWatcher(config.path, on_change)
        with contextlib.suppress(RuntimeError):
            self._watcher.start()

    def start(self) -> None:
        """The event loop runs: start what needs it (the Redis client, the config watcher)."""
        if self.shared is not None:
            self.shared.start()
        if self._watcher is not None:
            self._watcher.start()

    def reload(self) -> None:
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
        pricer, budget_pricer, budgets, window = pricing(config)
        self.writer.reprice(pricer)
        if isinstance(self.cache, RedisCacheStore):
            self.cache.reprice(pricer)
        self.budgets.reconfigure(budgets, budget_pricer, window)
        caps = monthly_caps(config)
        self.limits.reconfigure(config.rate_limit, caps)
        if self.shared is not None:
            self.shared.reconfigure(config.rate_limit, caps, config.limits_fingerprint())
        if config.alerts != self.config.alerts:
            self._replace_monitor(config)
        self._use(config)
        log.info("metrion: reloaded %s: %d token(s)", config.path, len(config.tokens))

    def close(self) -> None:
        self._stop_watching()
        self._close_writer()
        self._close_shared()

    def _use(self, config: Config) -> None:
        """Route and authenticate by `config` from the next request on."""
        self.config = config
        self.tokens = config.token_by_hash()
        self.urls = {name: provider.url for name, provider in config.providers.items()}
        self.hosts = provider_hosts(self.urls)
        self.upstream_hosts = {urlsplit(url).hostname for url in self.urls.values()}

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
        if isinstance(self.budgets.counters, SharedBudgetCounters):
            self.budgets.counters.close()
        if self.shared is not None:
            self.shared.close()
            self.shared = None


def pricing(config: Config) -> tuple[Pricer, Pricer, dict[str, TokenBudget], Callable[[str, str], int | None]]:
    """`config`'s row pricer (warmed), the budgets' own pricer, the token budgets and the context-window lookup."""
    price_ids = {name: provider.price_as for name, provider in config.providers.items()}
    pricer = Pricer(config.prices, price_ids)
    pricer.warm()
    limits = {token.name: (config.budget_usd(token), config.unpriced(token)) for token in config.tokens}
    return (pricer, Pricer(config.prices, price_ids), token_budgets(limits),
            functools.partial(context_window, price_ids))


def monthly_caps(config: Config) -> dict[str, int | None]:
    return {name: plan.monthly_requests for name, plan in config.plans.items()}


def open_database(config: Config) -> store.Log:
    try:
        return store.open_log(config.database, config.spool.directory, config.spool.max_bytes)
    except (*store.Error, OSError) as e:
        error = str(e).strip().replace("\n", " ")
        raise ConfigError(f"{config.path}: database: cannot use {store.shown(config.database)}: {error}") from e


def claim_database(config: Config) -> store.Ownership:
    try:
        return store.claim(config.database)
    except store.DatabaseInUse as e:
        raise ConfigError(f"{config.path}: database: {e}") from e
    except OSError as e:  # its lock file cannot be made (a missing directory): the same refusal as the database's
        raise ConfigError(f"{config.path}: database: cannot use {config.database}: {e}") from e

