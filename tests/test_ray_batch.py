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
    summary = run_batch(
        None, todo, out, label_all=lambda rest: label_on_ray(ray, rest, slow_labeller, actors=2, threads_per_actor=1)
    )
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
