"""A report page as a person's browser shows it: headless Chromium driven over the DevTools protocol.

``open_page`` starts ``chromium --headless --remote-debugging-pipe`` (the protocol's JSON messages
on file descriptors 3 and 4, so no port and no extra package), opens a page, waits for its load
event and returns a ``BrowserPage``: the console errors, uncaught exceptions and failed loads seen
so far, the load timings, and ``evaluate(js)`` to run script in the page. The browser test
(tests/test_report_browser.py) and the report benchmark (benchmarks/bench_report.py) use it.

Chromium is found as ``$CHROMIUM``, else ``chromium``, ``chromium-browser``, ``google-chrome`` on
the PATH (Debian: ``apt-get install chromium``). It runs with ``--no-sandbox`` (containers and root
usually have no user namespaces for its sandbox); it only opens the local report pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_extraction.errors import PipelineError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 900)


def find_chromium() -> str | None:
    """The Chromium to run: ``$CHROMIUM`` or the first of BROWSERS on the PATH; None without one."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@dataclass
class BrowserPage:
    """One loaded page: what went wrong while loading, and how long it took."""

    url: str
    connection: DevTools
    session: str
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    load_seconds: float = 0.0  # from the navigation command to the load event, as seen from here

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        reply = self.connection.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            self.session,
            timeout,
        )
        if "exceptionDetails" in reply:
            raise PipelineError(f"script failed in {self.url}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def settle(self, seconds: float = 0.3) -> None:
        """Collect the events (errors) of the next ``seconds``."""
        self.connection.pump(seconds)


class DevTools:
    """The DevTools protocol over Chromium's pipe: numbered commands, their replies, and events."""

    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int):
        self.process, self.to_browser, self.from_browser = process, to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.listeners: list = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode("utf-8") + b"\0")
        return self.next_id

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout=30.0):
        number = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while number not in self.replies:
            if time.monotonic() > deadline:
                raise PipelineError(f"Chromium did not answer {method} within {timeout:.0f} s")
            self.pump(deadline - time.monotonic(), until=lambda: number in self.replies)
        reply = self.replies.pop(number)
        if "error" in reply:
            raise PipelineError(f"Chromium refused {method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def pump(self, seconds: float, until=None) -> None:
        """Read messages for up to ``seconds`` (or until ``until()``), handing events to the listeners."""
        deadline = time.monotonic() + max(0.0, seconds)
        while not (until and until()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if not ready:
                return
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise PipelineError(f"Chromium exited (status {self.process.poll()})")
            self.buffer += chunk
            *messages, self.buffer = self.buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    self.replies[message["id"]] = message
                else:
                    for listener in self.listeners:
                        listener(message)


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or more, so that the child's dup2 onto 3 and 4
    cannot overwrite the other pipe end."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


@contextlib.contextmanager
def chromium(executable: str | None = None, window: tuple[int, int] = WINDOW) -> Iterator[DevTools]:
    """A headless Chromium for the duration of the block; PipelineError when none is installed."""
    executable = executable or find_chromium()
    if not executable:
        raise PipelineError(
            "no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM"
        )
    command_read, command_write = (_high_fd(fd) for fd in os.pipe())
    reply_read, reply_write = (_high_fd(fd) for fd in os.pipe())

    def onto_3_and_4() -> None:  # in the child: the protocol's descriptors
        os.dup2(command_read, 3)
        os.dup2(reply_write, 4)

    with tempfile.TemporaryDirectory(prefix="clam-chromium-") as profile:
        arguments = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--window-size={window[0]},{window[1]}",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Python's descriptors are not inherited (PEP 446); only the two dup2'ed ones reach Chromium.
            close_fds=False,
            preexec_fn=onto_3_and_4,
        )
        os.close(command_read)
        os.close(reply_write)
        connection = DevTools(process, command_write, reply_read)
        try:
            yield connection
        finally:
            with contextlib.suppress(PipelineError, OSError):
                connection.send("Browser.close")
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(command_write)
            os.close(reply_read)


def open_page(connection: DevTools, path_or_url: str | Path, timeout: float = 60.0) -> BrowserPage:
    """Open a page in a new tab and wait for its load event; the page keeps collecting errors."""
    url = str(path_or_url)
    if "://" not in url:
        url = Path(path_or_url).resolve().as_uri()
    target = connection.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = connection.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    page = BrowserPage(url, connection, session)
    loaded: list[bool] = []

    def listen(message: dict[str, Any]) -> None:
        if message.get("sessionId") != session:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Page.loadEventFired":
            loaded.append(True)
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            page.errors.append("console: " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            page.errors.append(
                "exception: " + str(details.get("exception", {}).get("description") or details.get("text"))
            )
        elif method == "Page.javascriptDialogOpening":  # e.g. an alert() that escaped the escaping
            page.errors.append(f"dialog: {params.get('type')} {params.get('message')}")
            connection.send("Page.handleJavaScriptDialog", {"accept": False}, session)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            page.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())

    connection.listeners.append(listen)
    for domain in ("Page", "Runtime", "Log"):
        connection.call(f"{domain}.enable", {}, session)
    started = time.monotonic()
    connection.call("Page.navigate", {"url": url}, session)
    deadline = started + timeout
    while not loaded:
        if time.monotonic() > deadline:
            raise PipelineError(f"{url} did not finish loading within {timeout:.0f} s")
        connection.pump(deadline - time.monotonic(), until=lambda: bool(loaded))
    page.load_seconds = time.monotonic() - started
    return page
