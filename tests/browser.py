"""A headless Chromium driven over the DevTools protocol (through `--remote-debugging-pipe`: no port,
no websocket library): load a page, collect console errors and exceptions, evaluate a script, take a
full-page screenshot."""

from __future__ import annotations

import base64
import json
import os
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def chromium_or_skip() -> str:
    """The Chromium binary; missing is a failure under CI (`.ci/run` installs it) and a skip elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (`.ci/run` installs Debian's chromium package)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI fails here instead")


@dataclass
class PageResult:
    value: Any  # what the evaluated expression returned
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""


class DevTools:
    def __init__(self, binary: str) -> None:
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--allow-file-access-from-files",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            "about:blank",
        ]
        cmd = (
            f"exec {shlex.quote(binary)} {' '.join(shlex.quote(f) for f in flags)} 3<&{to_chrome_r} 4>&{from_chrome_w}"
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", cmd],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self._next, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        return self._until(lambda m: m.get("method") == method, timeout, method)

    def _until(self, want: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if want(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {what} in {timeout} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()}) while waiting for {what}")
            self._buf += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self._profile, ignore_errors=True)


def load_page(path: Path, expression: str, width: int = 1280) -> PageResult:
    """Open `path` in headless Chromium, wait for its load event, return `expression`'s value, every
    console error or uncaught exception, and a full-page PNG screenshot."""
    tools = DevTools(chromium_or_skip())
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            tools.send(domain, session=session)
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        tools.send("Page.navigate", {"url": path.resolve().as_uri()}, session)
        tools.wait_event("Page.loadEventFired")
        value = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        result = PageResult(value.get("result", {}).get("value"))
        if "exceptionDetails" in value:
            result.errors.append(f"evaluate: {value['exceptionDetails']}")
        metrics = tools.send("Page.getLayoutMetrics", session=session)
        height = int(metrics["cssContentSize"]["height"]) + 1
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        shot = tools.send("Page.captureScreenshot", {"format": "png"}, session)
        result.screenshot = base64.b64decode(shot["data"])
        for e in tools.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                result.errors.append(
                    f"exception: {p['exceptionDetails'].get('exception', {}).get('description') or p['exceptionDetails'].get('text')}"
                )
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                result.errors.append(
                    f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}"
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                result.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return result
    finally:
        tools.close()
