"""The command line's error paths, in-process (no model, no subprocess): bad input gets a clear
message and exit code 2, before any model is loaded (the home directory here holds no model, so a
load would fail differently). tests/test_cli.py runs the commands as a user does, on the real model."""

from __future__ import annotations

import io
import json
import sys

import pytest

from allinone.cli.main import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture()
def cli(tmp_path, monkeypatch, capsys):
    """cli(args, stdin=None) -> (exit code, stdout, stderr), with an empty ALLINONE_HOME."""
    home = tmp_path / "empty-home"
    monkeypatch.setenv("ALLINONE_HOME", str(home))

    def run(args, stdin: bytes | str | None = None):
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8"))
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    run.home = home
    return run


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (["analyze", ""], None, "empty"),
        (["analyze", "   "], None, "empty"),
        (["analyze"], b"", "no text"),
        (["analyze"], b"ok line\n\xff\xfe broken\n", "line 2: not valid UTF-8"),
        (["analyze", "x" * 20001], None, "limit"),
    ],
)
def test_bad_analyze_input_exits_2_with_a_clear_message(cli, args, stdin, message):
    code, out, err = cli(args, stdin=stdin)
    assert code == 2
    assert message in err
    assert out == ""


def test_missing_model_path_is_a_clear_error(cli, tmp_path):
    code, _, err = cli(["analyze", "--model", str(tmp_path / "nope.gguf"), "hello"])
    assert code == 1 and "model not found" in err


def test_batch_refuses_output_of_another_input(cli, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "a", "text": "好"}])
    write_jsonl(out, [{"id": "zzz", "text": "other", "label": "positive"}])
    code, _, err = cli(["batch", str(src), "-o", str(out)])
    assert code == 2 and "does not match" in err


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"text": "ok", "label": "positive"}\n{"text": "broken\n', "line 2: invalid JSON"),
        (b'{"text": "ok", "label": "positive"}\n{"text": "\xff\xfe"}\n', "line 2: not valid UTF-8"),
        (b'{"text": "ok", "label": "positive"}\n[1, 2]\n', "line 2: expected a JSON object"),
        (b'{"text": "", "label": "positive"}\n', "line 1: needs a non-empty string field 'text'"),
        (b'{"text": 5, "label": "positive"}\n', "line 1: needs a non-empty string field 'text'"),
        (b'{"text": "ok", "label": "neutral"}\n', "line 1: 'label' must be one of"),
    ],
)
def test_bad_eval_files_name_the_line(cli, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code, _, err = cli(["eval", str(data)])
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    "manifest,message",
    [
        (b'{"Shop": [{"label": "a"}, ', "labels.json: invalid JSON"),
        (b"\xff\xfe", "labels.json: 'utf-8' codec can't decode"),
        (b"[]", "labels.json: expected an object of source -> label list"),
        (b'{"Shop": "a, b"}', "labels.json: Shop: expected a list of labels"),
        (
            b'{"Shop": [{"label": "a"}, {"name": "b"}]}',
            "labels.json: Shop[1]: expected {'label': ..., 'description': ...}",
        ),
        (b'{"Shop": [{"label": "a"}, {"label": "a"}]}', "duplicate label 'a'"),
        (b'{"Shop": [{"label": "a"}]}', "labels.json (Shop): labels: 1 label(s); a role has 2 to 200"),
    ],
)
def test_a_broken_label_manifest_is_named_before_the_model_loads(cli, tmp_path, manifest, message):
    labels, data = tmp_path / "labels.json", tmp_path / "data.jsonl"
    labels.write_bytes(manifest)
    write_jsonl(data, [{"text": "hi", "label": "a", "source": "Shop"}])
    code, _, err = cli(["eval", str(data), "--labels", str(labels)])
    assert code == 2 and message in err, err
    code, _, err = cli(["eval", str(data), "--train", str(data)])
    assert code == 2 and "--train goes with --labels" in err


