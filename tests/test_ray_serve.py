"""`allinone serve --ray`: 2 Ray Serve replicas (one real model each, 1 thread each) behind Serve's
proxy on a loopback port, sessions in a throwaway PostgreSQL. One session whose turns land on both
replicas keeps its history; SSE streams through the proxy; 503 when every replica is full."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray", reason="the scale extra is not installed: pip install -e '.[scale]'")

INSTANCE = "x-allinone-instance"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, default_model_path, postgres_cluster):
    from tests.serverproc import ServerProcess

    proc = ServerProcess(
        tmp_path_factory.mktemp("ray-serve"),
        session_db=postgres_cluster.create_database("ray_serve"),
        # a replica holds 2 requests (1 running, 1 waiting): "full" is reached with a few clients
        env={"ALLINONE_REPLY_MAX_TOKENS": "16", "ALLINONE_QUEUE_SIZE": "1"},
        args=["--ray", "--replicas", "2", "--threads-per-replica", "1"],
    )
    proc.start(timeout=300)
    yield proc
    proc.stop()


def respond(server, message: str, session_id: str | None = None, **extra) -> httpx.Response:
    body = {"message": message, **extra} | ({"session_id": session_id} if session_id else {})
    return httpx.post(f"{server.url}/v1/respond", json=body, timeout=120)


def test_one_session_on_both_replicas_keeps_its_history(ray_server):
    seen, session = [], None
    messages = ["我今天去面试了。", "面试官问了很多问题。", "感觉还可以。", "明天出结果。"] * 4
    for number, message in enumerate(messages, start=1):
        answer = respond(ray_server, message, session)
        assert answer.status_code == 200, answer.text
        session = answer.json()["session_id"]
        assert answer.json()["turns"] == number  # the replica saw every earlier turn, wherever it was stored
        seen.append(answer.headers[INSTANCE])
        if len(set(seen)) == 2 and number >= 3:
            break
    assert len(set(seen)) == 2, f"every turn went to one replica: {seen}"
    stored = httpx.get(f"{ray_server.url}/v1/sessions/{session}", timeout=30).json()["turns"]
    assert [t["seq"] for t in stored] == list(range(1, len(seen) + 1))
    assert [t["message"] for t in stored] == messages[: len(seen)]


def test_sse_streams_through_the_proxy(ray_server):
    with httpx.stream(
        "POST", f"{ray_server.url}/v1/respond", json={"message": "I passed my exam!", "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kinds = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "sentiment" and kinds[-1] == "done" and "delta" in kinds


def test_health_and_metrics_name_the_replica_that_answered(ray_server):
    health = httpx.get(f"{ray_server.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["worker_alive"] is True
    assert health.headers[INSTANCE]
    metrics = httpx.get(f"{ray_server.url}/metrics", timeout=30)
    assert metrics.status_code == 200 and "allinone_queue_size 1" in metrics.text and metrics.headers[INSTANCE]


def test_503_when_every_replica_is_full(ray_server):
    def one(i):
        r = respond(ray_server, f"Tell me about your day, number {i}.", max_tokens=16)
        return r.status_code, r.text

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    # the service recovers once the burst is over
    assert respond(ray_server, "still there?").status_code == 200
    for status, text in answers:
        if status == 503 and text.startswith("{"):
            assert json.loads(text)["error"]["type"] == "server_busy"


def test_a_replica_killed_mid_service_is_replaced_and_requests_go_on(ray_server):
    """Last in this file: it kills one of the two replicas (kill -9 of its process)."""
    import os
    import signal
    import time

    seen = set()
    for _ in range(12):
        seen.add(httpx.get(f"{ray_server.url}/healthz", timeout=30).headers[INSTANCE])
        if len(seen) == 2:
            break
    victim = sorted(seen)[0]
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    answered, deadline = set(), time.monotonic() + 180
    while time.monotonic() < deadline:
        r = respond(ray_server, "我还在吗?")
        if r.status_code == 200:
            answered.add(r.headers[INSTANCE])
        if answered - seen:  # a new replica has taken the dead one's place
            break
        time.sleep(1)
    assert victim not in answered
    assert answered - seen, f"no replacement replica answered within 180 s (answered: {answered})"
