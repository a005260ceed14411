"""A real headless Chromium (Debian's package, `make test` installs it) driven over the DevTools protocol through
a pipe (``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), standard library only."""
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Browser:
    """Opens ``path`` (a local file) with the network cut off, and answers JavaScript questions about the page."""

    def __init__(self, timeout: float = 60.0):
        exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
        if exe is None:
            raise RuntimeError("no Chromium found: `make test` installs Debian's chromium package")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # Chromium's ends above 9 (no redirection below overwrites the other), put on 3 and 4 by bash (dash
        # takes single-digit fds only).
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                f"--user-data-dir={self.profile}", "--proxy-server=127.0.0.1:9", "about:blank"]  # no network
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]}', exe, *args],
                                     pass_fds=ends, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._buffer, self._next_id, self.events = b"", 0, []
        self.timeout = timeout

    def _send(self, method: str, params: Dict[str, Any] = None, session: str = None) -> Dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> Dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        decoded = json.loads(message)
        if "method" in decoded:
            self.events.append(decoded)
        return decoded

    def open(self, path: Path) -> str:
        """Load the page; returns the DevTools session to ``evaluate`` in."""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self._send(f"{domain}.enable", session=session)
        self._send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._receive()
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        result = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        return result["result"].get("value")

    def requested_urls(self) -> List[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except (RuntimeError, OSError):
            pass
        self.proc.wait(timeout=30)
        for fd in (self._read, self._write):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)
