"""Step 3: teach the chat role its replies: a LoRA on the blocks above the captured ones, trained on
next-token cross-entropy of the reply (and the end of the turn) after the chat prompt; then the
adapter is written as a llama.cpp adapter GGUF.

    .venv/bin/python tools/chat_lora/train.py /tmp/chat_lora/capture --output-dir allinone/roles/adapters

Progress every few steps with an estimate of the time left. A checkpoint is written every
--checkpoint-every steps into the capture directory's `train/`; running the same command again
resumes from it (--restart starts over). The held-out split (prepare.py) is scored before training
and after each epoch: mean cross-entropy per reply token, overall and per language.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from allinone.model.store import model_sha256
from allinone.roles.adapter import ChatAdapter
from allinone.roles.definition import RoleRegistry
from allinone.service import CHAT_ROLE
from allinone.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora.blocks import PROJECTIONS, CausalBlocks, load_blocks, write_adapter  # noqa: E402

N_BLOCKS = 24  # Qwen2.5-0.5B


class Examples:
    """The captured examples: per example its states after the frozen blocks (float16), the
    positions that predict the reply and the tokens to predict there."""

    def __init__(self, directory: Path):
        self.meta = json.loads((directory / "meta.json").read_text())
        self.prefix = torch.tensor(np.load(directory / "prefix.npy"))
        self.states, self.targets, self.reply_starts, self.ids, self.split = [], [], [], [], []
        shards = sorted(directory.glob("shard-*.npz"))
        expected = math.ceil(self.meta["examples"] / self.meta["shard"])
        if len(shards) != expected:
            raise SystemExit(f"{directory}: {len(shards)} of {expected} shards; run capture.py to finish it")
        for shard in shards:
            data = np.load(shard)
            self.states += np.split(data["states"], np.cumsum(data["lengths"])[:-1])
            self.targets += np.split(data["targets"], np.cumsum(data["target_lengths"])[:-1])
            self.reply_starts += list(data["reply_starts"])
            self.ids += list(data["ids"])
            self.split += list(data["split"])

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == split]

    def batch(self, indices: list[int]):
        lengths = [len(self.states[i]) for i in indices]
        x = torch.zeros(len(indices), max(lengths), self.prefix.shape[1])
        rows, cols, targets = [], [], []
        for k, i in enumerate(indices):
            x[k, : lengths[k]] = torch.from_numpy(self.states[i].astype(np.float32))
            first = int(self.reply_starts[i]) - 1  # the last prompt token predicts the reply's first
            n = len(self.targets[i])
            rows += [k] * n
            cols += range(first, first + n)
            targets.append(torch.from_numpy(self.targets[i].astype(np.int64)))
        positions = torch.tensor([rows, cols]).t()
        return x, torch.tensor(lengths), positions, torch.cat(targets)


def batches_by_length(examples: Examples, indices: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding) of at most max_tokens padded tokens, in a
    shuffled order that `seed` fixes (so a resumed epoch sees the same batches)."""
    order = sorted(indices, key=lambda i: len(examples.states[i]))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples.states[i]) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng = np.random.default_rng(seed)
    return [batches[j] for j in rng.permutation(len(batches))]


