"""Makes docs/dashboard.png: the Overview over five weeks of realistic traffic, in Debian's chromium.

Run `.venv/bin/python docs/screenshot.py [--page /] [--out docs/dashboard.png]`; it seeds a temporary database.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
import yaml
from playwright.sync_api import sync_playwright

from metrion_addon.config import load_config
from metrion_addon.dashboard.app import create_app

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 15, 20, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--page", default="/?period=7d")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1440)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from dashboard_data import TOKENS, seed

    workdir = Path(tempfile.mkdtemp())
    seed(workdir / "metrion.db", 60_000, 35, NOW)
    plans = ["free", "pro"]
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "database": "metrion.db",
        "tokens": [{"name": name, "token": f"sk-metrion-{i:032x}", "plan": plans[i % 2]}
                   for i, name in enumerate(TOKENS)],
    }))
    app = create_app(load_config(workdir / "config.yaml"), clock=NOW.timestamp)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=18765, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
        page.goto(f"http://127.0.0.1:18765{args.page}")
        page.wait_for_timeout(300)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
