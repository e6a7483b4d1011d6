"""Metrion's proxy benchmark: the upstream direct, bare mitmdump, mitmdump + Metrion and, in scenarios 1 and 2, the
peers (one Metrion on Redis, two behind HAProxy on Redis, Portkey's gateway), interleaved in one run.

Run `.venv/bin/python bench/run.py [--quick | --smoke] [--scenarios 1,2,3,4,5,6] [--no-peers] [--no-write]`;
writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from peers import HAProxy, Portkey, PostgresServer, RedisServer, Running, free_port, peers_missing

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
MITMDUMP = Path(sys.executable).parent / "mitmdump"
TOKEN = "sk-metrion-" + "be" * 16
TARGETS = ("direct", "bare", "metrion")
PEERS = ("metrion_redis", "pair", "portkey")  # scenarios 1 and 2 only
NAMES = {"direct": "direct", "bare": "bare mitmdump", "metrion": "mitmdump + Metrion",
         "metrion_redis": "Metrion, limits on Redis", "pair": "2 × Metrion + HAProxy (Redis, PostgreSQL)",
         "portkey": "Portkey gateway"}
PROVIDERS = ("anthropic", "openai", "gemini", "mistral", "grok")


@dataclass(frozen=True)
class Sizes:
    """How much of each scenario to run; `full` is what RESULTS.md quotes."""

    rounds: int
    s1_seconds: float
    s2_seconds: float
    s3_streams: int
    s4_streams: int
    s4_events: int
    s5_counts: tuple[int, int]
    s6_seconds: float


FULL = Sizes(rounds=3, s1_seconds=4, s2_seconds=5, s3_streams=8, s4_streams=500, s4_events=25,
             s5_counts=(5_000, 50_000), s6_seconds=8)
QUICK = Sizes(rounds=3, s1_seconds=0.7, s2_seconds=1, s3_streams=2, s4_streams=100, s4_events=6,
              s5_counts=(500, 2_000), s6_seconds=1.5)
SMOKE = Sizes(rounds=1, s1_seconds=0.3, s2_seconds=0.3, s3_streams=1, s4_streams=10, s4_events=3,
              s5_counts=(50, 100), s6_seconds=0.5)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Upstream:
    def __init__(self) -> None:
        self.process = subprocess.Popen([PYTHON, str(BENCH / "upstream.py")], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Proxy(Running):
    """A mitmdump in regular mode on loopback: `bare` (no Metrion) or `metrion`, same options otherwise."""

    kind: str
    upstream_port: int
    workdir: Path
    scripts: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None  # limits on this Redis (`shared.redis`)
    companions: tuple[int, ...] = ()  # processes whose CPU counts as this target's (its redis-server)
    database: str | None = None  # the log's database URL (else SQLite in workdir)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    def start(self) -> Proxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [str(MITMDUMP)]
        if self.kind == "metrion":
            config = self.workdir / "metrion.yaml"
            config.write_text(yaml.safe_dump({
                "database": self.database or str(self.workdir / "metrion.db"),
                "timeout": 30,
                "rate_limit": 1_000_000,
                "providers": {p: f"http://127.0.0.1:{self.upstream_port}/{p}/v1" for p in PROVIDERS},
                "plans": {"pro": {"monthly_requests": None}},
                "tokens": [{"name": "bench", "token": TOKEN, "plan": "pro", "keys": {"openai": "sk-bench"}}],
                **({"shared": {"redis": self.redis_url}} if self.redis_url else {}),
            }))
            args += ["-s", str(ROOT / "metrion_addon" / "addon.py"), "--set", f"metrion_config={config}"]
        else:
            args += ["-s", str(BENCH / "sse_passthrough.py")]
        for script in self.scripts:
            args += ["-s", str(script)]
        args += ["--set", f"confdir={self.workdir / 'confdir'}", "--listen-host", "127.0.0.1",
                 "--listen-port", str(self.port), "--set", "connection_strategy=lazy",
                 "--set", "termlog_verbosity=info", "--set", "flow_detail=0"]
        ready = b"metrion: metering" if self.kind == "metrion" else b"proxy listening at"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} mitmdump exited:\n{self.log_path.read_text()}")
            if ready in self.log_path.read_bytes():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} mitmdump not ready:\n{self.log_path.read_text()}")


@dataclass
class Pair:
    """Two Metrion instances behind HAProxy (deploy/haproxy.cfg): limits on one Redis, one log on PostgreSQL."""

    upstream_port: int
    workdir: Path
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    instances: tuple[Proxy, ...] = ()
    haproxy: HAProxy | None = None

    def start(self) -> Pair:
        self.redis = RedisServer(self.workdir / "redis").start()
        self.postgres = PostgresServer().start()
        database = self.postgres.create_database("metrion_bench")
        self.instances = tuple(Proxy("metrion", self.upstream_port, self.workdir / f"metrion{n}",
                                     redis_url=self.redis.url, database=database) for n in (1, 2))
        start_all(self.instances)
        self.haproxy = HAProxy(self.workdir / "haproxy", (self.instances[0].port, self.instances[1].port)).start()
        time.sleep(1.5)  # HAProxy's first health checks
        return self

    def stop(self) -> None:
        if self.haproxy:
            self.haproxy.stop()
        for instance in self.instances:
            instance.stop()
        if self.redis:
            self.redis.stop()
        if self.postgres:
            self.postgres.remove()

    @property
    def port(self) -> int:
        assert self.haproxy is not None
        return self.haproxy.port

    @property
    def pids(self) -> list[int]:
        """Both instances, HAProxy, redis-server and PostgreSQL's processes (postmaster and backends)."""
        assert self.haproxy is not None and self.redis is not None and self.redis.process is not None
        return [i.pid for i in self.instances] + [self.haproxy.pid, self.redis.process.pid, *self._postgres_pids()]

    def _postgres_pids(self) -> list[int]:
        assert self.postgres is not None
        postmaster = int((self.postgres.datadir / "data" / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]


def start_all(processes) -> None:
    """Start them side by side (each start mostly waits for its process to be ready)."""
    with ThreadPoolExecutor(len(processes)) as pool:
        for started in [pool.submit(p.start) for p in processes]:
            started.result()


def pids_of(target: str, proxies: dict) -> list[int]:
    """The processes whose CPU a target spends (its redis-server too; both instances and HAProxy for the pair)."""
    if target not in proxies:
        return []
    proxy = proxies[target]
    return proxy.pids if isinstance(proxy, Pair) else [proxy.pid, *getattr(proxy, "companions", ())]


def job_for(target: str, upstream_port: int, proxies: dict[str, Proxy], **job: object) -> dict:
    """Where and how the load client reaches `target`: the same request, as each target needs it."""
    path = "/openai/v1/chat/completions"
    upstream_host = f"127.0.0.1:{upstream_port}"
    auth = {"authorization": "Bearer sk-bench"}
    if target == "direct":
        where = {"connect_port": upstream_port, "host": upstream_host, "target": path, "headers": auth}
    elif target == "bare":  # a forward-proxy request: absolute-form URL
        where = {"connect_port": proxies["bare"].port, "host": upstream_host,
                 "target": f"http://{upstream_host}{path}", "headers": auth}
    elif target == "portkey":  # the upstream named per request, as Portkey documents for a custom host
        port = proxies["portkey"].port
        where = {"connect_port": port, "host": f"127.0.0.1:{port}", "target": "/v1/chat/completions",
                 "headers": {**auth, "x-portkey-provider": "openai",
                             "x-portkey-custom-host": f"http://{upstream_host}/openai/v1"}}
    else:  # metrion, metrion_redis, pair
        port = proxies[target].port
        where = {"connect_port": port, "host": f"127.0.0.1:{port}", "target": "/api/proxy" + path,
                 "headers": {"authorization": f"Bearer {TOKEN}"}}
    where["headers"] = {**where["headers"], **job.pop("headers", {})}  # type: ignore[dict-item]
    return {"connect_host": "127.0.0.1", **where, **job}


def run_load(job: dict, timeout: float = 300) -> dict:
    out = subprocess.run([PYTHON, str(BENCH / "load.py"), json.dumps(job)], capture_output=True, text=True,
                         timeout=timeout, check=True)
    return json.loads(out.stdout)


class Sampler:
    """CPU (summed) and peak RSS (summed) of a target's processes while a load runs."""

    def __init__(self, pids: int | list[int] | None) -> None:
        self.pids = [pids] if isinstance(pids, int) else list(pids or [])
        self.peak = 0.0
        if self.pids:
            self.cpu0, self.t0 = sum(map(cpu_seconds, self.pids)), time.monotonic()

    def sample(self) -> None:
        if self.pids:
            self.peak = max(self.peak, sum(map(rss_mb, self.pids)))

    def cpu_percent(self) -> float:
        if not self.pids:
            return float("nan")
        return 100 * (sum(map(cpu_seconds, self.pids)) - self.cpu0) / (time.monotonic() - self.t0)


def run_load_sampled(job: dict, pid: int | list[int] | None, timeout: float = 300) -> tuple[dict, Sampler]:
    sampler = Sampler(pid)
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: the result can be megabytes
        proc = subprocess.Popen([PYTHON, str(BENCH / "load.py"), json.dumps(job)], stdout=out, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            sampler.sample()
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(job)
            time.sleep(0.2)
        sampler.sample()
        cpu = sampler.cpu_percent()
        if proc.returncode:
            raise RuntimeError(f"load client failed: {proc.returncode}")
        out.seek(0)
        result = json.loads(out.read())
    result["cpu_percent"] = cpu
    return result, sampler


# --------------------------------------------------------------------------- scenarios

Table = dict[str, dict[str, float]]  # target -> metric -> median over rounds


def rounds(sizes: Sizes, measure, targets: tuple[str, ...] = TARGETS) -> Table:
    """Run `measure(target)` for every target, `sizes.rounds` times, in a rotating order; median each metric."""
    collected: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
    for r in range(sizes.rounds):
        shift = r % len(targets)
        order = targets[shift:] + targets[:shift]
        for target in order:
            for metric, value in measure(target).items():
                collected[target].setdefault(metric, []).append(value)
    return {t: {m: med(v) for m, v in metrics.items()} for t, metrics in collected.items()}


def scenario_1(sizes: Sizes, up: int, proxies: dict) -> Table:
    def measure(target: str) -> dict[str, float]:
        r = run_load(job_for(target, up, proxies, kind="requests", conns=1, duration=sizes.s1_seconds,
                             count=100_000, warmup=50))
        lat = [x / 1000 for x in r["latencies_us"]]
        return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "requests": len(lat), "errors": r["errors"]}
    return rounds(sizes, measure, TARGETS + tuple(p for p in PEERS if p in proxies))


def scenario_2(sizes: Sizes, up: int, proxies: dict) -> Table:
    def measure(target: str) -> dict[str, float]:
        pid = pids_of(target, proxies)
        r, _ = run_load_sampled(job_for(target, up, proxies, kind="requests", conns=8, duration=sizes.s2_seconds,
                                        count=1_000_000, warmup=20), pid)
        lat = [x / 1000 for x in r["latencies_us"]]
        rps = len(lat) / r["elapsed"]
        return {"rps": rps, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "proxy_cpu_percent": r["cpu_percent"],
                "proxy_cpu_us_per_request": r["cpu_percent"] * 1e4 / rps, "errors": r["errors"]}
    return rounds(sizes, measure, TARGETS + tuple(p for p in PEERS if p in proxies))


def scenario_3(sizes: Sizes, up: int, proxies: dict[str, Proxy]) -> Table:
    interval_ms = 20

    def measure(target: str) -> dict[str, float]:
        r = run_load(job_for(target, up, proxies, kind="streams", streams=1, repeat=sizes.s3_streams,
                             headers={"x-bench-events": "20", "x-bench-interval-ms": str(interval_ms)}))
        ms = {k: [x / 1000 for x in r[k]] for k in ("ttfe_us", "delays_us", "gaps_us")}
        return {"ttfe_p50_ms": pct(ms["ttfe_us"], 0.5), "delay_p50_ms": pct(ms["delays_us"], 0.5),
                "delay_p99_ms": pct(ms["delays_us"], 0.99), "delay_max_ms": max(ms["delays_us"], default=float("nan")),
                "gap_p50_ms": pct(ms["gaps_us"], 0.5), "gap_min_ms": min(ms["gaps_us"], default=float("nan")),
                "held_back": sum(d > interval_ms / 2 for d in ms["delays_us"]),
                "events": len(ms["delays_us"]), "errors": r["errors"]}
    return rounds(sizes, measure)


def scenario_4(sizes: Sizes, up: int, proxies: dict[str, Proxy]) -> Table:
    rounds_4 = Sizes(**{**sizes.__dict__, "rounds": max(1, min(3, sizes.rounds))})

    def measure(target: str) -> dict[str, float]:
        pid = proxies[target].pid if target in proxies else None
        r, sampler = run_load_sampled(job_for(
            target, up, proxies, kind="streams", streams=sizes.s4_streams, ramp=min(2.0, sizes.s4_events * 0.1),
            headers={"x-bench-events": str(sizes.s4_events), "x-bench-interval-ms": "200"}), pid)
        delays = [x / 1000 for x in r["delays_us"]]
        return {"delay_p50_ms": pct(delays, 0.5), "delay_p99_ms": pct(delays, 0.99),
                "ttfe_p99_ms": pct([x / 1000 for x in r["ttfe_us"]], 0.99), "events": len(delays),
                "cpu_percent": r["cpu_percent"], "peak_rss_mb": sampler.peak or float("nan"), "errors": r["errors"]}
    return rounds(rounds_4, measure)


def scenario_5(sizes: Sizes, up: int, workdir: Path) -> Table:
    """Fresh proxies; both loaded at once (RSS, not speed, is measured here) to halve the wall time."""
    first, total = sizes.s5_counts
    fresh = {k: Proxy(k, up, workdir / f"s5-{k}") for k in ("bare", "metrion")}
    start_all(list(fresh.values()))
    result: Table = {"direct": {}}
    try:
        points: dict[str, list[float]] = {k: [] for k in fresh}
        for count in (first, total - first):
            procs = {k: subprocess.Popen([PYTHON, str(BENCH / "load.py"), json.dumps(job_for(
                k, up, fresh, kind="requests", conns=8, duration=3600, count=count))], stdout=subprocess.PIPE)
                for k in fresh}
            for proc in procs.values():
                proc.communicate(timeout=900)
            time.sleep(1.0)  # let the writer drain its queue
            for k, proxy in fresh.items():
                points[k].append(rss_mb(proxy.pid))
        for k in fresh:
            result[k] = {f"rss_after_{first}_mb": points[k][0], f"rss_after_{total}_mb": points[k][1],
                         "growth_mb": points[k][1] - points[k][0]}
    finally:
        for proxy in fresh.values():
            proxy.stop()
    return result


def scenario_6(sizes: Sizes, up: int, workdir: Path) -> Table:
    """Event-loop hold times under the scenario-2 load, with a 1 ms ticker in the proxy; plus asyncio debug."""
    result: Table = {"direct": {}}
    for kind in ("bare", "metrion"):
        probe = workdir / f"s6-{kind}.json"
        proxy = Proxy(kind, up, workdir / f"s6-{kind}", scripts=(BENCH / "loop_probe.py",),
                      env={"BENCH_LOOP_PROBE": str(probe)}).start()
        try:
            run_load(job_for(kind, up, {kind: proxy}, kind="requests", conns=8, duration=sizes.s6_seconds,
                             count=1_000_000))
            run_load(job_for(kind, up, {kind: proxy}, kind="streams", streams=50, ramp=0.5,
                             headers={"x-bench-events": "10", "x-bench-interval-ms": "50"}))
        finally:
            proxy.stop()
        result[kind] = {k: float(v) for k, v in json.loads(probe.read_text()).items()}
    # asyncio debug mode names every callback that held the loop longer than 10 ms
    proxy = Proxy("metrion", up, workdir / "s6-debug", scripts=(BENCH / "loop_probe.py",),
                  env={"BENCH_SLOW_CALLBACK_MS": "10"}).start()
    try:
        run_load(job_for("metrion", up, {"metrion": proxy}, kind="requests", conns=8, duration=sizes.s6_seconds,
                         count=1_000_000))
    finally:
        proxy.stop()
    slow = [line for line in proxy.log_path.read_text().splitlines() if "Executing" in line and "took" in line]
    result["metrion"]["debug_slow_callbacks"] = float(len(slow))
    (workdir / "s6-slow-callbacks.txt").write_text("\n".join(slow))
    result["metrion"]["_slow_examples"] = slow[:5]  # type: ignore[assignment]
    return result


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    version = subprocess.run([str(MITMDUMP), "--version"], capture_output=True, text=True).stdout
    mitm = next((line.split(":", 1)[1].strip() for line in version.splitlines() if line.startswith("Mitmproxy")), "?")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(), "mitmproxy": mitm,
            "os": platform.platform()}


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(title: str, data: Table) -> str:
    targets = [t for t in TARGETS + PEERS if t in data]
    metrics = [m for m in dict.fromkeys(m for t in targets for m in data.get(t, {})) if not m.startswith("_")]
    lines = [f"### {title}", "", "| metric | " + " | ".join(NAMES[t] for t in targets)
             + " | Metrion − bare | Metrion / bare |", "|---|" + "---:|" * (len(targets) + 2)]
    for m in metrics:
        values = [data.get(t, {}).get(m, float("nan")) for t in targets]
        b, x = (data.get(t, {}).get(m, float("nan")) for t in ("bare", "metrion"))
        ratio = x / b if b == b and b else float("nan")
        lines.append(f"| {m} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(x - b)} | {fmt(ratio)} |")
    return "\n".join(lines)


