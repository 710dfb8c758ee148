"""`bench-batch`: batch throughput in one process and on Ray Data, on the same texts in one run.

Each configuration labels the same texts through the real `batch` path (`run_batch`, writing a
temporary file), and the time of every written line is recorded: end to end (start-up and model
loads included) and steady state (lines per second once the first tenth is written, so start-up
and warm-up are left out). From these: Ray's efficiency (2 actors × 1 thread against twice one
process with 1 thread), its fixed start-up cost, and the input size where it breaks even with one
process using every core.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from ..settings import Settings
from .common import CliError, warn

DEFAULT_TEXTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sentiment-dev.jsonl"


class LineClock:
    """Stands in for the progress bar: the time each line was written."""

    def __init__(self, start: float):
        self.start, self.times = start, []

    def __call__(self, **_):
        return self

    def update(self, n: int) -> None:
        self.times.extend([time.perf_counter()] * n)

    def close(self) -> None:
        pass

    def figures(self) -> dict:
        n = len(self.times)
        first = max(1, n // 10)
        steady = (n - first) / (self.times[-1] - self.times[first - 1]) if n - first > 0 else None
        end_to_end = self.times[-1] - self.start
        return {
            "texts": n,
            "end_to_end_s": round(end_to_end, 2),
            "end_to_end_texts_per_s": round(n / end_to_end, 3),
            "steady_texts_per_s": None if steady is None else round(steady, 3),
            # what start-up costs: end to end minus the steady-state time for the same lines
            "startup_s": None if steady is None else round(end_to_end - n / steady, 2),
        }


def run_config(items: list[dict], settings: Settings, *, threads: int, actors: int | None) -> dict:
    from .batch import AssistantLabeller, run_batch

    recipe = AssistantLabeller(settings, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        start = time.perf_counter()
        clock = LineClock(start)
        if actors is None:
            label = recipe(threads)
            run_batch(items, out, lambda todo: map(label, todo), progress_factory=clock)
        else:
            from ..scale.cluster import ray_session
            from ..scale.ray_batch import label_on_ray

            with ray_session(None, actors * threads) as ray:
                run_batch(
                    items,
                    out,
                    lambda todo: label_on_ray(ray, todo, recipe, actors=actors, threads_per_actor=threads),
                    progress_factory=clock,
                )
        labels = [json.loads(line).get("label") for line in out.read_text(encoding="utf-8").splitlines()]
    return {**clock.figures(), "labels": labels}


def cmd_bench_batch(args, settings: Settings) -> int:
    from ..evaluation.benchmark import spread_evenly
    from ..evaluation.data import DataError, read_jsonl
    from ..scale.cluster import ClusterError

    path = Path(args.texts) if args.texts else DEFAULT_TEXTS
    try:
        items = [{"id": obj.get("id", n), "text": obj["text"]} for n, obj in read_jsonl(path)]
    except DataError as err:
        raise CliError(f"{err} (choose the texts with --texts FILE)") from None
    items = spread_evenly(items, args.limit)
    configs = [
        ("one process, 1 thread", 1, None),
        ("one process, 2 threads", 2, None),
        ("Ray Data, 1 actor × 2 threads", 2, 1),
        ("Ray Data, 2 actors × 1 thread", 1, 2),
    ]
    report: dict = {"texts": len(items), "runs": {}}
    try:
        for name, threads, actors in configs:
            print(f"{name} ...", file=sys.stderr, flush=True)
            report["runs"][name] = run_config(items, settings, threads=threads, actors=actors)
    except ClusterError as err:
        raise CliError(str(err)) from None
    runs = report["runs"]
    reference = runs["one process, 1 thread"]["labels"]
    for name, run in runs.items():
        if run.pop("labels") != reference:
            warn(f"{name}: labels differ from one process, 1 thread")
    single1, single2, ray21 = (
        runs["one process, 1 thread"],
        runs["one process, 2 threads"],
        runs["Ray Data, 2 actors × 1 thread"],
    )
    report["ray_efficiency"] = round(ray21["steady_texts_per_s"] / (2 * single1["steady_texts_per_s"]), 3)
    # Ray 2×1 beats one process with 2 threads end to end from this many texts on (if it ever does)
    gain = 1 / single2["steady_texts_per_s"] - 1 / ray21["steady_texts_per_s"]
    extra = ray21["startup_s"] - single2["startup_s"]
    report["break_even_texts"] = round(extra / gain) if gain > 0 else None
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(items)} texts from {path}")
    print(f"{'configuration':32} {'steady texts/s':>15} {'end-to-end texts/s':>19} {'start-up s':>11}")
    for name, run in runs.items():
        print(f"{name:32} {run['steady_texts_per_s']:>15} {run['end_to_end_texts_per_s']:>19} {run['startup_s']:>11}")
    print(f"Ray efficiency (2 actors × 1 thread) / (2 × one process 1 thread): {report['ray_efficiency']}")
    if report["break_even_texts"] is None:
        print("Ray 2×1 does not beat one process with 2 threads in steady state here: no break-even size")
    else:
        print(f"Ray 2×1 beats one process with 2 threads end to end from about {report['break_even_texts']} texts")
    return 0


def register(command) -> None:
    p = command(
        "bench-batch",
        cmd_bench_batch,
        "Batch throughput on the same texts: one process with 1 and 2 threads, Ray Data with 1 actor × 2 "
        "threads and 2 actors × 1 thread (steady state, end to end, start-up, efficiency, break-even).",
    )
    p.add_argument("--texts", metavar="FILE", help=f"JSONL with `text` (default: {DEFAULT_TEXTS})")
    p.add_argument("--limit", type=int, default=200, help="N texts, spread evenly over the file (default 200)")
    p.add_argument("--json", action="store_true")
    register_serve(command)


SERVE_CONFIGS = {
    "allinone serve (2 threads)": ["--threads", "2"],
    "Ray Serve, 1 replica × 2 threads": ["--ray", "--replicas", "1", "--threads-per-replica", "2"],
    "Ray Serve, 2 replicas × 1 thread": ["--ray", "--replicas", "2", "--threads-per-replica", "1"],
}
READY_LINE = "allinone on Ray Serve"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], port: int, log_path: Path, timeout: float = 300.0):
    import os
    import subprocess

    import httpx

    env = {**os.environ, "ALLINONE_PORT": str(port), "ALLINONE_HOST": "127.0.0.1"}
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "allinone", "serve", *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"`allinone serve {' '.join(flags)}` exited: {log_path.read_text(errors='replace')[-2000:]}")
        ready = "--ray" not in flags or READY_LINE in log_path.read_text(errors="replace")
        try:
            if ready and httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise CliError(f"`allinone serve {' '.join(flags)}` did not become ready in {timeout:.0f} s")


def stop_server(proc) -> None:
    import os
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def memory_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024)
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def cmd_bench_serve(args, settings: Settings) -> int:
    import asyncio

    from ..server.loadtest import SAMPLE_TEXTS, run
    from .common import progress_bar

    concurrencies = [int(c) for c in args.clients.split(",")]
    report: dict = {"duration_s": args.duration, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in SERVE_CONFIGS.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            port = free_port()
            proc = start_server(flags, port, Path(tmp) / f"{port}.log")
            url = f"http://127.0.0.1:{port}"
            try:
                runs = {}
                bar = progress_bar(total=len(concurrencies) + 1, desc=name, unit="run")
                health = asyncio.run(run(url, 1, min(args.duration, 10), SAMPLE_TEXTS, None, health_only=True))
                bar.update(1)
                instances = set(health["instances"])
                for clients in concurrencies:
                    result = asyncio.run(run(url, clients, args.duration, SAMPLE_TEXTS, None))
                    instances.update(result["instances"])
                    runs[clients] = {
                        "requests_per_s": result["ok_per_s"],
                        "p50_ms": result["latency_ms"]["p50"],
                        "p95_ms": result["latency_ms"]["p95"],
                        "non_2xx": result["non_2xx"],
                    }
                    bar.update(1)
                bar.close()
                pids = [int(i.rsplit(":", 1)[1]) for i in instances] or [proc.pid]
                report["configs"][name] = {
                    "clients": runs,
                    "healthz_p50_ms": health["latency_ms"]["p50"],
                    "memory_per_process": [memory_mb(pid) for pid in pids],
                }
            finally:
                stop_server(proc)
    configs = report["configs"]
    plain, proxied = configs["allinone serve (2 threads)"], configs["Ray Serve, 1 replica × 2 threads"]
    report["proxy_overhead_ms"] = {
        # the same compute (one model, 2 threads) with and without Serve's proxy in front
        "sentiment_p50_at_1_client": round(
            proxied["clients"][concurrencies[0]]["p50_ms"] - plain["clients"][concurrencies[0]]["p50_ms"], 1
        ),
        "healthz_p50": round(proxied["healthz_p50_ms"] - plain["healthz_p50_ms"], 1),
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"POST /v1/sentiment, {args.duration:g} s per row")
    print(f"{'configuration':34} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'non-2xx':>8}")
    for name, config in configs.items():
        for clients, r in config["clients"].items():
            print(
                f"{name:34} {clients:>7} {r['requests_per_s']:>7} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['non_2xx']:>8}"
            )
    for name, config in configs.items():
        shown = ", ".join(f"{m['rss_mb']} MB (peak {m['peak_rss_mb']})" for m in config["memory_per_process"])
        print(f"memory per {'replica' if 'Ray' in name else 'process'}, {name}: {shown}")
    overhead = report["proxy_overhead_ms"]
    print(
        f"proxy overhead (1 replica × 2 threads against plain serve): sentiment p50 at 1 client "
        f"{overhead['sentiment_p50_at_1_client']} ms, /healthz p50 {overhead['healthz_p50']} ms"
    )
    return 0


def register_serve(command) -> None:
    p = command(
        "bench-serve",
        cmd_bench_serve,
        "Requests/s and latency of POST /v1/sentiment at several client counts: plain `allinone serve` and Ray "
        "Serve with 1 replica × 2 threads and 2 replicas × 1 thread; the proxy's overhead; memory per replica.",
    )
    p.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated (default 1,4,8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per client count (default 20)")
    p.add_argument("--json", action="store_true")