def test_bad_batch_file_names_the_line_and_writes_nothing(cli, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{oops}\n')
    code, _, err = cli(["batch", str(src), "-o", str(out)])
    assert code == 2 and "in.jsonl line 2: invalid JSON" in err
    assert not out.exists()


def test_eval_chat_rejects_malformed_messages(cli, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, [{"id": "a", "lang": "fr", "sentiment": "positive", "message": "salut"}])
    code, _, err = cli(["eval-chat", str(data)])
    assert code == 2 and "lang zh|en" in err


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "good", "label": "positive"}] * 3 + [{"text": "bad", "label": "negative"}] * 3, "too few"),
        ([{"text": f"good {i}", "label": "positive"} for i in range(30)], "only 0 'negative'"),
        ([{"text": "good", "label": "positive"}, {"text": "bad", "label": "maybe"}], "line 2: 'label' must be one of"),
    ],
)
def test_train_head_refuses_unusable_data(cli, tmp_path, rows, message):
    data = tmp_path / "bad.jsonl"
    write_jsonl(data, rows)
    code, out, err = cli(["train-head", str(data)])
    assert code == 2 and message in err
    assert not (cli.home / "heads").exists()


def test_train_head_names_a_broken_line(cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "good", "label": "positive"}\n{"text": broken\n')
    code, _, err = cli(["train-head", str(data)])
    assert code == 2 and "bad.jsonl line 2: invalid JSON" in err


def test_train_head_reads_several_files_and_chat_rows_as_one_set(cli, tmp_path):
    """A chat file's message/sentiment rows count like text/label rows; the files are one set, so
    what only their union has (both labels) is enough, and a bad line is named by its own file."""
    reviews, chats = tmp_path / "reviews.jsonl", tmp_path / "chats.jsonl"
    write_jsonl(reviews, [{"text": f"good {i}", "label": "positive"} for i in range(30)])
    write_jsonl(chats, [{"message": f"my cat is sick {i}", "sentiment": "negative"} for i in range(2)])
    code, _, err = cli(["train-head", str(reviews), str(chats)])
    assert code == 2 and "only 2 'negative'" in err  # both files were read; 2 is still too few
    write_jsonl(chats, [{"message": "my cat is sick", "sentiment": "negative"}, {"message": "", "sentiment": "x"}])
    code, _, err = cli(["train-head", str(reviews), str(chats)])
    assert code == 2 and "chats.jsonl line 2: needs a non-empty string field 'text' (or 'message')" in err


def test_a_broken_role_file_is_named_with_its_field_and_nothing_else_runs(cli):
    roles = cli.home / "roles"
    roles.mkdir(parents=True)
    broken = roles / "mine.json"
    broken.write_text(
        '{"name": "mine", "kind": "choice", "description": "d", "instruction": "i", "labels": ["a", "a"]}'
    )
    for args in (["roles"], ["analyze", "some text"], ["analyze", "--roles", "sentiment", "some text"]):
        code, out, err = cli(args)
        assert code == 2 and out == "", args
        assert str(broken) in err and "labels[1]" in err and "duplicate label 'a'" in err, err
    broken.write_text('{"name": "mine", "kind": "choice",')
    code, _, err = cli(["roles"])
    assert code == 2 and str(broken) in err and "line 1" in err


def test_unknown_roles_and_role_files_are_refused_before_the_model_loads(cli, tmp_path):
    code, _, err = cli(["eval", str(tmp_path / "x.jsonl"), "--role", "nope"])
    assert code == 2 and "unknown role 'nope'; roles: " in err
    code, _, err = cli(["train-head", "--role", "chat-nope"])
    assert code == 2 and "unknown role 'chat-nope'" in err
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"text": "t", "label": "furious"}])
    code, _, err = cli(["eval", str(data), "--role", "emotion"])
    assert code == 2 and f"{data} line 1: 'label' must be one of anger, disgust" in err


def test_an_unreachable_session_database_exits_2_before_the_model_loads(cli):
    pytest.importorskip("psycopg", reason="the scale extra is not installed")
    from tests.pgcluster import free_port

    code, _, err = cli(["serve", "--session-db", f"postgresql://me:pw@127.0.0.1:{free_port()}/sessions"])
    assert code == 2
    assert "session database postgresql://me:***@127.0.0.1" in err and "pw@" not in err


