"""A headless Chromium driven over the Chrome DevTools Protocol, with the `websockets` package we already use.

Enough to click through a page as a person would: open a URL, run JavaScript in it, type into the
focused element, and list every URL the page asked for. Host names do not resolve (only 127.0.0.1
answers), so a page that needs the internet fails here as it would behind a firewall.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.helpers import stop_process, wait_until

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
]


class Browser:
    """One Chromium process with one page; `close()` stops it and its helpers."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._stack = ExitStack()
        try:
            port_file = profile / "DevToolsActivePort"
            wait_until(lambda: port_file.exists() and len(port_file.read_text().split()) == 2, 30, what="DevTools")
            port, path = port_file.read_text().split()
            self.socket: ClientConnection = self._stack.enter_context(
                connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
            )
            self.ids = itertools.count(1)
            self.requested: list[str] = []
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Network.enable", session=self.session)
        except BaseException:  # nothing left running when the page cannot be set up
            self.close()
            raise

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events that come meanwhile are noted."""
        command_id = next(self.ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv(timeout=30))
            if answer.get("method") == "Network.requestWillBeSent":
                self.requested.append(answer["params"]["request"]["url"])
            if answer.get("id") == command_id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=self.session, url=url)

    def run(self, script: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        answer = self.call(
            "Runtime.evaluate", session=self.session, expression=script, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, script: str, what: str, timeout: float = 20) -> Any:
        """Poll a JavaScript expression until it is truthy (the page rendered it)."""
        return wait_until(lambda: self.run(script), timeout, interval=0.1, what=what)

    def type(self, text: str) -> None:
        """Type into the focused element, as a keyboard would."""
        self.call("Input.insertText", session=self.session, text=text)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._stack.close()
        stop_process(self.process)