def heldout_loss(model: CausalBlocks, examples: Examples, langs: list[str], max_tokens: int) -> dict:
    """Mean cross-entropy per reply token on the held-out split, overall and per language."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for batch in batches_by_length(examples, examples.indices("heldout"), max_tokens, 0):
            x, lengths, positions, targets = examples.batch(batch)
            losses = model.loss(examples.prefix, x, lengths, positions, targets, reduction="none")
            for row, loss in zip(positions[:, 0].tolist(), losses.tolist(), strict=True):
                for key in (langs[batch[row]], "all"):
                    sums[key] = sums.get(key, 0.0) + loss
                    counts[key] = counts.get(key, 0) + 1
    return {key: round(sums[key] / counts[key], 4) for key in sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capture", help="capture.py's output directory")
    parser.add_argument(
        "--output-dir",
        required=True,
        help="where the adapter and its manifest go: allinone/roles/adapters (packaged) or "
        "~/.cache/allinone/adapters (yours; it wins over the packaged one)",
    )
    parser.add_argument(
        "--examples",
        help="prepare.py's output, for the per-language held-out report "
        "(default: examples.jsonl next to the capture directory)",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default=",".join(PROJECTIONS), help="projections to adapt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per batch")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (a trial run)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    directory = Path(args.capture)
    examples = Examples(directory)
    examples_file = Path(args.examples) if args.examples else directory.parent / "examples.jsonl"
    by_id = {json.loads(line)["id"]: json.loads(line)["lang"] for line in open(examples_file, encoding="utf-8")}
    langs = [by_id[str(i)] for i in examples.ids]
    frozen = examples.meta["frozen_blocks"]
    tuned = list(range(frozen, N_BLOCKS))
    targets = tuple(t.strip() for t in args.targets.split(","))
    weights = load_blocks(
        examples.meta["model"], tuned, extra=("output_norm.weight", "output.weight", "token_embd.weight")
    )
    model = CausalBlocks(weights, tuned, rank=args.rank, alpha=args.alpha, targets=targets)
    del weights
    lora = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)
    train = examples.indices("train")
    per_epoch = len(batches_by_length(examples, train, args.batch_tokens, 0))
    steps = args.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))

    work = directory / "train"
    work.mkdir(exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    state = {"step": 0, "history": [], "heldout": []}
    settings = {
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": targets,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_tokens": args.batch_tokens,
        "frozen_blocks": frozen,
    }
    if checkpoint.exists() and not args.restart:
        saved = torch.load(checkpoint, weights_only=False)
        if saved["settings"] != settings:
            raise SystemExit(
                f"{checkpoint} was made with other settings ({saved['settings']}); pass --restart to start over"
            )
        # The checkpoint holds only the LoRA factors (the frozen weights come from the GGUF), so the
        # load is partial; every factor the model has must be in it, and nothing else.
        result = model.load_state_dict(saved["lora"], strict=False)
        missing_lora = [k for k in result.missing_keys if k.endswith((".A", ".B"))]
        if missing_lora or result.unexpected_keys:
            raise SystemExit(
                f"{checkpoint} does not match this model's LoRA factors (missing {missing_lora[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}); pass --restart to start over"
            )
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]
        print(f"resumed at step {state['step']} of {steps}", flush=True)

    def save_checkpoint():
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "settings": settings,
                "state": state,
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "lora": {k: v for k, v in model.state_dict().items() if k.endswith((".A", ".B"))},
            },
            tmp,
        )
        tmp.replace(checkpoint)

    print(
        f"{len(train)} training examples in {per_epoch} batches per epoch, {len(examples.indices('heldout'))} "
        f"held out; blocks {frozen + 1}-{N_BLOCKS} tuned ({', '.join(targets)}), rank {args.rank}",
        flush=True,
    )
    if not state["heldout"]:
        state["heldout"].append({"epoch": 0, **heldout_loss(model, examples, langs, args.batch_tokens)})
        print(f"held-out loss before training: {state['heldout'][-1]}", flush=True)
    started, done_at_start = time.time(), state["step"]
    while state["step"] < steps and (args.max_steps is None or state["step"] < args.max_steps):
        epoch, position = divmod(state["step"], per_epoch)
        batch = batches_by_length(examples, train, args.batch_tokens, seed=1 + epoch)[position]
        x, lengths, positions, target = examples.batch(batch)
        loss = model.loss(examples.prefix, x, lengths, positions, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimiser.step()
        schedule.step()
        state["step"] += 1
        state["history"].append(round(loss.item(), 4))
        if state["step"] % 5 == 0:
            rate = (time.time() - started) / (state["step"] - done_at_start)
            print(
                f"step {state['step']}/{steps} (epoch {epoch + 1})  loss {np.mean(state['history'][-5:]):.3f}  "
                f"{rate:.1f} s/step, ~{rate * (steps - state['step']) / 60:.0f} min left",
                flush=True,
            )
        if state["step"] % per_epoch == 0:
            state["heldout"].append(
                {"epoch": state["step"] // per_epoch, **heldout_loss(model, examples, langs, args.batch_tokens)}
            )
            print(f"held-out loss after epoch {state['heldout'][-1]['epoch']}: {state['heldout'][-1]}", flush=True)
            # Each epoch's adapter stays in the work directory, to compare epochs by their replies.
            write_adapter(
                work / f"epoch-{state['step'] // per_epoch}.lora.gguf",
                model.lora_tensors(),
                args.alpha,
                dtype=np.float16,
            )
        if state["step"] % args.checkpoint_every == 0 or state["step"] == steps:
            save_checkpoint()

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    trained = output / "chat-adapter.tmp.gguf"
    write_adapter(trained, model.lora_tensors(), args.alpha, dtype=np.float16)
    model_path = Path(examples.meta["model"])
    info = {
        "method": f"LoRA rank {args.rank} (alpha {args.alpha:g}) on {', '.join(targets)} of blocks "
        f"{frozen + 1}-{N_BLOCKS}: {state['step']} steps of <= {args.batch_tokens} tokens, AdamW "
        f"{args.lr:g}, linear decay; tools/chat_lora",
        "data": sorted({str(i).split("-")[0] for i in examples.ids}),
        "train_examples": len(train),
        "heldout_loss": state["heldout"],
        "trained": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    adapter = ChatAdapter(
        model_sha256=model_sha256(model_path, Settings().resolved_home()),
        prompt=RoleRegistry.discover(None).get(CHAT_ROLE).prompt(examples.meta["chat_prompt"]).key,
        path=trained,
        sha256="",
        info=info,
    )
    manifest = adapter.save(output)
    trained.unlink()
    print(f"adapter -> {manifest}")


if __name__ == "__main__":
    main()
