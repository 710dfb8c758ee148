"""`allinone batch --ray` without the model: a local Ray (loopback, 2 CPUs) and actors whose
labeller is a stand-in. Order, resume, per-line errors, a dying actor, threads per actor.
tests/test_cli.py::test_batch_on_ray_matches_the_single_process_run runs the real model."""

from __future__ import annotations

import json
import os
import time

import pytest

from allinone.cli.batch import AssistantLabeller, labelled_row, run_batch, sentiment_fields
from allinone.roles.inputs import InputError
from allinone.settings import Settings

pytest.importorskip("ray", reason="the scale extra is not installed: pip install -e '.[scale]'")
pytestmark = pytest.mark.slow  # a local Ray and its actors: ~40 s

from allinone.scale.cluster import ray_session  # noqa: E402
from allinone.scale.ray_batch import label_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def ray():
    with ray_session(None, 2) as ray:
        yield ray


class Verdict:
    label = "positive"
    probability = 0.75
    truncated = False


def slow_labeller(threads: int):
    """Answers each text after 20 ms (so both actors get work); an empty text is refused as the
    real analyst refuses it."""
    pid = os.getpid()

    def analyze(text: str):
        time.sleep(0.02)
        if not text.strip():
            raise InputError("text is empty")
        return Verdict()

    return lambda item: {**labelled_row(item, analyze, sentiment_fields), "pid": pid, "threads": threads}


def items(n: int) -> list[dict]:
    return [{"id": f"r{i}", "text": "" if i % 13 == 5 else f"text {i}", "label": "gold", "extra": i} for i in range(n)]


def test_lines_come_back_in_input_order_from_every_actor(ray):
    todo = items(60)
    rows = list(label_on_ray(ray, todo, slow_labeller, actors=2, threads_per_actor=1))
    assert [r["id"] for r in rows] == [t["id"] for t in todo]
    assert len({r["pid"] for r in rows}) == 2  # two actors, each its own process
    assert {r["threads"] for r in rows} == {1}
    # the output contract: other fields kept, a given label kept aside, a bad line its error
    assert rows[1]["extra"] == 1 and rows[1]["input_label"] == "gold" and rows[1]["label"] == "positive"
    assert rows[5]["error"] == "text is empty" and "label" not in rows[5]


def test_an_interrupted_run_resumes_without_duplicates(ray, tmp_path):
    todo = items(40)
    out = tmp_path / "out.jsonl"
    first = list(label_on_ray(ray, todo[:10], slow_labeller, actors=2, threads_per_actor=1))
    out.write_text("".join(json.dumps(r) + "\n" for r in first) + '{"id": "r10", "te', encoding="utf-8")  # torn
    summary = run_batch(todo, out, lambda rest: label_on_ray(ray, rest, slow_labeller, actors=2, threads_per_actor=1))
    assert summary == {"total": 40, "skipped": 10, "written": 30}
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == [t["id"] for t in todo]


def dying_labeller(threads: int):
    """Kills its own actor process at text 17, once (a marker file remembers), as an actor lost
    to the OOM killer would die."""
    label = slow_labeller(threads)
    marker = os.environ["ALLINONE_TEST_DIE_ONCE"]

    def maybe_die(item):
        if item["id"] == "r17" and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return label(item)

    return maybe_die


def test_a_dying_actor_is_replaced_and_its_lines_redone_once(ray, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    # actors inherit the driver's environment only through runtime_env; a file path is enough here
    todo = items(40)
    recipe = _with_env(dying_labeller, "ALLINONE_TEST_DIE_ONCE", str(marker))
    rows = list(label_on_ray(ray, todo, recipe, actors=2, threads_per_actor=1))
    assert marker.exists()  # it did die
    assert [r["id"] for r in rows] == [t["id"] for t in todo]


def _with_env(factory, name: str, value: str):
    def make(threads: int):
        os.environ[name] = value
        return factory(threads)

    return make


def test_the_assistant_recipe_gives_each_actor_its_thread_count():
    loaded = []

    def load(settings):
        loaded.append(settings.threads)

        class Stub:
            def analyze(self, text):
                return Verdict()

        return Stub()

    recipe = AssistantLabeller(Settings(threads=2), None)
    label = recipe(1, load=load)
    assert loaded == [1]
    assert label({"id": "a", "text": "x"})["label"] == "positive"
    recipe(None, load=load)
    assert loaded == [1, 2]


def test_a_directory_of_shards_streams_through_and_resumes_by_shard(ray, tmp_path):
    from allinone.scale.ray_batch import label_shards_on_ray

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    shards = {f"part-{n}.jsonl": items(7 + n)[: 7 + n] for n in range(3)}
    for name, rows in shards.items():
        lines = [json.dumps(r) for r in rows]
        if name == "part-1.jsonl":
            lines.insert(3, '{"id": "broken", "text": ')  # a bad line gets its error; the rest go on
            lines.insert(5, '["not", "an", "object"]')
        (in_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (in_dir / "empty.jsonl").write_text("", encoding="utf-8")
    (in_dir / "notes.txt").write_text("not a shard", encoding="utf-8")
    # an earlier run finished part-0 and was interrupted in part-1
    out_dir.mkdir()
    (out_dir / "part-0.jsonl").write_text("done before\n", encoding="utf-8")
    (out_dir / "part-1.jsonl.partial").write_text('{"id": "r0"}\n', encoding="utf-8")

    summary = label_shards_on_ray(ray, in_dir, out_dir, slow_labeller, actors=2, threads_per_actor=1)
    assert summary == {"shards": 4, "skipped_shards": 1, "written": 8 + 2 + 9}
    assert sorted(p.name for p in out_dir.iterdir()) == ["empty.jsonl", "part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert (out_dir / "part-0.jsonl").read_text() == "done before\n"  # a finished shard is not redone
    part1 = [json.loads(line) for line in (out_dir / "part-1.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r.get("id") for r in part1] == ["r0", "r1", "r2", None, "r3", None, "r4", "r5", "r6", "r7"]
    assert part1[3]["error"].startswith("not valid JSON") and part1[3]["input"].startswith('{"id": "broken"')
    assert part1[5]["error"] == 'needs a JSON object with a string "text"'
    part2 = [json.loads(line) for line in (out_dir / "part-2.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in part2] == [r["id"] for r in shards["part-2.jsonl"]]
    assert label_shards_on_ray(ray, in_dir, out_dir, slow_labeller, actors=2, threads_per_actor=1)["written"] == 0
