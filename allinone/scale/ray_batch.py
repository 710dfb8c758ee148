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
from collections.abc import Callable, Iterator

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
        rows = [json.dumps(self.label(json.loads(item)), ensure_ascii=False) for item in batch["item"]]
        return {"index": batch["index"], "row": np.array(rows, dtype=object)}


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
    actor = type("Labeller", (Labeller,), {"make_labeller": staticmethod(make_labeller), "threads": threads_per_actor})
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        actor,
        batch_size=batch_rows,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor,
    )
    expected = 0
    for row in dataset.iter_rows():
        if row["index"] != expected:  # preserve_order is what the output contract rests on
            raise RuntimeError(f"Ray Data returned line {row['index']} where line {expected} was due")
        expected += 1
        yield json.loads(row["row"])
    if expected != len(todo):
        raise RuntimeError(f"Ray Data returned {expected} lines of {len(todo)}")
