"""A small W3C WebDriver client for headless Chromium through Debian's chromedriver (test helper).

Talks to ``/usr/bin/chromedriver`` over its local HTTP API with the standard library only, so the
tests need no extra Python package and nothing is downloaded (Debian packages: ``chromium``,
``chromium-driver``). Usage::

    with Browser() as b:
        b.get(Path("index.html").resolve().as_uri())
        b.execute("return document.title")
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # fixed by the W3C WebDriver spec

# Root user, no network: no sandbox, nothing that phones home, a fresh profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def find_binaries():
    """``(chromium, chromedriver)`` paths, or ``None`` for each that is not installed."""
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return chromium, shutil.which("chromedriver")


class WebDriverError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session driven through chromedriver."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 15.0):
        self.width, self.height, self.timeout = width, height, timeout
        self.chromium, self.chromedriver = find_binaries()
        self._proc = None
        self._profile = None
        self._base = None
        self.session = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        if not (self.chromium and self.chromedriver):
            raise WebDriverError("chromium and chromedriver are not both installed")
        port = _free_port()
        self._proc = subprocess.Popen([self.chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self._base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._request("GET", "/status").get("ready"):
                    break
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self._stop_driver()
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.05)
        self._profile = tempfile.mkdtemp(prefix="cnnvis-chromium-")
        args = [*CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}"]
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": self.chromium, "args": args}}
        try:
            value = self._request("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        except Exception:
            self._stop_driver()
            raise
        self.session = value["sessionId"]
        return self

    def __exit__(self, *exc):
        try:
            if self.session:
                self._request("DELETE", f"/session/{self.session}")
        except (OSError, WebDriverError):
            pass
        finally:
            self._stop_driver()
        return False

    def _stop_driver(self):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # ------------------------------------------------------------------ protocol
    def _request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode() or "{}")
        except urllib.error.HTTPError as exc:
            try:
                value = json.loads(exc.read().decode()).get("value", {})
            except ValueError:
                value = {}
            raise WebDriverError(f"{method} {path}: {value.get('error', exc.code)}: "
                                 f"{(str(value.get('message', '')).splitlines() or [''])[0]}") from None
        return payload.get("value")

    def _session(self, method: str, path: str, body=None):
        return self._request(method, f"/session/{self.session}{path}", body)

    # ------------------------------------------------------------------ commands
    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def execute(self, script: str, *args):
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict:
        """A web element reference (pass it to :meth:`click` or as an :meth:`execute` argument)."""
        value = self._session("POST", "/element", {"using": "css selector", "value": css})
        return {ELEMENT_KEY: value[ELEMENT_KEY]}

    def find_all(self, css: str) -> list:
        values = self._session("POST", "/elements", {"using": "css selector", "value": css})
        return [{ELEMENT_KEY: v[ELEMENT_KEY]} for v in values]

    def click(self, element: dict) -> None:
        self._session("POST", f"/element/{element[ELEMENT_KEY]}/click", {})

    def send_keys(self, element: dict, text: str) -> None:
        self._session("POST", f"/element/{element[ELEMENT_KEY]}/value", {"text": text})

    def set_window_size(self, width: int, height: int) -> None:
        self._session("POST", "/window/rect", {"width": width, "height": height})

    def screenshot_png(self) -> bytes:
        return base64.b64decode(self._session("GET", "/screenshot"))

    def browser_log(self) -> list:
        """Console messages and load failures since the last call (chromedriver's log endpoint)."""
        for path in ("/se/log", "/log"):
            try:
                return self._session("POST", path, {"type": "browser"}) or []
            except WebDriverError:
                continue
        raise WebDriverError("chromedriver offers no browser log endpoint")

    def wait_for(self, script: str, *args, timeout: float = 5.0):
        """Run ``script`` until it returns something truthy; that value, or raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.execute(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out waiting for: {script[:80]}")
            time.sleep(0.05)
