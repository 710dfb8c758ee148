"""`bench-memory`: the resident memory of `allinone serve` as a user would drive it.

One server on loopback; its VmRSS and VmHWM (the peak) read from /proc after load and after each
workload in turn: sentiment, every built-in choice and extract role on short texts and on long
ones, chat turns in sessions, OpenAI chat completions (the only workload that opens the plain
context), an inline zero-shot role. The peak only grows, so each row says what the service needed
up to and including that workload.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..settings import Settings
from .common import CliError, progress_bar
from .scale import free_port, memory_mb, start_server, stop_server

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROLES = ["sentiment", "emotion", "intent", "keywords"]
# A user's own labels, sent with the request: answered zero-shot on the plain context.
INLINE_ROLE = {
    "name": "tone",
    "kind": "choice",
    "description": "The tone of a message.",
    "instruction": {"zh": "这条消息的语气是哪一种?", "en": "What is the tone of this message?"},
    "labels": [
        {"name": "calm", "description": "calm, matter-of-fact"},
        {"name": "tense", "description": "worried, stressed or angry"},
        {"name": "glad", "description": "happy or relieved"},
    ],
}


def _texts(path: Path, field: str, limit: int | None = None) -> list[str]:
    """Each line's `field`, in file order; a bad line is named with its file and number."""
    if not path.is_file():
        raise CliError(f"{path}: no such file (--data-dir names the folder of the dev files)")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CliError(f"{path}, line {number}: invalid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
            raise CliError(f"{path}, line {number}: needs a non-empty string field {field!r}")
        texts.append(row[field])
    return texts[:limit] if limit else texts


def workloads(data: Path, limit: int | None) -> list[tuple[str, str, list[dict]]]:
    """(what, endpoint, request bodies), in the order they are sent."""
    short = _texts(data / "intent-dev.jsonl", "text", limit) + _texts(data / "emotion-dev.jsonl", "text", limit)
    # The longest texts first: the attention scratch a pass touches grows with its length.
    long = sorted(_texts(data / "keywords-dev.jsonl", "text"), key=len, reverse=True)[:limit]
    chat = _texts(data / "chat-real-dev.jsonl", "message", limit)
    # Three messages to a session: later turns carry the earlier ones in their prompt.
    respond = [{"message": m, "session_id": f"memory-{i // 3}"} for i, m in enumerate(chat)]
    return [
        (
            "sentiment (sentiment-dev)",
            "/v1/sentiment",
            [{"text": t} for t in _texts(data / "sentiment-dev.jsonl", "text", limit)],
        ),
        ("four roles, short texts (intent, emotion dev)", "/v1/analyze", [{"text": t, "roles": ROLES} for t in short]),
        (
            "four roles, long texts (keywords-dev, longest first)",
            "/v1/analyze",
            [{"text": t, "roles": ROLES} for t in long],
        ),
        ("chat turns, three to a session (chat-real-dev)", "/v1/respond", respond),
        (
            "OpenAI chat completions",
            "/v1/chat/completions",
            [{"messages": [{"role": "user", "content": m}], "max_tokens": 64} for m in chat[:20]],
        ),
        ("an inline zero-shot role", "/v1/analyze", [{"text": m, "roles": [INLINE_ROLE]} for m in chat[:10]]),
    ]


def serve_flags(args) -> list[str]:
    """The settings given on this command line, for the server it starts."""
    flags = []
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            flags += [f"--{key[len('setting_') :].replace('_', '-')}", str(value)]
    return flags


def cmd_bench_memory(args, settings: Settings) -> int:
    import httpx

    if args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    data = Path(args.data_dir)
    phases = workloads(data, args.limit)
    report: dict = {"after_load": None, "workloads": []}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        flags = [*serve_flags(args), "--session-db", str(Path(tmp) / "sessions.sqlite3")]
        proc = start_server(flags, port, Path(tmp) / "serve.log")
        try:
            report["after_load"] = memory_mb(proc.pid)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
            bar = progress_bar(total=sum(len(bodies) for _, _, bodies in phases), desc="bench-memory", unit="req")
            for what, endpoint, bodies in phases:
                for body in bodies:
                    answer = client.post(endpoint, json=body)
                    if answer.status_code != 200:
                        raise CliError(f"{endpoint} answered {answer.status_code}: {answer.text[:300]}")
                    bar.update(1)
                report["workloads"].append(
                    {"what": what, "endpoint": endpoint, "requests": len(bodies), **memory_mb(proc.pid)}
                )
            bar.close()
        finally:
            stop_server(proc)
    report["peak_rss_mb"] = max([report["after_load"]["peak_rss_mb"]] + [w["peak_rss_mb"] for w in report["workloads"]])
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"{'after':52} {'requests':>8} {'RSS MiB':>8} {'peak MiB':>9}")
    print(f"{'load':52} {'':>8} {report['after_load']['rss_mb']:>8} {report['after_load']['peak_rss_mb']:>9}")
    for w in report["workloads"]:
        print(f"{w['what']:52} {w['requests']:>8} {w['rss_mb']:>8} {w['peak_rss_mb']:>9}")
    return 0


def register(command) -> None:
    p = command(
        "bench-memory",
        cmd_bench_memory,
        "Resident memory of `allinone serve` (MiB, from /proc) after load and after each workload: sentiment, "
        "every built-in role on short and long texts, chat sessions, OpenAI completions, an inline role.",
    )
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help=f"where the dev files are (default {DEFAULT_DATA})")
    p.add_argument(
        "--limit",
        type=int,
        default=60,
        help="the first N texts of each dev file, the N longest of keywords-dev (default 60)",
    )
    p.add_argument("--json", action="store_true")
