"""Load figures for /v1/sentiment: N concurrent clients for a fixed time against a running server.

    python -m allinone.server.loadtest --url http://127.0.0.1:8000 --concurrency 8 --duration 60

Prints requests/s, latency p50/p95/max and the count of non-2xx answers (and of transport errors);
--json for one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

SAMPLE_TEXTS = [
    "今天终于完成了项目，太开心了！",
    "这家餐厅的服务太差了，再也不来了。",
    "The movie was wonderful, I loved every minute.",
    "I waited two hours and nobody helped me.",
    "快递很快，包装也很好。",
    "手机用了三天就坏了，非常失望。",
    "Great value for the price.",
    "The update broke everything, terrible.",
]


def load_texts(path: str | None) -> list[str]:
    if not path:
        return SAMPLE_TEXTS
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["text"] if isinstance(row, dict) else str(row))
    return texts or SAMPLE_TEXTS


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run(
    url: str, concurrency: int, duration: float, texts: list[str], api_key: str | None, *, health_only: bool = False
) -> dict:
    """`health_only`: GET /healthz instead (no model work: what the path to the app costs)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    instances: set[str] = set()
    transport_errors = 0
    stop_at = time.perf_counter() + duration

    async def client(worker: int, http: httpx.AsyncClient):
        nonlocal transport_errors
        i = worker
        while time.perf_counter() < stop_at:
            text = texts[i % len(texts)]
            i += concurrency
            start = time.perf_counter()
            try:
                if health_only:
                    r = await http.get(url.rstrip("/") + "/healthz")
                else:
                    r = await http.post(url.rstrip("/") + "/v1/sentiment", json={"text": text}, headers=headers)
            except httpx.HTTPError:
                transport_errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            instances.add(r.headers.get("x-allinone-instance", ""))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
    wall = time.perf_counter() - began
    total = sum(statuses.values())
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests": total,
        "ok": ok,
        "non_2xx": total - ok,
        "transport_errors": transport_errors,
        "statuses": statuses,
        "requests_per_s": round(total / wall, 2),
        "ok_per_s": round(ok / wall, 2),
        "instances": sorted(i for i in instances if i),  # the Ray Serve replicas that answered
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "max": round(max(latencies), 1) if latencies else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m allinone.server.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--texts", help="JSONL file with a `text` field per line (default: built-in samples)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = asyncio.run(
        run(args.url, args.concurrency, args.duration, load_texts(args.texts), os.environ.get("ALLINONE_API_KEY"))
    )
    if args.json:
        print(json.dumps(report))
    else:
        lat = report["latency_ms"]
        print(
            f"{report['requests']} requests in {report['duration_s']} s with {report['concurrency']} clients: "
            f"{report['requests_per_s']} req/s; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
            f"max {lat['max']} ms; non-2xx {report['non_2xx']} {report['statuses']}; "
            f"transport errors {report['transport_errors']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
