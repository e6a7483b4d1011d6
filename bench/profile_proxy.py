"""Profiles one proxy under the scenario-2 load (8 connections) with py-spy, to find where its time goes.

Run `.venv/bin/python bench/profile_proxy.py [bare|metrion|metrion_redis] [--seconds S] [--py-spy PATH]`; prints
the top functions by own time and by total time (py-spy installs with `pip install py-spy`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import RedisServer
from run import Proxy, Upstream, job_for, run_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("bare", "metrion", "metrion_redis"), nargs="?", default="metrion")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL")
    parser.add_argument("--save", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metrion-profile-") as tmp:
        upstream = Upstream()
        redis = RedisServer(Path(tmp) / "redis").start() if args.kind == "metrion_redis" else None
        proxy = Proxy("bare" if args.kind == "bare" else "metrion", upstream.port, Path(tmp) / args.kind,
                      redis_url=redis.url if redis else None).start()
        try:
            raw = Path(tmp) / "profile.txt"
            load = threading.Thread(target=run_load, args=(job_for(
                args.kind, upstream.port, {args.kind: proxy}, kind="requests", conns=8,
                duration=args.seconds + 2, count=10_000_000),))
            load.start()
            subprocess.run([args.py_spy, "record", "--pid", str(proxy.pid), "--duration", str(int(args.seconds)),
                            "--format", "raw", "--output", str(raw), "--nonblocking", "--threads",
                            "--rate", str(args.rate), *(["--gil"] if args.gil else [])], check=True,
                           capture_output=True)
            load.join()
            if args.save:
                shutil.copy(raw, args.save)
            summarise(raw.read_text(), args.top)
        finally:
            proxy.stop()
            upstream.stop()
            if redis:
                redis.stop()


def summarise(collapsed: str, top: int) -> None:
    """Own and total sample counts per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    threads: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        threads[stack.split(";")[0]] = threads.get(stack.split(";")[0], 0) + int(count)
    print("== samples per thread (py-spy drops idle samples)")
    for frame, n in sorted(threads.items(), key=lambda kv: -kv[1]):
        print(f"{100 * n / samples:5.1f}%  {frame}")
    metrion = {f: n for f, n in total.items() if "metrion_addon" in f or "store.py" in f or "addon.py" in f}
    for title, table in (("own", own), ("total", total), ("total, Metrion's frames", metrion)):
        print(f"\n== by {title} time ({samples} samples)")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{100 * n / samples:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
