"""The command line, run as a user runs it (a subprocess each), on the real default model."""

import json
import subprocess
import sys

import pytest


def run(args, env, stdin: bytes | str | None = None, timeout=300):
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    done = subprocess.run([sys.executable, "-m", "allinone", *args], input=stdin, capture_output=True,
                          env=env, timeout=timeout)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def test_analyze_json_acceptance_example(cli_env):
    code, out, err = run(["analyze", "--json", "今天的实验终于成功了,太棒了!",
                          "The service was slow and the food was cold."], cli_env)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    for row in rows:
        assert set(row) == {"text", "label", "probability", "latency_ms"}
        assert 0.5 <= row["probability"] <= 1


def test_analyze_reads_stdin_lines(cli_env):
    code, out, err = run(["analyze", "--json"], cli_env, stdin="太好吃了!\n\nterrible, never again\n")
    assert code == 0, err
    assert [json.loads(line)["label"] for line in out.splitlines()] == ["positive", "negative"]


@pytest.mark.parametrize("args,stdin,message", [
    (["analyze", ""], None, "empty"),
    (["analyze", "   "], None, "empty"),
    (["analyze"], b"", "no text"),
    (["analyze"], b"ok line\n\xff\xfe broken\n", "line 2: not valid UTF-8"),
    (["analyze", "x" * 20001], None, "limit"),
])
def test_bad_analyze_input_exits_2_with_a_clear_message(cli_env, args, stdin, message):
    code, out, err = run(args, cli_env, stdin=stdin)
    assert code == 2
    assert message in err
    assert out == ""


def test_model_json(cli_env):
    code, out, err = run(["model", "--json"], cli_env)
    assert code == 0, err
    info = json.loads(out)
    assert info["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert info["size"] == 491_400_064 and info["verified"] is True
    assert info["architecture"] == "qwen2" and info["context_length"] == 32768


def test_missing_model_path_is_a_clear_error(cli_env, tmp_path):
    code, _, err = run(["analyze", "--model", str(tmp_path / "nope.gguf"), "hello"], cli_env)
    assert code == 1 and "model not found" in err


def test_chat_shows_sentiment_then_reply_and_handles_commands(cli_env):
    stdin = "今天的实验终于成功了,太棒了!\n/reset\nI lost my wallet today.\n/exit\n"
    code, out, err = run(["chat", "--reply-max-tokens", "32"], cli_env, stdin=stdin)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "😄 LLM 情感判断: 正面"
    assert lines[1].strip()  # the reply
    assert "(new conversation)" in lines
    after_reset = lines[lines.index("(new conversation)") + 1:]
    assert after_reset[0] == "😞 LLM 情感判断: 负面"
    assert after_reset[1].strip()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_batch_is_resumable_without_duplicates_or_loss(cli_env, tmp_path):
    rows = [{"id": f"t{i}", "text": t, "label": "gold", "extra": i} for i, t in enumerate(
        ["很好", "很差", "great stuff", "awful", "还不错", "meh, broken on arrival"])]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 0, err
    complete = out.read_text(encoding="utf-8").splitlines()
    assert len(complete) == 6
    first = json.loads(complete[0])
    assert first["id"] == "t0" and first["extra"] == 0 and first["input_label"] == "gold"
    assert first["label"] in ("positive", "negative") and 0.5 <= first["probability"] <= 1
    # simulate an interruption: three lines written, the fourth torn mid-write
    out.write_text("\n".join(complete[:3]) + "\n" + complete[3][:10], encoding="utf-8")
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 0, err
    assert "3 already done" in err
    resumed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in rows]
    assert [r["label"] for r in resumed] == [json.loads(line)["label"] for line in complete]


def test_batch_refuses_output_of_another_input(cli_env, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "a", "text": "好"}])
    write_jsonl(out, [{"id": "zzz", "text": "other", "label": "positive"}])
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 2 and "does not match" in err


@pytest.mark.parametrize("content,message", [
    (b'{"text": "ok", "label": "positive"}\n{"text": "broken\n', "line 2: invalid JSON"),
    (b'{"text": "ok", "label": "positive"}\n{"text": "\xff\xfe"}\n', "line 2: not valid UTF-8"),
    (b'{"text": "ok", "label": "positive"}\n[1, 2]\n', "line 2: expected a JSON object"),
    (b'{"text": "", "label": "positive"}\n', "line 1: needs a non-empty string field 'text'"),
    (b'{"text": 5, "label": "positive"}\n', "line 1: needs a non-empty string field 'text'"),
    (b'{"text": "ok", "label": "neutral"}\n', "line 1: 'label' must be one of"),
])
def test_bad_eval_files_name_the_line(cli_env, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code, _, err = run(["eval", str(data)], cli_env)
    assert code == 2
    assert message in err


def test_bad_batch_file_names_the_line_and_writes_nothing(cli_env, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{oops}\n')
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 2 and "in.jsonl line 2: invalid JSON" in err
    assert not out.exists()


def test_eval_json_has_the_documented_fields(cli_env, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [
        {"text": "太棒了,非常满意", "label": "positive", "lang": "zh", "source": "a"},
        {"text": "The worst hotel I have ever stayed in.", "label": "negative", "lang": "en", "source": "b"},
    ])
    for method in ("score", "seed"):
        code, out, err = run(["eval", str(data), "--json", "--method", method], cli_env)
        assert code == 0, err
        report = json.loads(out)
        assert report["n"] == 2 and report["method"] == method
        assert set(report["by_lang"]) == {"zh", "en"} and set(report["by_source"]) == {"a", "b"}
        assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p95"] >= report["latency_ms"]["p50"]
        assert sum(sum(row.values()) for row in report["confusion"].values()) == 2


def test_eval_chat_reports_pass_rate_and_writes_replies(cli_env, tmp_path):
    data, out = tmp_path / "chat.jsonl", tmp_path / "replies.jsonl"
    write_jsonl(data, [
        {"id": "a", "lang": "zh", "sentiment": "positive", "message": "我今天学会了游泳!"},
        {"id": "b", "lang": "en", "sentiment": "negative", "message": "My phone fell in the lake."},
    ])
    code, stdout, err = run(["eval-chat", str(data), "--json", "--out", str(out), "--reply-max-tokens", "48"], cli_env)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n"] == 2 and 0.0 <= report["pass_rate"] <= 1.0
    assert set(report["pass_rate_by_lang"]) == {"zh", "en"}
    replies = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in replies] == ["a", "b"]
    assert all(r["reply"].strip() and isinstance(r["failures"], list) for r in replies)


def test_eval_chat_rejects_malformed_messages(cli_env, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, [{"id": "a", "lang": "fr", "sentiment": "positive", "message": "salut"}])
    code, _, err = run(["eval-chat", str(data)], cli_env)
    assert code == 2 and "lang zh|en" in err
