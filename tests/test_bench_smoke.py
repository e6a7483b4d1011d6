"""The benchmark harness runs end to end: a tiny `bench/run.py --smoke` yields numbers for every target.

It installs Portkey's gateway from npm into bench/.portkey/ on its first run (needs node, npm, haproxy, redis-server).

Not a timed test: it checks the harness works, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--no-write", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=240, capture_output=True)
    return json.loads(out.read_text())["results"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("scenario", "metric"), [
    ("1", "p50_ms"),
    ("2", "rps"),
    ("3", "ttfe_p50_ms"),
    ("4", "delay_p99_ms"),
])
def test_smoke_run_measures_direct_bare_and_metrion(smoke: dict, scenario: str, metric: str) -> None:
    for target in ("direct", "bare", "metrion"):
        value = smoke[scenario][target][metric]
        assert math.isfinite(value) and value > 0, (scenario, target, metric, value)
        assert smoke[scenario][target]["errors"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", ["1", "2"])
@pytest.mark.parametrize("target", ["metrion_redis", "pair", "portkey"])
def test_smoke_run_measures_the_peers_in_the_same_run(smoke: dict, scenario: str, target: str) -> None:
    """One Metrion on Redis, two behind HAProxy (deploy/haproxy.cfg) and Portkey's gateway, beside the others."""
    metric = "p50_ms" if scenario == "1" else "rps"
    value = smoke[scenario][target][metric]
    assert math.isfinite(value) and value > 0 and smoke[scenario][target]["errors"] == 0, (target, value)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("scenario", "metric"), [("5", "growth_mb"), ("6", "max_us")])
def test_smoke_run_measures_both_proxies(smoke: dict, scenario: str, metric: str) -> None:
    for target in ("bare", "metrion"):
        assert math.isfinite(smoke[scenario][target][metric]), (scenario, target)


@pytest.mark.timeout(120)
def test_crash_loss_harness_kills_under_load_and_counts_what_was_kept() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "crash_loss.py"), "--rounds", "1", "--seconds", "1",
                           "--no-write"], cwd=ROOT, check=True, timeout=100, capture_output=True, text=True)
    (result,) = json.loads(done.stdout)
    assert result["forwarded"] > 0 and 0 < result["rows"] <= result["forwarded"]
    assert result["answered"] + result["in_flight"] == result["forwarded"] and result["lost_rows"] >= 0
