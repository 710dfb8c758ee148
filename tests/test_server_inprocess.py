"""The HTTP service in-process on the fake engine (no model, no subprocess): every bad input gets
the documented status, error type and message, and the routes' plumbing (queue, SSE framing,
sessions) works. tests/test_server.py proves the whole path on a real server with the real model."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from allinone.conversation.store import SessionStore
from allinone.server.app import create_app
from allinone.service import Assistant
from allinone.settings import Settings

from .fake_engine import GUARDS_OFF, FakeEngine

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    # (the fake model also says one reply to everything, which the copy guard would not let it repeat)
    settings = Settings(home=home, sentiment_prompt="original", reply_max_tokens=24, **GUARDS_OFF)
    assistant = Assistant(engine=FakeEngine(reply="谢谢你的分享!", n_ctx=2048), settings=settings)
    app = create_app(assistant, settings, store=SessionStore(home / "sessions.sqlite3"))
    with TestClient(app) as client:
        yield client


BAD_INPUTS = [
    # (method, path, raw body, headers, status, error type, message fragment)
    ("POST", "/v1/sentiment", b'{"text": "unterminated', JSON, 400, "invalid_request_error", "malformed JSON"),
    ("POST", "/v1/sentiment", b'{"text": "\xff\xfe bad"}', JSON, 400, "invalid_request_error", "not valid UTF-8"),
    ("POST", "/v1/sentiment", b'{"text": "\\ud800"}', JSON, 422, "invalid_request_error", "lone surrogate"),
    (
        "POST",
        "/v1/sentiment",
        b'{"text": 5}',
        JSON,
        422,
        "invalid_request_error",
        "text: Input should be a valid string",
    ),
    ("POST", "/v1/sentiment", b"{}", JSON, 422, "invalid_request_error", "exactly one of `text` or `texts`"),
    ("POST", "/v1/sentiment", b'{"text": "a", "texts": ["b"]}', JSON, 422, "invalid_request_error", "exactly one of"),
    ("POST", "/v1/sentiment", b"[1, 2]", JSON, 422, "invalid_request_error", "valid dictionary"),
    ("POST", "/v1/sentiment", b'{"text": "   "}', JSON, 422, "invalid_request_error", "text is empty"),
    (
        "POST",
        "/v1/sentiment",
        json.dumps({"text": "长" * 20_001}).encode(),
        JSON,
        422,
        "invalid_request_error",
        "the limit is 20000",
    ),
    ("POST", "/v1/sentiment", b'{"texts": []}', JSON, 422, "invalid_request_error", "must not be empty"),
    (
        "POST",
        "/v1/sentiment",
        json.dumps({"texts": ["ok"] * 65}).encode(),
        JSON,
        422,
        "invalid_request_error",
        "the limit is 64",
    ),
    ("POST", "/v1/sentiment", b'{"texts": ["ok", ""]}', JSON, 422, "invalid_request_error", "texts[1]: text is empty"),
    (
        "POST",
        "/v1/sentiment",
        b'{"text": "x", "lang": "zh"}',
        JSON,
        422,
        "invalid_request_error",
        "lang: unknown field",
    ),
    (
        "POST",
        "/v1/sentiment",
        b'{"text": "' + b"a" * 1_100_000 + b'"}',
        JSON,
        413,
        "request_too_large",
        "larger than 1000000 bytes",
    ),
    (
        "POST",
        "/v1/sentiment",
        b'{"text": "hi"}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
        "Content-Type: application/json",
    ),
    ("POST", "/v1/respond", b"{}", JSON, 422, "invalid_request_error", "message: field required"),
    ("POST", "/v1/respond", b'{"message": ""}', JSON, 422, "invalid_request_error", "message is empty"),
    (
        "POST",
        "/v1/respond",
        json.dumps({"message": "x" * 8_001}).encode(),
        JSON,
        422,
        "invalid_request_error",
        "the limit is 8000",
    ),
    (
        "POST",
        "/v1/respond",
        b'{"message": "hi", "stream": "yes"}',
        JSON,
        422,
        "invalid_request_error",
        "stream: Input should be a valid boolean",
    ),
    (
        "POST",
        "/v1/respond",
        b'{"message": "hi", "session_id": "../etc"}',
        JSON,
        422,
        "invalid_request_error",
        "session_id",
    ),
    ("POST", "/v1/respond", b'{"message": "hi", "max_tokens": 0}', JSON, 422, "invalid_request_error", "max_tokens"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', JSON, 422, "invalid_request_error", "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": "hello"}', JSON, 422, "invalid_request_error", "messages"),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "bot", "content": "x"}]}',
        JSON,
        422,
        "invalid_request_error",
        "messages.0.role",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 5}',
        JSON,
        422,
        "invalid_request_error",
        "temperature",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "n": 2}',
        JSON,
        422,
        "invalid_request_error",
        "n:",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
        JSON,
        422,
        "invalid_request_error",
        "max_tokens",
    ),
    ("DELETE", "/v1/sessions/no-such-session", b"", {}, 404, "not_found_error", "no session"),
    ("DELETE", "/v1/sessions/bad!id", b"", {}, 422, "invalid_request_error", "session_id"),
    ("GET", "/v1/sessions/no-such-session", b"", {}, 404, "not_found_error", "no session"),
    ("GET", "/v1/nothing-here", b"", {}, 404, "not_found_error", "Not Found"),
    ("GET", "/v1/sentiment", b"", {}, 405, "method_not_allowed", "Method Not Allowed"),
]


@pytest.mark.parametrize(
    "method,path,body,headers,status,error_type,fragment",
    BAD_INPUTS,
    ids=[f"{r[0]} {r[1]} {r[4]} {r[6][:30]}" for r in BAD_INPUTS],
)
def test_bad_inputs(client, method, path, body, headers, status, error_type, fragment):
    r = client.request(method, path, content=body or None, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == error_type
    assert fragment in error["message"], error["message"]


def sse_events(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        event = next((line[6:].strip() for line in lines if line.startswith("event:")), "message")
        data = "\n".join(line[5:].strip() for line in lines if line.startswith("data:"))
        events.append((event, data if data == "[DONE]" else json.loads(data)))
    return events


def test_respond_streams_sentiment_then_deltas_then_done_and_keeps_the_session(client):
    r = client.post("/v1/respond", json={"message": "我升职了!", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "sentiment" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    session = events[0][1]["session_id"]
    assert "".join(data["text"] for kind, data in events if kind == "delta") == "谢谢你的分享!"
    assert events[0][1]["display"].startswith(("😄 LLM 情感判断", "😞 LLM 情感判断"))
    again = client.post("/v1/respond", json={"message": "还有一件事", "session_id": session}).json()
    assert again["turns"] == 2 and again["reply"] == "谢谢你的分享!"
    turns = client.get(f"/v1/sessions/{session}").json()["turns"]
    assert [t["message"] for t in turns] == ["我升职了!", "还有一件事"]
    assert client.delete(f"/v1/sessions/{session}").json() == {"session_id": session, "deleted": True}


def test_chat_completions_whole_and_streamed(client):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["choices"][0]["message"]["content"] == "谢谢你的分享!" and whole["usage"]["total_tokens"] > 0
    streamed = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = [data for _, data in sse_events(streamed.text)]
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "谢谢你的分享!"


def test_sentiment_and_service_routes(client):
    single = client.post("/v1/sentiment", json={"text": "good"}).json()
    assert single["label"] in ("positive", "negative") and "LLM 情感判断" in single["display"]
    assert len(client.post("/v1/sentiment", json={"texts": ["good", "bad"]}).json()["results"]) == 2
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "allinone"
    assert "allinone_requests_total" in client.get("/metrics").text
    assert client.get("/").headers["content-security-policy"].startswith("default-src 'self'")


def test_a_session_shows_each_turns_number_and_annotations(client):
    first = client.post("/v1/respond", json={"message": "今天好开心"}).json()
    turns = client.get(f"/v1/sessions/{first['session_id']}").json()["turns"]
    assert [t["seq"] for t in turns] == [1]
    stored = turns[0]["annotations"]
    assert list(stored) == ["sentiment"] and stored["sentiment"]["label"] == first["sentiment"]["label"]
    assert stored["sentiment"]["probability"] == pytest.approx(first["sentiment"]["probability"], abs=1e-6)


def test_a_session_database_that_goes_away_answers_503_and_recovers(tmp_path, postgres_cluster):
    from tests.pgcluster import PostgresCluster

    cluster = PostgresCluster().start()
    try:
        settings = Settings(home=tmp_path, sentiment_prompt="original", reply_max_tokens=24, **GUARDS_OFF)
        assistant = Assistant(engine=FakeEngine(reply="谢谢你的分享!", n_ctx=2048), settings=settings)
        store = SessionStore(cluster.url, connect_timeout=2)
        with TestClient(create_app(assistant, settings, store=store)) as client:
            session = client.post("/v1/respond", json={"message": "你好"}).json()["session_id"]
            cluster.stop_server()
            down = client.post("/v1/respond", json={"message": "还在吗", "session_id": session})
            assert down.status_code == 503 and down.json()["error"]["type"] == "store_unavailable"
            assert down.headers["retry-after"] == "5"
            assert client.get(f"/v1/sessions/{session}").status_code == 503
            cluster.start_server()
            back = client.post("/v1/respond", json={"message": "回来了", "session_id": session})
            assert back.status_code == 200 and back.json()["turns"] == 2
            assert [t["message"] for t in client.get(f"/v1/sessions/{session}").json()["turns"]] == ["你好", "回来了"]
    finally:
        cluster.stop()
