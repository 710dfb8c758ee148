"""Batch labelling on Ray Data: one model per actor, lines back in input order.

The driver hands the lines still to do to `map_batches` over a fixed pool of actors (each loads
the model once, with as many llama.cpp threads as CPUs it reserved) and reads the answered lines
back in input order (`preserve_order`), so the caller writes them as they come, exactly as the
single-process path does: resuming, progress and the output contract stay in one place
(`cli/batch.py`). An actor that dies is restarted and its batch redone (Ray Data's default for
actor pools: unlimited restarts and task retries); since only the driver writes, a redone batch
is never written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# Rows per actor call: small enough that both actors get work early and the bar moves, large
# enough that Ray's per-batch bookkeeping is noise next to a ~100 ms text.
BATCH_ROWS = 8


class Labeller:
    """The actor: `make_labeller(threads)` runs once per actor and returns item -> answered line.
    Both are class attributes of a subclass made per run (`labeller_class`), not constructor
    arguments: Ray keeps constructor arguments in its object store and warns, on every actor
    start, that a restart could lose them."""

    make_labeller: Callable[[int], Callable[[dict], dict]]
    threads: int

    def __init__(self):
        self.label = self.make_labeller(self.threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # "item": a line the driver checked; "text": a raw line Ray Data read from a shard
        lines = batch["item"] if "item" in batch else batch["text"]
        rows = [json.dumps(self.answer(line), ensure_ascii=False) for line in lines]
        return {**{k: v for k, v in batch.items() if k in ("index", "path")}, "row": np.array(rows, dtype=object)}

    def answer(self, line: str) -> dict:
        """A shard's lines are not checked before the run (it may not fit in the driver's
        memory): a line that is not a JSON object with a string `text` gets its error here."""
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            return {"error": f"not valid JSON ({err.msg} at column {err.colno})", "input": line[:200]}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            return {"error": 'needs a JSON object with a string "text"', "input": line[:200]}
        return self.label(item)


def labeller_class(make_labeller: Callable[[int], Callable[[dict], dict]], threads: int) -> type[Labeller]:
    return type("Labeller", (Labeller,), {"make_labeller": staticmethod(make_labeller), "threads": threads})


def label_on_ray(
    ray,
    todo: list[dict],
    make_labeller: Callable[[int], Callable[[dict], dict]],
    *,
    actors: int,
    threads_per_actor: int,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[dict]:
    """The answered lines of `todo`, in its order, computed by `actors` actors of
    `threads_per_actor` CPUs each on the Ray `ray` is connected to."""
    if not todo:
        return
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().execution_options.preserve_order = True
    items = [{"index": i, "item": json.dumps(item, ensure_ascii=False)} for i, item in enumerate(todo)]
    # at least one block per actor (else an actor idles), at most 200 (Ray's per-block overhead)
    blocks = min(len(items), max(actors, min(len(items) // batch_rows, 200)))
    actor = labeller_class(make_labeller, threads_per_actor)
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        actor,
        batch_size=batch_rows,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor,
    )
    expected = 0
    for row in dataset.iter_rows():  # streams: at most a few blocks are held here at a time
        if row["index"] != expected:  # preserve_order is what the output contract rests on
            raise RuntimeError(f"Ray Data returned line {row['index']} where line {expected} was due")
        expected += 1
        yield json.loads(row["row"])
    if expected != len(todo):
        raise RuntimeError(f"Ray Data returned {expected} lines of {len(todo)}")


def label_shards_on_ray(
    ray,
    in_dir: Path,
    out_dir: Path,
    make_labeller: Callable[[int], Callable[[dict], dict]],
    *,
    actors: int,
    threads_per_actor: int,
    progress=None,
) -> dict:
    """IN_DIR/*.jsonl -> OUT_DIR/ (same names), for inputs larger than the driver's memory: Ray
    Data reads the shards, the actors label them, and the lines stream back in shard and line
    order to be written here. A shard's output appears under its final name only once complete
    (written as NAME.partial, then renamed), so an interrupted run redoes at most the shards in
    flight and never duplicates a line."""
    shards = sorted(in_dir.glob("*.jsonl"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.jsonl.partial"):
        stale.unlink()
    todo = [shard for shard in shards if not (out_dir / shard.name).exists()]
    summary = {"shards": len(shards), "skipped_shards": len(shards) - len(todo), "written": 0}
    if not todo:
        return summary
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().execution_options.preserve_order = True
    actor = labeller_class(make_labeller, threads_per_actor)
    dataset = ray.data.read_text(
        [str(shard) for shard in todo],
        include_paths=True,
        num_cpus=0,  # every CPU is the actors': a read that waited for one would hang the pipeline
    ).map_batches(
        actor,
        batch_size=BATCH_ROWS,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor,
    )
    current, out, started = None, None, set()

    def finish(name: str | None) -> None:
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            (out_dir / f"{name}.partial").rename(out_dir / name)

    for row in dataset.iter_rows():
        name = Path(row["path"]).name
        if name != current:
            if name in started:  # preserve_order is what the output contract rests on
                raise RuntimeError(f"Ray Data returned lines of {name} out of order")
            finish(current)
            current, out = name, open(out_dir / f"{name}.partial", "w", encoding="utf-8")
            started.add(name)
        out.write(row["row"] + "\n")
        summary["written"] += 1
        if progress is not None:
            progress.update(1)
    finish(current)
    for shard in todo:  # shards without a single line: an empty output, so a re-run skips them
        if shard.name not in started:
            (out_dir / shard.name).touch()
    return summary