def verdicts(results: dict[int, Table]) -> str:
    """The issue's targets from this run's tables ("—" when a scenario or target was not run).

    Each throughput target is given twice: req/s as measured, and the capacity the CPU per request implies
    (10^6 / CPU µs per request, per core). On a loaded machine the proxies are not CPU-bound (their CPU % shows it),
    req/s then measures the scheduler's shares (two processes get more than one), and only the capacity compares.
    """
    nan = float("nan")

    def get(s: int, target: str, metric: str) -> float:
        return results.get(s, {}).get(target, {}).get(metric, nan)

    def ratio(a: float, b: float) -> float:
        return a / b if b == b and b else nan

    def verdict(value: float, ok: bool) -> str:
        return "—" if value != value else "met" if ok else "**not met**"

    rps, cpu = ratio(get(2, "metrion", "rps"), get(2, "bare", "rps")), get(2, "metrion", "proxy_cpu_percent")
    capacity = ratio(get(2, "bare", "proxy_cpu_us_per_request"), get(2, "metrion", "proxy_cpu_us_per_request"))
    p99 = ratio(get(2, "metrion", "p99_ms"), get(2, "bare", "p99_ms"))
    redis_p50 = get(1, "metrion_redis", "p50_ms") - get(1, "metrion", "p50_ms")
    pair = ratio(get(2, "pair", "rps"), get(2, "portkey", "rps"))
    # the pair's CPU per request covers 2 instances and HAProxy, which share 2 cores; Portkey runs on one
    pair_capacity = ratio(2 * get(2, "portkey", "proxy_cpu_us_per_request"), get(2, "pair", "proxy_cpu_us_per_request"))
    rows = [
        ("one instance: throughput ≥ 95 % of bare mitmdump (S2), req/s",
         f"{fmt(get(2, 'metrion', 'rps'))} / {fmt(get(2, 'bare', 'rps'))} = {100 * rps:.1f} % "
         f"(proxy CPU {fmt(cpu)} %)", verdict(rps, rps >= 0.95)),
        ("the same, as capacity (bare's CPU µs per request / Metrion's)",
         f"{fmt(get(2, 'bare', 'proxy_cpu_us_per_request'))} / {fmt(get(2, 'metrion', 'proxy_cpu_us_per_request'))}"
         f" µs = {100 * capacity:.1f} %", verdict(capacity, capacity >= 0.95)),
        ("one instance: c=8 p99 ≤ 1.1 × bare's (S2)",
         f"{fmt(get(2, 'metrion', 'p99_ms'))} / {fmt(get(2, 'bare', 'p99_ms'))} ms = {p99:.2f} ×",
         verdict(p99, p99 <= 1.1)),
        ("Redis round trip added at p50 ≤ 0.3 ms (S1: Metrion on Redis − Metrion)",
         f"{fmt(get(1, 'metrion_redis', 'p50_ms'))} − {fmt(get(1, 'metrion', 'p50_ms'))} ms = {redis_p50:+.3f} ms",
         verdict(redis_p50, redis_p50 <= 0.3)),
        ("two instances behind HAProxy: throughput ≥ Portkey's (S2), req/s",
         f"{fmt(get(2, 'pair', 'rps'))} / {fmt(get(2, 'portkey', 'rps'))} = {pair:.2f} ×", verdict(pair, pair >= 1)),
        ("the same, as capacity on 2 cores (2 × Portkey's CPU µs per request / the pair's)",
         f"2 × {fmt(get(2, 'portkey', 'proxy_cpu_us_per_request'))} / {fmt(get(2, 'pair', 'proxy_cpu_us_per_request'))}"
         f" µs = {pair_capacity:.2f} ×", verdict(pair_capacity, pair_capacity >= 1)),
    ]
    return "\n".join(["### Targets (this run)", "", "| target | measured | verdict |", "|---|---|---|",
                      *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


TITLES = {
    1: "Scenario 1 — non-streaming, 1 connection (latency per request)",
    2: "Scenario 2 — non-streaming, 8 connections (throughput)",
    3: "Scenario 3 — streaming, 20 events 20 ms apart, 1 connection",
    4: "Scenario 4 — open streams at once, events every 200 ms",
    5: "Scenario 5 — RSS of fresh proxies after N non-streaming requests",
    6: "Scenario 6 — event-loop hold times (1 ms ticker in the proxy) under 8-connection load + 50 streams",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="scaled-down run (under a minute)")
    mode.add_argument("--smoke", action="store_true", help="a few requests per scenario: checks the harness runs")
    parser.add_argument("--scenarios", default="1,2,3,4,5,6", help="comma-separated scenario numbers")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out Portkey, Metrion on Redis and the HAProxy pair (scenarios 1 and 2)")
    parser.add_argument("--no-write", action="store_true", help="print JSON only; leave bench/RESULTS.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    chosen = [int(s) for s in args.scenarios.split(",") if s.strip()]
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    results: dict[int, Table] = {}
    with tempfile.TemporaryDirectory(prefix="metrion-bench-") as tmp:
        workdir = Path(tmp)
        upstream = Upstream()
        proxies: dict = {k: Proxy(k, upstream.port, workdir / k) for k in ("bare", "metrion")}
        peers = not args.no_peers and any(s in chosen for s in (1, 2))
        if peers and (missing := peers_missing()):
            print(f"peers left out: {', '.join(missing)} not installed", file=sys.stderr)
            peers = False
        redis = RedisServer(workdir / "redis-one") if peers else None
        if peers:
            proxies |= {"metrion_redis": Proxy("metrion", upstream.port, workdir / "metrion_redis"),
                        "pair": Pair(upstream.port, workdir / "pair"), "portkey": Portkey(workdir / "portkey")}
        try:
            if any(s in chosen for s in (1, 2, 3, 4)):
                if redis:
                    proxies["metrion_redis"].redis_url = redis.start().url
                    proxies["metrion_redis"].companions = (redis.process.pid,)
                start_all(list(proxies.values()))
            for s in chosen:
                t0 = time.monotonic()
                if s in (1, 2, 3, 4):
                    results[s] = (scenario_1, scenario_2, scenario_3, scenario_4)[s - 1](sizes, upstream.port, proxies)
                elif s == 5:
                    results[s] = scenario_5(sizes, upstream.port, workdir)
                elif s == 6:
                    results[s] = scenario_6(sizes, upstream.port, workdir)
                print(f"scenario {s}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            if redis:
                redis.stop()
            upstream.stop()
    elapsed = time.monotonic() - started
    print(json.dumps({"elapsed_s": elapsed, "results": results}, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps({"elapsed_s": elapsed, "machine": machine(), "results": results},
                                        indent=1, default=str))
    if not args.no_write:
        command = ".venv/bin/python bench/run.py " + " ".join(sys.argv[1:])
        write_tables(results, sizes, command.strip(), elapsed, load_start)


def write_tables(results: dict[int, Table], sizes: Sizes, command: str, elapsed: float,
                 load_start: float) -> None:
    """Write the measured tables into RESULTS.md between markers, keeping the hand-written analysis around them."""
    info = machine()
    body = [f"Command: `{command}` ({elapsed:.0f} s; {sizes.rounds} interleaved rounds, medians of per-round values)",
            "", f"Machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
            f"mitmproxy {info['mitmproxy']}, {info['os']}", ""]
    end = os.getloadavg()
    body[-1:-1] = ["", f"Machine load (1-minute load average, other helpers' test suites included): {load_start:.1f} "
                   f"when the run started, {end[0]:.1f} when it ended ({end[2]:.1f} over the last 15 minutes)"]
    for s, data in sorted(results.items()):
        body += [table(TITLES[s], data), ""]
    body += [verdicts(results), ""]
    write_results_section("tables", "\n".join(body))


def write_results_section(name: str, text: str) -> None:
    """Put `text` between RESULTS.md's `<!-- name:start -->` and `<!-- name:end -->` (added at the end if missing);
    the hand-written analysis around the markers stays."""
    path = BENCH / "RESULTS.md"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else "# Metrion benchmark results\n"
    if start not in current:
        current += f"\n{start}\n{end}\n"
    head, _, rest = current.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
