"""One inference thread, a bounded queue in front of it.

The engine is not thread-safe, so every model call runs on the single worker thread. A request
becomes a `Job`: a function run on that thread, which reports back through `emit` (events cross
to the event loop with `call_soon_threadsafe`, so the loop never blocks on inference). A full
queue refuses new jobs at once (`Busy` -> 503). A job is cancelled when its client goes away or
its deadline passes: `should_stop` turns true, the generation loop stops at the next token, and
the worker takes the next job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("allinone.server")

END = "end"  # the last event of every job
ERROR = "error"


class Busy(Exception):
    """The queue is full."""


class JobTimeout(Exception):
    pass


class Job:
    def __init__(self, fn: Callable[[Job], None], loop: asyncio.AbstractEventLoop, deadline: float, name: str):
        self.fn = fn
        self.name = name
        self.loop = loop
        self.deadline = deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    # ---- worker side ----
    def emit(self, kind: str, data: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self._cancelled.is_set() or self.timed_out()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # ---- loop side ----
    def cancel(self) -> None:
        self._cancelled.set()

    async def next_event(self) -> tuple[str, Any]:
        """The next event; a (ERROR, JobTimeout) if none comes before the deadline (plus grace:
        the worker itself enforces the deadline, this only guards against a stuck worker)."""
        remaining = self.deadline - time.monotonic() + 10.0
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(remaining, 0.1))
        except TimeoutError:
            self.cancel()
            return ERROR, JobTimeout("the request timed out")

    async def events_until_end(self):
        while True:
            kind, data = await self.next_event()
            if kind == END:
                return
            yield kind, data
            if kind == ERROR:
                return


class Worker:
    def __init__(self, queue_size: int, timeout: float):
        self.queue_size = queue_size
        self.timeout = timeout
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.running: Job | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    def busy(self) -> bool:
        return self.running is not None

    def retry_after(self) -> int:
        return max(1, min(60, self.depth()))

    def submit(self, fn: Callable[[Job], None], *, name: str = "job", timeout: float | None = None) -> Job:
        if not self.alive():
            raise Busy("the inference worker is not running")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        job = Job(fn, asyncio.get_running_loop(), deadline, name)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy ({self.queue_size} requests waiting); try again shortly") from None
        return job

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        # Cancel what is waiting, then wake the thread.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(ERROR, Busy("the server is shutting down"))
                job.emit(END)
        if self.running is not None:
            self.running.cancel()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping:
                if job is not None:
                    job.emit(ERROR, Busy("the server is shutting down"))
                    job.emit(END)
                if job is None:
                    return
                continue
            if job.cancelled:  # the client left while waiting
                job.emit(END)
                continue
            if job.timed_out():
                job.emit(ERROR, JobTimeout("the request timed out while waiting for the model"))
                job.emit(END)
                continue
            self.running = job
            try:
                job.fn(job)
            except Exception as err:  # reported to the client; the worker goes on
                if not isinstance(err, (ValueError, JobTimeout)):
                    log.exception("job %s failed", job.name)
                job.emit(ERROR, err)
            finally:
                self.running = None
                job.emit(END)
