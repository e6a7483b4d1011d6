"""The dashboard's routes: each page is a template fed by one JSON endpoint, fed by one query function.

Views open the database read-only per request, read the filters from the URL, and hand plain data on.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from metrion_addon import aggregates, alerts, queries
from metrion_addon.clock import Clock
from metrion_addon.config import Config
from metrion_addon.dashboard import pages
from metrion_addon.dashboard.access import PasswordRequired
from metrion_addon.dashboard.filters import PERIODS, View, read_view
from metrion_addon.dashboard.formats import FILTERS
from metrion_addon.store import Error as DatabaseError
from metrion_addon.store import Unavailable, read_only
from metrion_addon.store import shown as shown_database

HERE = Path(__file__).parent
NEEDED_TABLES = ("requests", "hourly_usage", "hourly_latency", "monthly_usage", "rate_buckets")
Loader = Callable[[sqlite3.Connection, View, Config, datetime], Any]


@dataclass(frozen=True)
class Page:
    name: str
    title: str
    path: str
    load: Loader


PAGES = (
    Page("overview", "Overview", "/", lambda conn, view, config, now: pages.overview(conn, view.filters)),
    Page("logs", "Logs", "/logs",
         lambda conn, view, config, now: pages.logs(conn, view.filters, view.cursor, view.offset)),
    Page("latency", "Latency", "/latency", lambda conn, view, config, now: pages.latency(conn, view.filters)),
    Page("errors", "Errors", "/errors", lambda conn, view, config, now: pages.errors(conn, view.filters)),
    Page("costs", "Costs", "/costs", lambda conn, view, config, now: pages.costs(conn, view.filters, now)),
    Page("tokens", "Tokens", "/tokens",
         lambda conn, view, config, now: pages.tokens(conn, config, view.filters, now)),
    Page("alerts", "Alerts", "/alerts", lambda conn, view, config, now: alerts.status(conn, config, now.timestamp())),
)


def open_database(database: Path | str) -> Any:
    """The request log, read-only; Unavailable until the proxy has created it with its aggregates."""
    conn = read_only(database, NEEDED_TABLES)
    if isinstance(conn, sqlite3.Connection):  # aggregates are read in ranges: map them instead of copying pages
        conn.execute("PRAGMA mmap_size = 268435456")
        if not aggregates.tables_current(conn):  # (PostgreSQL logs are younger than the aggregates' last change)
            conn.close()
            raise Unavailable(f"{database} holds an older Metrion's aggregate tables: start the proxy once "
                              "(it rebuilds them)")
    return conn


def create_app(config: Config, clock: Clock) -> Starlette:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(FILTERS)

    def load(request: Request, page: Page, choices: bool) -> tuple[View, Any, dict[str, list[str]]]:
        """The page's data, and (for a page, not its JSON) what the filter bar offers."""
        now = datetime.fromtimestamp(clock(), UTC)
        view = read_view(request.query_params, now, config.providers)
        conn = open_database(config.database)
        try:
            offered = pages.filter_choices(conn, config, view.filters) if choices else {}
            return view, page.load(conn, view, config, now), offered
        finally:
            conn.close()

    def endpoint(page: Page) -> Callable[[Request], Response]:
        def api(request: Request) -> Response:
            try:
                view, data, _ = load(request, page, choices=False)
            except ValueError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except (Unavailable, *DatabaseError) as e:
                return JSONResponse({"error": str(e)}, status_code=503)
            return JSONResponse({"filters": view.filters.__dict__ | {"period": view.period}, "data": data})

        return api

    def screen(page: Page) -> Callable[[Request], Response]:
        def html(request: Request) -> Response:
            context: dict[str, Any] = {"pages": PAGES, "page": page, "periods": PERIODS, "params": {}}
            try:
                view, data, choices = load(request, page, choices=True)
            except ValueError as e:
                return templates.TemplateResponse(request, "problem.html", {**context, "problem": str(e)}, 400)
            except (Unavailable, *DatabaseError) as e:
                return templates.TemplateResponse(request, "problem.html", {**context, "problem": str(e)}, 503)
            context.update(view=view, data=data, choices=choices, params=view.params, api=f"/api/{page.name}")
            return templates.TemplateResponse(request, f"{page.name}.html", context)

        return html

    def log_row(request: Request) -> Response:
        try:
            conn = open_database(config.database)
        except Unavailable as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        try:
            row = queries.log_row(conn, int(request.path_params["row_id"]))
        finally:
            conn.close()
        return JSONResponse(row) if row else JSONResponse({"error": "no such row"}, status_code=404)

    routes = [
        *(Route(page.path, screen(page), name=page.name) for page in PAGES),
        *(Route(f"/api/{page.name}", endpoint(page)) for page in PAGES),
        Route("/api/logs/{row_id:int}", log_row),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(PasswordRequired, settings=config.dashboard)] if config.dashboard.protected else []
    return Starlette(routes=routes, middleware=middleware)


def serve(config: Config, clock: Clock, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Listen on host:port (port 0 picks a free one), announce the URL once listening, serve until a signal."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    database = shown_database(config.database)
    announce(f"metrion: dashboard at http://{shown}:{sock.getsockname()[1]}/ (database {database})")
    server = uvicorn.Server(uvicorn.Config(create_app(config, clock), log_level="warning", access_log=False))
    server.run(sockets=[sock])
