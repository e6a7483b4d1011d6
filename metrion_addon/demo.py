"""`make demo`: the mock providers, a real Metrion and its dashboard on a demo database, fed weeks of SDK traffic.

History goes through the proxy on a moving clock (METRION_CLOCK_FILE); Metrion then restarts on the real clock
for a live tour of every provider and a rate-limited burst, and all of it keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import yaml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from metrion_addon import workload
from metrion_addon.clock import iso_utc
from metrion_addon.config import PROVIDERS
from metrion_addon.mock_provider import MockProvider
from metrion_addon.workload import Call, Team

BIN = Path(sys.executable).parent
ADDON = Path(__file__).resolve().parent / "addon.py"
MARKER = ".metrion-demo"  # only a directory holding this file is ever wiped
STARTUP_SECONDS = 60.0  # a loaded 2-core machine can take this long to start mitmdump


class DemoError(Exception):
    """Something the demo cannot go on without, told in one line."""


@dataclass(frozen=True)
class Settings:
    """How much the demo does: weeks of history, a short run for the smoke test."""

    days: float
    scale: float  # traffic, against the workload's rates
    latency_scale: float  # provider latency, against realistic values
    rate_limit: int  # requests a minute per token
    burst: int  # calls the burst token sends at once
    slack_hours: float = 6.0  # how late a row older than two days may be stamped, so that calls overlap
    in_flight: int = 128  # history calls waiting on the mock at once

    def slack(self, now: float) -> Callable[[float], float]:
        """Exact times for the last two days (hourly charts), `slack_hours` before (daily charts)."""
        recent = now - 2 * workload.DAY
        return lambda moment: 0.0 if moment >= recent else self.slack_hours * workload.HOUR


FULL = Settings(days=28, scale=0.5, latency_scale=1.0, rate_limit=60, burst=80)
QUICK = Settings(days=1, scale=0.4, latency_scale=0.05, rate_limit=10, burst=15)


def token_value(name: str) -> str:
    """The demo's token for a team: derived from its name, so the same on every run."""
    return "sk-metrion-" + hashlib.sha256(f"metrion-demo:{name}".encode()).hexdigest()[:32]


def demo_config(
    database: Path, base_url: Callable[[str], str], teams: Iterable[Team], rate_limit: int, free_cap: int
) -> dict[str, Any]:
    """The demo's Metrion config: every provider on the mock, one token per team, stored keys for stored teams."""
    tokens = []
    for team in teams:
        entry: dict[str, Any] = {"name": team.token, "token": token_value(team.token), "plan": team.plan}
        if team.stored:
            entry["keys"] = {provider: f"sk-demo-stored-{provider}-key" for provider in PROVIDERS}
        tokens.append(entry)
    return {
        "database": str(database),
        "timeout": 30,
        "rate_limit": rate_limit,
        "plans": {
            "free": {"monthly_requests": free_cap},
            "team": {"monthly_requests": 5000},
            "pro": {"monthly_requests": None},
        },
        "providers": {provider: base_url(provider) for provider in PROVIDERS},
        "tokens": tokens,
    }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(clock_file: Path | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "METRION_CLOCK_FILE"}
    if clock_file is not None:
        env["METRION_CLOCK_FILE"] = str(clock_file)
    return env


@dataclass(frozen=True)
class Launched:
    """A process the demo started, and the log it writes to (from `offset` on for this start)."""

    process: subprocess.Popen[bytes]
    log: Path
    offset: int

    def wait_until(self, ready: Callable[[], bool], what: str) -> subprocess.Popen[bytes]:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                stop(self.process)
                raise DemoError(f"{what} did not start; its log is {self.log}")
            time.sleep(0.05)
        return self.process


def launch(command: list[str], workdir: Path, log_name: str, clock_file: Path | None) -> Launched:
    log = workdir / log_name
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                   env=_environment(clock_file))
    return Launched(process, log, offset)


def launch_proxy(workdir: Path, port: int, clock_file: Path | None) -> Launched:
    """mitmdump with the addon and the demo config."""
    return launch(
        [str(BIN / "mitmdump"), "-s", str(ADDON), "--set", f"metrion_config={workdir / 'config.yaml'}",
         "--set", f"confdir={workdir / 'confdir'}", "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", "connection_strategy=lazy", "--set", "flow_detail=0"],
        workdir, "mitmdump.log", clock_file,
    )


def proxy_ready(launched: Launched) -> subprocess.Popen[bytes]:
    return launched.wait_until(lambda: b"metrion: metering" in launched.log.read_bytes()[launched.offset :], "Metrion")