def test_an_unknown_session_database_kind_exits_2(cli):
    code, _, err = cli(["serve", "--session-db", "mysql://localhost/db"])
    assert code == 2 and "not supported" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["batch", "IN", "-o", "OUT", "--ray", "127.0.0.1:PORT"], "cannot connect"),
        (["batch", "IN", "-o", "OUT", "--ray", "nowhere"], "expected HOST:PORT"),
        (["batch", "IN", "-o", "OUT", "--ray", "--actors", "64", "--threads-per-actor", "4"], "CPUs"),
        (["serve", "--ray", "127.0.0.1:PORT"], "cannot connect"),
        (["serve", "--ray", "--replicas", "64", "--threads-per-replica", "4"], "CPUs"),
        (["serve", "--ray", "--autoscale", "3,1"], "MIN <= MAX"),
        (["serve", "--ray", "--autoscale", "two"], "two whole numbers"),
    ],
)
def test_ray_requests_that_cannot_run_exit_2_before_any_work(cli, tmp_path, args, message):
    pytest.importorskip("ray", reason="the scale extra is not installed")
    from tests.pgcluster import free_port

    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": "a", "text": "fine"}])
    args = [
        {"IN": str(src), "OUT": str(tmp_path / "out.jsonl")}.get(a, a.replace("PORT", str(free_port()))) for a in args
    ]
    code, _, err = cli(args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_train_head_label_map_renames_and_leaves_out_labels_of_another_task(cli, tmp_path):
    """An emotion file teaches the mood through --label-map: mapped labels count as the role's,
    '-' and '*' leave lines out, and a map to a label the role lacks is refused before any work."""
    emotions = tmp_path / "emotions.jsonl"
    rows = [{"text": f"so happy {i}", "label": "joy"} for i in range(20)]
    rows += [{"text": f"so sad {i}", "label": "sadness"} for i in range(2)]
    rows += [{"text": f"oh! {i}", "label": "surprise"} for i in range(10)]
    write_jsonl(emotions, rows)
    code, _, err = cli(["train-head", str(emotions), "--label-map", "joy=positive,sadness=negative,*=-"])
    assert code == 2 and "only 2 'negative'" in err, err  # mapped and counted; surprise left out
    code, _, err = cli(["train-head", str(emotions), "--label-map", "joy=positive,sadness=negative"])
    assert code == 2 and "emotions.jsonl line 23: 'label' must be one of positive, negative, got 'surprise'" in err
    for spec, message in [
        ("joy=happy", "'happy' is not one of positive, negative"),
        ("joy", "expected FROM=TO"),
        ("joy=positive,joy=negative", "'joy' is mapped twice"),
        (",", "label map is empty"),
    ]:
        code, _, err = cli(["train-head", str(emotions), "--label-map", spec])
        assert code == 2 and message in err, (spec, err)
    code, _, err = cli(["train-head", "--label-map", "joy=positive"])
    assert code == 2 and "--label-map renames the labels of DATA files" in err
    assert not (cli.home / "heads").exists()


def test_a_label_map_applies_only_to_labels_the_role_lacks(tmp_path):
    """A role's own label, even capitalised, keeps its meaning when '*' leaves the others out."""
    from allinone.evaluation.data import load_labelled, parse_label_map

    data = tmp_path / "mixed.jsonl"
    write_jsonl(
        data, [{"text": "a", "label": "Positive"}, {"text": "b", "label": "joy"}, {"text": "c", "label": "awe"}]
    )
    label_map = parse_label_map("joy=negative,*=-", ["positive", "negative"])
    rows = load_labelled(data, labels=["positive", "negative"], label_map=label_map)
    assert [(r["text"], r["label"]) for r in rows] == [("a", "positive"), ("b", "negative")]


def test_bench_memory_checks_its_data_before_starting_a_server(cli, tmp_path):
    code, _, err = cli(["bench-memory", "--data-dir", str(tmp_path / "nowhere")])
    assert code == 2 and "no such file" in err
    code, _, err = cli(["bench-memory", "--limit", "0"])
    assert code == 2 and "--limit must be at least 1" in err
    for name in ("intent-dev", "emotion-dev", "keywords-dev", "sentiment-dev"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": "好"}])
    (tmp_path / "chat-real-dev.jsonl").write_text('{"message": "ok"}\n{"message": \n', encoding="utf-8")
    code, _, err = cli(["bench-memory", "--data-dir", str(tmp_path)])
    assert code == 2 and "chat-real-dev.jsonl, line 2: invalid JSON" in err
    write_jsonl(tmp_path / "chat-real-dev.jsonl", [{"text": "a message without its field"}])
    code, _, err = cli(["bench-memory", "--data-dir", str(tmp_path)])
    assert code == 2 and "needs a non-empty string field 'message'" in err
