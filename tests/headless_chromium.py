"""Drive headless Chromium through the DevTools protocol: load a page, act, screenshot.

``chromium --screenshot`` alone shoots at the load event, before a bokeh server page has
received its document over the websocket (and ``--virtual-time-budget`` skips ahead of the
websocket), so the tests wait on a JavaScript condition instead. Needs the ``chromium``
package (CI: ``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def chromium_path() -> str | None:
    """The Chromium (or Chrome) executable, if installed."""
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((path for path in map(shutil.which, names) if path), None)


class Page:
    """A DevTools session on one page."""

    def __init__(self, connection: WebSocketClientConnection) -> None:
        self.connection = connection
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command, skip events, return its result."""
        ident = next(self.ids)
        await self.connection.write_message(
            json.dumps({"id": ident, "method": method, "params": params})
        )
        while True:
            message = await self.connection.read_message()
            if message is None:
                raise RuntimeError("Chromium closed the DevTools connection")
            reply = json.loads(message)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> None:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> Path:
        result = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))
        return path


def _devtools_port(profile: Path, process: subprocess.Popen[bytes], timeout_s: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while not (marker.exists() and marker.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("Chromium did not open its DevTools port")
        time.sleep(0.1)
    return int(marker.read_text().split()[0])


def _wait_for_group_exit(group: int, timeout_s: float = 10.0) -> None:
    """Until every process of ``group`` (Chromium's helpers) is gone, so that none still
    writes to the profile being removed; SIGKILL what is left after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def run_page(
    url: str,
    script: Callable[[Page], Awaitable[Any]],
    *,
    window: tuple[int, int] = (1200, 900),
    timeout_s: float = 60.0,
) -> Any:
    """Open ``url`` in a fresh headless Chromium, run ``await script(page)``, close it."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    # Chromium's helper processes may still write to the profile while it is removed.
    with tempfile.TemporaryDirectory(prefix="dtm-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes share the group, to stop them all
        )
        try:
            port = _devtools_port(Path(profile), process, timeout_s)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                targets = json.load(response)
            target = next(t for t in targets if t["type"] == "page")

            async def session() -> Any:
                connection = await websocket_connect(
                    target["webSocketDebuggerUrl"], max_message_size=1 << 28
                )
                page = Page(connection)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                try:
                    return await asyncio.wait_for(script(page), timeout_s)
                finally:
                    connection.close()

            return asyncio.run(session())
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            _wait_for_group_exit(process.pid)
