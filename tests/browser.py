"""Headless Chromium for the playground's tests and screenshots: the system browser, driven by selenium.

Debian's ``chromium`` and ``chromium-driver`` (``make install-browser``); selenium is told where both
are, so its driver manager never reaches for the network. Chromium runs with the flags that keep it
quiet on a closed network and with a fresh profile, and records its network events (performance
log) so that a test can list every URL the page requested.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("POLICYMIX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("POLICYMIX_CHROMEDRIVER", "/usr/bin/chromedriver")
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
          "--metrics-recording-only", "--no-default-browser-check"]


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).exists() or shutil.which(path)):
            return f"{path} not found (install Debian's {package}: make install-browser)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class Browser:
    """One headless Chromium with its own profile folder, removed on close."""

    def __init__(self, width: int = 1400, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="policymix-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in _FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.add_argument(f"--window-size={width},{height}")
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        self.driver.set_script_timeout(60)
        self.network()  # drop the blank start tab's events: a test sees only what its pages asked for

    def network(self) -> list[dict]:
        """The browser's CDP network events since the last call (the performance log drains when read)."""
        events = [json.loads(entry["message"])["message"] for entry in self.driver.get_log("performance")]
        return [e for e in events if e["method"].startswith("Network.")]

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def hosts(urls: list[str]) -> set[str]:
    """The hosts of the URLs that go over the network (data:, blob: and chrome: ones stay in the browser)."""
    return {urlsplit(u).netloc for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss", "ftp")}


def requested_urls(events: list[dict]) -> list[str]:
    """Every URL the page asked the network for (Network.requestWillBeSent)."""
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def event_stream_urls(events: list[dict]) -> list[str]:
    """URLs whose response was a server-sent event stream."""
    return [e["params"]["response"]["url"] for e in events if e["method"] == "Network.responseReceived"
            and e["params"]["response"].get("mimeType") == "text/event-stream"]
