"""llama.cpp's own `llama-server` as the benchmark's peer, the strongest thing a user could run
instead: a two-word grammar, one predicted token, prompt caching on, its own defaults otherwise
(repacking, flash attention 'auto', all cores). Started on loopback by the bench, stopped after.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx

from .bench import BaselineResult, label_from_generated

GRAMMAR = 'root ::= " Positive" | " Negative"'


class LlamaServerPeer:
    def __init__(
        self,
        binary: Path,
        model: Path,
        prompt_template: str,
        *,
        threads: int,
        context_size: int = 4096,
        startup_timeout: float = 120.0,
    ):
        if not Path(binary).is_file():
            raise FileNotFoundError(f"llama-server not found at {binary} (build it with `make llama-server`)")
        self.prompt_template = prompt_template
        self.model = Path(model)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                str(binary),
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--threads",
                str(threads),
                "--ctx-size",
                str(context_size),
                "--parallel",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.client = httpx.Client(timeout=120.0)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "llama-server exited at start: " + self.process.stderr.read().decode(errors="replace")[-1500:]
                )
            try:
                if self.client.get(self.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"llama-server did not become healthy within {startup_timeout:.0f} s")
            time.sleep(0.2)

    def analyze(self, text: str) -> BaselineResult:
        reply = self.client.post(
            self.url + "/completion",
            json={
                "prompt": self.prompt_template.replace("{text}", text),
                "n_predict": 1,
                "temperature": 0,
                "grammar": GRAMMAR,
                "cache_prompt": True,
            },
        )
        reply.raise_for_status()
        return label_from_generated(reply.json().get("content", ""))

    def warm_prefix(self) -> None:
        """Leave the server's slot holding just the prompt's fixed beginning, as our own lanes are
        left before each timed call (the same fairness rule for both)."""
        head = self.prompt_template.split("{text}")[0]
        self.client.post(self.url + "/completion", json={"prompt": head, "n_predict": 0, "cache_prompt": True})

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
