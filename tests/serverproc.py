"""Start and stop a real `allinone serve` subprocess on a free loopback port (used by the server
and page tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from allinone.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        session_db: Path | str | None = None,
        env: dict | None = None,
        port: int | None = None,
        args: list[str] | None = None,
    ):
        self.args = args or []
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.session_db = session_db or workdir / "sessions.sqlite3"
        self.log_path = workdir / f"server-{self.port}-{int(time.time() * 1000)}.log"
        self.env = dict(os.environ)
        self.env.setdefault("ALLINONE_HOME", str(Settings().resolved_home()))
        self.env.update(
            {"ALLINONE_HOST": "127.0.0.1", "ALLINONE_PORT": str(self.port), "ALLINONE_SESSION_DB": str(self.session_db)}
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "allinone", "serve", *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            try:  # whatever it started in its own session (Ray's processes) goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if hasattr(self, "_log"):
            self._log.close()