def launch_dashboard(workdir: Path, port: int) -> Launched:
    """`metrion dashboard` on the demo config, on the real clock."""
    return launch(
        [str(BIN / "metrion"), "dashboard", "--config", str(workdir / "config.yaml"), "--host", "127.0.0.1",
         "--port", str(port)],
        workdir, "dashboard.log", None,
    )


def dashboard_ready(launched: Launched, url: str) -> subprocess.Popen[bytes]:
    def answers() -> bool:
        try:
            httpx.get(url, timeout=2)
        except httpx.TransportError:
            return False
        return True

    return launched.wait_until(answers, "the dashboard")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, so that Metrion's writer flushes; SIGKILL if it does not exit within 15 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class MovingClock:
    """The proxy's clock while history is laid down: the METRION_CLOCK_FILE, moved before each call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, at: float) -> None:
        """Replace the file whole (the proxy must never read it half-written), stamped with the time itself:
        the proxy re-reads it when its mtime changes, and two writes can fall within one mtime tick."""
        draft = self.path.with_name(self.path.name + ".new")
        draft.write_text(iso_utc(at))
        stamp = round(at * 1e9)
        os.utime(draft, ns=(stamp, stamp))
        os.replace(draft, self.path)


# --------------------------------------------------------------------------- traffic


SDKClient = openai.AsyncOpenAI | anthropic.AsyncAnthropic | genai.Client


class Driver:
    """Sends workload calls through the proxy with the official SDKs (openai, anthropic, and google-genai for
    Gemini's native API), one client per token, provider and SDK."""

    def __init__(self, proxy_url: str, teams: Iterable[Team]) -> None:
        self.proxy_url = proxy_url
        self.teams = {team.token: team for team in teams}
        self.outcomes: Counter[str] = Counter()
        self._clients: dict[tuple[str, str, bool, bool], SDKClient] = {}

    def _client(self, call: Call) -> SDKClient:
        native = call.api == "native"
        key = (call.token, call.provider, call.bad_token, native)
        if key not in self._clients:
            token = workload.BAD_TOKEN if call.bad_token else token_value(call.token)
            if self.teams[call.token].stored or call.bad_token:
                api_key, headers = token, {}
            else:  # pass-through: the caller's own provider key, the Metrion token in a header
                api_key, headers = f"sk-demo-own-{call.provider}-key", {"x-metrion-token": token}
            options: dict[str, Any] = {"api_key": api_key, "default_headers": headers, "max_retries": 0, "timeout": 60}
            client: SDKClient
            if native:  # the SDK appends /v1beta/models/<model>:generateContent; its timeout is in milliseconds
                client = genai.Client(api_key=api_key, http_options=genai_types.HttpOptions(
                    base_url=f"{self.proxy_url}/api/proxy/gemini", headers=headers, timeout=60_000))
            elif call.provider == "anthropic":
                client = anthropic.AsyncAnthropic(base_url=f"{self.proxy_url}/api/proxy", **options)
            else:
                client = openai.AsyncOpenAI(base_url=f"{self.proxy_url}/api/proxy/{call.provider}/v1", **options)
            self._clients[key] = client
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await (client.aio.aclose() if isinstance(client, genai.Client) else client.close())
        self._clients.clear()

    async def send(self, call: Call) -> None:
        """Make the call and read it to the end; count how it went (failures are part of the demo)."""
        try:
            await self._send(call)
            outcome = "answered"
        except (openai.APIStatusError, anthropic.APIStatusError) as e:
            code = e.response.headers.get("x-metrion-error")
            outcome = f"refused by Metrion ({code})" if code else f"provider error {e.status_code}"
        except genai_errors.APIError as e:
            code = e.response.headers.get("x-metrion-error") if isinstance(e.response, httpx.Response) else None
            outcome = f"refused by Metrion ({code})" if code else f"provider error {e.code}"
        except Exception as e:  # a cut stream surfaces as whatever the SDK's HTTP stack raises
            outcome = f"cut short ({type(e).__name__})"
        self.outcomes[outcome] += 1

    async def _send(self, call: Call) -> None:
        client = self._client(call)
        system = workload.prompt_text(call.system_words, 2 * call.seq)
        user = workload.prompt_text(call.user_words, 2 * call.seq + 1)
        headers = {"x-metrion-user": call.requester, "x-mock-scenario": call.scenario, "x-demo-seq": str(call.seq)}
        result: Any
        if isinstance(client, genai.Client):
            config = genai_types.GenerateContentConfig(
                system_instruction=system, http_options=genai_types.HttpOptions(headers=headers))
            if call.stream:
                result = await client.aio.models.generate_content_stream(model=call.model, contents=user, config=config)
            else:
                result = await client.aio.models.generate_content(model=call.model, contents=user, config=config)
        elif isinstance(client, anthropic.AsyncAnthropic):
            cached = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
            result = await client.messages.create(
                model=call.model, max_tokens=1024, system=cached if call.cache else system,
                messages=[{"role": "user", "content": user}], stream=call.stream, extra_headers=headers,
            )
        elif call.api == "embeddings":
            result = await client.embeddings.create(model=call.model, input=[user], extra_headers=headers)
        else:
            extra: dict[str, Any] = {"prompt_cache_key": call.token} if call.cache and call.provider == "openai" else {}
            if call.api == "responses":
                result = await client.responses.create(
                    model=call.model, instructions=system, input=user, stream=call.stream, extra_headers=headers,
                    **extra,
                )
            else:
                if call.stream and call.provider in ("openai", "grok") and call.seq % 2:
                    extra["stream_options"] = {"include_usage": True}  # the rest get it from Metrion
                result = await client.chat.completions.create(
                    model=call.model, stream=call.stream, extra_headers=headers, **extra,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                )
        if call.stream:
            async for _ in result:
                pass


class Admissions:
    """Which calls the proxy has taken: forwarded (the mock saw their x-demo-seq header) or answered itself."""

    def __init__(self, mock: MockProvider) -> None:
        self.mock = mock
        self.seen: set[int] = set()
        self._read = 0

    def taken(self, call: Call, sending: asyncio.Task[None]) -> bool:
        received = self.mock.received
        for item in received[self._read :]:
            if seq := item.headers.get("x-demo-seq"):
                self.seen.add(int(seq))
        self._read = len(received)
        return call.seq in self.seen or sending.done()

    async def wait(self, call: Call, sending: asyncio.Task[None], timeout: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not self.taken(call, sending):
            if time.monotonic() > deadline:
                raise DemoError(f"Metrion neither forwarded nor answered call {call.seq} within {timeout:g} s")
            await asyncio.sleep(0.001)


async def lay_history(
    driver: Driver, admissions: Admissions, clock: MovingClock, calls: list[Call], in_flight: int,
    slack: Callable[[float], float],
) -> None:
    """Each call at its own moment through the proxy's clock, many at once where the time allows it.

    The clock moves to a call's moment only once every call planned more than `slack(moment)` seconds before it
    has been taken by the proxy, so no row is stamped more than that late; a slack of 0 makes every stamp exact.
    """
    slots = asyncio.Semaphore(in_flight)
    untaken: deque[tuple[Call, asyncio.Task[None]]] = deque()
    sending = []
    for call in calls:
        assert call.at is not None
        while untaken and (admissions.taken(*untaken[0]) or untaken[0][0].at < call.at - slack(call.at)):
            await admissions.wait(*untaken.popleft())
        await slots.acquire()
        clock.set(call.at)
        task = asyncio.create_task(driver.send(call))
        task.add_done_callback(lambda _: slots.release())
        sending.append(task)
        untaken.append((call, task))
    await asyncio.gather(*sending)


def wait_for_rows(database: Path, count: int, timeout: float = 30.0) -> int:
    """Rows in the request log once the writer has caught up with `count` calls (one row each)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        if rows >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# --------------------------------------------------------------------------- the run


def prepare(workdir: Path) -> None:
    """A fresh demo directory; refuses to wipe one the demo did not make."""
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise DemoError(f"{workdir} exists and is not a demo directory: choose another with --dir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("Made by `make demo`; wiped by the next run.\n")


def say(text: str) -> None:
    print(text, flush=True)


def outcome_line(outcomes: Counter[str]) -> str:
    return ", ".join(f"{count} {what}" for what, count in sorted(outcomes.items(), key=lambda item: -item[1]))


@dataclass
class Running:
    """What the demo leaves running: the in-process mock, Metrion and the dashboard."""

    mock: MockProvider
    proxy: subprocess.Popen[bytes] | None = None
    dashboard: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        stop(self.dashboard)
        stop(self.proxy)
        self.mock.stop()


def run(workdir: Path, settings: Settings, dashboard_port: int, seed: int) -> Running:
    """Start everything, drive the traffic, print where to look; returns what is left running."""
    prepare(workdir)
    teams = workload.TEAMS
    now = time.time()
    history = workload.history(seed, now - settings.days * workload.DAY, now - 60, teams, settings.scale,
                               settings.latency_scale)
    live = workload.live(seed, len(history), teams, settings.latency_scale)
    burst_team = next(team for team in teams if team.token == "ci-bot")
    burst = workload.burst(len(history) + len(live), settings.burst, burst_team)
    database = workdir / "metrion.db"
    clock = MovingClock(workdir / "clock")
    clock.set(now - settings.days * workload.DAY)
    port = free_port()
    proxy_url = f"http://127.0.0.1:{port}"
    running = Running(MockProvider())
    running.mock.start()
    try:
        config = demo_config(database, running.mock.base_url, teams, settings.rate_limit,
                             workload.monthly_cap(history, "hackathon", now))
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        say(f"mock providers on 127.0.0.1:{running.mock.port}; starting Metrion on {proxy_url} with a moving clock")
        proxy, dashboard = launch_proxy(workdir, port, clock.path), launch_dashboard(workdir, dashboard_port)
        running.proxy, running.dashboard = proxy.process, dashboard.process  # stopped whatever happens next
        dashboard_url = f"http://127.0.0.1:{dashboard_port}/"
        proxy_ready(proxy)
        dashboard_ready(dashboard, dashboard_url)
        say(f"dashboard on {dashboard_url} (it fills as the history is laid down)")
        driver = Driver(proxy_url, teams)
        started = time.monotonic()
        asyncio.run(_history(driver, Admissions(running.mock), clock, history, settings.in_flight,
                             settings.slack(now)))
        say(f"history: {len(history)} calls over {settings.days:g} days in {time.monotonic() - started:.1f} s: "
            f"{outcome_line(driver.outcomes)}")
        stop(running.proxy)
        restarted = launch_proxy(workdir, port, None)
        running.proxy = restarted.process
        proxy_ready(restarted)
        driver.outcomes.clear()
        asyncio.run(_now(driver, live, burst))
        say(f"now: a tour of {len(live)} calls and a burst of {len(burst)} from {burst_team.token}: "
            f"{outcome_line(driver.outcomes)}")
        total = len(history) + len(live) + len(burst)
        rows = wait_for_rows(database, total)
        if rows < total:
            raise DemoError(f"{total} calls went through Metrion but only {rows} rows were written")
        running.mock.received.clear()  # the demo keeps running: don't keep what it sent
        running.mock.sent.clear()
    except BaseException:
        running.stop()
        raise
    say(summary(workdir, proxy_url, dashboard_port))
    return running


async def _history(driver: Driver, admissions: Admissions, clock: MovingClock, calls: list[Call], in_flight: int,
                   slack: Callable[[float], float]) -> None:
    try:
        await lay_history(driver, admissions, clock, calls, in_flight, slack)
    finally:
        await driver.close()  # the proxy restarts: its connections go with it


async def _now(driver: Driver, live: list[Call], burst: list[Call]) -> None:
    try:
        await asyncio.gather(*(driver.send(call) for call in live))
        await asyncio.gather(*(driver.send(call) for call in burst))
    finally:
        await driver.close()


def summary(workdir: Path, proxy_url: str, dashboard_port: int) -> str:
    config = workdir / "config.yaml"
    metrion = BIN / "metrion"
    token = token_value("web-app")
    return f"""
Metrion demo is running; Ctrl-C stops it.

  Dashboard  http://127.0.0.1:{dashboard_port}/
  Proxy      {proxy_url}  (tokens in {config})
  Database   {workdir / 'metrion.db'}

  {metrion} report --config {config} --by provider --by model
  {metrion} logs --config {config} --status 4xx
  curl {proxy_url}/api/proxy/openai/v1/chat/completions -H "authorization: Bearer {token}" \\
       -H "content-type: application/json" -H "x-metrion-user: you" \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metrion_addon.demo",
        description="Run the mock providers, Metrion and its dashboard on a demo database, drive weeks of "
        "realistic SDK traffic through them, and keep them running until Ctrl-C. No keys, no internet.",
    )
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="demo directory, wiped first (default: demo)")
    parser.add_argument("--port", type=int, default=8081, help="dashboard port; 0 picks a free one (default: 8081)")
    parser.add_argument("--quick", action="store_true", help="one day of history, fast providers: a smoke run")
    parser.add_argument("--seed", type=int, default=7, help="traffic seed (default: 7)")
    args = parser.parse_args(argv)
    for stopping in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        signal.signal(stopping, signal.default_int_handler)
    running = None
    try:
        running = run(args.dir.resolve(), QUICK if args.quick else FULL, args.port or free_port(), args.seed)
        while True:
            time.sleep(3600)
    except DemoError as e:
        print(f"metrion demo: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        say("stopping the demo")
    finally:
        if running is not None:
            running.stop()


if __name__ == "__main__":
    main()
