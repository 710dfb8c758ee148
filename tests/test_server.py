"""The HTTP service, end to end: a real `allinone serve` on loopback with the real default model
(the session-scoped `server` fixture in conftest.py), driven over HTTP. Replies are kept short
(max_tokens) so the whole file stays quick on a small CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx

from tests.serverproc import ServerProcess

JSON = {"Content-Type": "application/json"}


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


def sse_events(response: httpx.Response):
    """(event, data) pairs of a Server-Sent Events response."""
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            payload = "\n".join(data)
            yield event, (payload if payload == "[DONE]" else json.loads(payload))
            event, data = "message", []


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


# ---- health, models, metrics ---------------------------------------------------------------------


def test_health_models_and_metrics(server):
    health = httpx.get(server.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["worker_alive"] is True
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"]
    cors = httpx.options(
        server.url + "/v1/sentiment",
        timeout=10,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in cors.headers  # CORS is off by default
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "allinone_requests_total",
        "allinone_request_duration_seconds_bucket",
        "allinone_queue_depth",
        "allinone_generated_tokens_total",
    ):
        assert name in text
    memory = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("process_resident_memory_bytes ", "allinone_peak_resident_memory_bytes "))
    }
    # the model's weights alone are ~470 MiB: a figure below that is not this process's memory; the
    # peak is read first, and rendering the page may take a few more pages
    resident, peak = memory["process_resident_memory_bytes"], memory["allinone_peak_resident_memory_bytes"]
    assert 400 * 2**20 < resident < peak + 2**20


def test_sentiment_single_and_batch(server):
    one = post(server, "/v1/sentiment", {"text": "今天真开心，一切都很顺利！"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["label"] in ("positive", "negative") and 0.5 <= body["probability"] <= 1.0
    assert body["display"] in ("😄 LLM 情感判断: 正面", "😞 LLM 情感判断: 负面")
    batch = post(server, "/v1/sentiment", {"texts": ["I love it", "This is terrible, I hate it."]})
    assert batch.status_code == 200
    assert [r["label"] for r in batch.json()["results"]] == ["positive", "negative"]


def test_analyze_answers_several_roles_and_an_inline_one(server):
    topic = {
        "name": "topic",
        "kind": "choice",
        "description": "what the text is about",
        "instruction": {"en": "What is the text about?"},
        "labels": [{"name": "food", "description": "eating, restaurants"}, {"name": "travel", "description": "trips"}],
    }
    one = post(
        server,
        "/v1/analyze",
        {"text": "The noodles at that stall were cold and bland.", "roles": ["sentiment", "emotion", topic]},
    )
    assert one.status_code == 200, one.text
    roles = one.json()["roles"]
    assert roles["sentiment"]["label"] == "negative" and roles["topic"]["label"] == "food"
    assert roles["emotion"]["label"] in roles["emotion"]["probabilities"]
    listed = {r["name"]: r for r in httpx.get(f"{server.url}/v1/roles").json()["roles"]}
    assert listed["emotion"]["head"] is True and listed["chat"]["kind"] == "chat"
    bad = post(server, "/v1/analyze", {"text": "x", "roles": [{"name": "t", "kind": "choice", "labels": ["a"]}]})
    assert bad.status_code == 422 and "roles[0]" in bad.json()["error"]["message"]


# ---- the OpenAI client ---------------------------------------------------------------------------


def test_openai_client_non_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_client_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    stream = client.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 8


# ---- respond -------------------------------------------------------------------------------------


def test_respond_stream_sentiment_before_first_delta(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/respond",
        json={"message": "我今天考试没考好，很难过。", "stream": True, "max_tokens": 12},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [k for k, _ in events]
    assert kinds[0] == "sentiment", kinds
    assert "delta" in kinds and kinds[-1] == "done", kinds
    # the emotion and intent come once, after the first delta (they cost the first token nothing)
    assert kinds[1] == "delta" and kinds.count("annotations") == 1 and set(kinds[1:-1]) == {"delta", "annotations"}
    sentiment = events[0][1]
    assert sentiment["label"] in ("positive", "negative") and sentiment["display"].endswith(("正面", "负面"))
    shown = events[kinds.index("annotations")][1]
    assert list(shown["roles"]) == ["emotion", "intent"]
    assert shown["roles"]["emotion"]["label"] == "sadness", shown  # 考试没考好，很难过
    assert shown["display"].startswith("😢 悲伤 · ")
    done = events[-1][1]
    assert done["annotations"] == shown
    assert done["session_id"] == sentiment["session_id"]
    assert 0 < done["usage"]["completion_tokens"] <= 12
    assert "".join(d["text"] for k, d in events if k == "delta").strip()


def test_respond_json_keeps_session_and_delete(server):
    first = post(server, "/v1/respond", {"message": "你好，我叫小明。", "max_tokens": 8})
    assert first.status_code == 200, first.text
    sid = first.json()["session_id"]
    assert first.json()["reply"] and first.json()["turns"] == 1
    second = post(server, "/v1/respond", {"message": "谢谢你！", "session_id": sid, "max_tokens": 8})
    assert second.status_code == 200 and second.json()["turns"] == 2
    assert second.json()["usage"]["cached_tokens"] > 0  # the history's prefix came from the cache
    stored = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).json()
    assert [t["message"] for t in stored["turns"]] == ["你好，我叫小明。", "谢谢你！"]
    assert stored["turns"][0]["reply"] == first.json()["reply"]
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).status_code == 404


# ---- load, disconnects ---------------------------------------------------------------------------


def test_twenty_concurrent_clients_get_200_or_503(server):
    statuses, errors = [], []
    barrier = threading.Barrier(20)

    def client(i: int):
        try:
            barrier.wait(30)
            if i % 2:
                r = post(server, "/v1/sentiment", {"text": f"第{i}条：服务很好，我很满意。"})
            else:
                r = post(
                    server,
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": f"Say the number {i}."}], "max_tokens": 4},
                )
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("Retry-After", "").isdigit()
                assert r.json()["error"]["type"] == "server_busy"
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(statuses) == 20
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    health = httpx.get(server.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["worker_alive"]
    assert post(server, "/v1/sentiment", {"text": "还好"}).status_code == 200


def test_disconnect_mid_stream_frees_the_model(server):
    cancelled_before = metric(server, "allinone_cancelled_total")
    tokens_before = metric(server, "allinone_tokens_total", endpoint="chat_completions", kind="completion")
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "max_tokens": 500,
        "stream": True,
    }
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for _event, data in sse_events(r):
                if data != "[DONE]" and data["choices"] and data["choices"][0]["delta"].get("content"):
                    seen += 1
                    if seen >= 3:
                        break  # leave mid-stream: the connection is closed unread
    start = time.monotonic()
    r = post(server, "/v1/sentiment", {"text": "下一个请求"})
    waited = time.monotonic() - start
    assert r.status_code == 200
    # Had generation gone on, the next request would wait for ~500 tokens; it must start promptly.
    assert waited < 30, f"next request waited {waited:.1f} s"
    assert metric(server, "allinone_cancelled_total") == cancelled_before + 1
    generated = metric(server, "allinone_tokens_total", endpoint="chat_completions", kind="completion") - tokens_before
    assert generated < 150, f"{generated} tokens generated after the client left"


# ---- bad inputs (the whole table runs in-process on the fake engine: tests/test_server_inprocess.py) ----


def test_bad_inputs_leave_the_server_healthy(server):
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    assert metric(server, "allinone_requests_total", route="/v1/sentiment", method="POST", status="500") == 0


# ---- security, restarts --------------------------------------------------------------------------


def test_refuses_to_bind_beyond_loopback_without_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ALLINONE_API_KEY"}
    env["ALLINONE_SESSION_DB"] = str(tmp_path / "s.sqlite3")
    done = subprocess.run(
        [sys.executable, "-m", "allinone", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "requires an API key" in done.stderr


def test_kill_9_and_restart_keep_the_session_and_api_key(tmp_path, default_model_path):
    db = tmp_path / "sessions.sqlite3"
    key = {"Authorization": "Bearer s3cret-key"}
    env = {"ALLINONE_API_KEY": "s3cret-key", "ALLINONE_REPLY_MAX_TOKENS": "8"}
    first = ServerProcess(tmp_path, session_db=db, env=env).start()
    try:
        denied = httpx.post(first.url + "/v1/respond", json={"message": "hi"}, timeout=30)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        wrong = httpx.post(
            first.url + "/v1/respond", json={"message": "hi"}, timeout=30, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert httpx.get(first.url + "/healthz", timeout=10).status_code == 200  # probes need no key
        replies = []
        for message in ("我今天升职了！", "但是工作好多，有点累。"):
            r = httpx.post(
                first.url + "/v1/respond",
                json={"message": message, "session_id": "persist-me"},
                headers=key,
                timeout=120,
            )
            assert r.status_code == 200, r.text
            replies.append(r.json()["reply"])
        first.kill9()
    finally:
        first.stop()
    second = ServerProcess(tmp_path, session_db=db, env=env).start()
    try:
        stored = httpx.get(second.url + "/v1/sessions/persist-me", headers=key, timeout=10)
        assert stored.status_code == 200, stored.text
        turns = stored.json()["turns"]
        assert [t["message"] for t in turns] == ["我今天升职了！", "但是工作好多，有点累。"]
        assert [t["reply"] for t in turns] == replies
        more = httpx.post(
            second.url + "/v1/respond", json={"message": "谢谢", "session_id": "persist-me"}, headers=key, timeout=120
        )
        assert more.status_code == 200 and more.json()["turns"] == 3
    finally:
        second.stop()
