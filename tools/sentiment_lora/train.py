"""Step 2: train a LoRA on the blocks above the captured ones jointly with a logistic head at the
analyst's scoring position, then write the adapter (llama.cpp adapter GGUF) and the head.

    .venv/bin/python tools/sentiment_lora/train.py /tmp/lora/train.npz --dev /tmp/lora/dev.npz \
        --output-dir allinone/roles/heads

Defaults are what the packaged head was trained with: blocks 13-15 (after the 12 captured ones;
the head reads after block 15, where the analyst's pass stops), rank 8, alpha 16, 2 epochs of
batch 16, AdamW 1e-3 (head 3e-3), linear decay: ~26 minutes for 3,000 texts on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from allinone.model.store import model_sha256
from allinone.roles.definition import RoleRegistry
from allinone.roles.head import ChoiceHead
from allinone.service import mood_role
from allinone.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora.blocks import TunedBlocks, load_blocks, rms_norm, write_adapter  # noqa: E402


def texts_of(capture) -> list[torch.Tensor]:
    ends = np.cumsum(capture["lengths"])
    return [torch.tensor(s.astype(np.float32)) for s in np.split(capture["states"], ends[:-1])]


def batches(texts, labels, size, shuffle):
    order = torch.randperm(len(texts)) if shuffle else torch.arange(len(texts))
    for i in range(0, len(texts), size):
        ids = order[i : i + size]
        lengths = torch.tensor([len(texts[j]) for j in ids])
        x = torch.zeros(len(ids), int(lengths.max()), texts[0].shape[1])
        for k, j in enumerate(ids):
            x[k, : lengths[k]] = texts[j]
        yield x, lengths, labels[ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train")
    parser.add_argument("--dev", help="a capture to report accuracy on after each epoch")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--head-blocks", type=int, default=15, help="the head reads after this many blocks")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(Settings().threads)

    train = np.load(args.train)
    model = str(train["model"])
    tuned = list(range(int(train["frozen_blocks"]), args.head_blocks))
    blocks = TunedBlocks(load_blocks(model, tuned), tuned, rank=args.rank, alpha=args.alpha)
    head = torch.nn.Linear(blocks.blocks[0].attn_norm.shape[0], 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    prefix = torch.tensor(train["prefix"])
    texts, labels = texts_of(train), torch.tensor(train["labels"].astype(np.float32))
    dev = np.load(args.dev) if args.dev else None

    lora = [p for p in blocks.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        [
            {"params": lora, "lr": args.lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": 3 * args.lr, "weight_decay": 1e-2},
        ]
    )
    steps = args.epochs * math.ceil(len(texts) / args.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 30) * max(0.0, 1 - s / steps))

    def logits(x, lengths):
        return head(rms_norm(blocks(prefix, x, lengths)))[:, 0]

    started, step = time.time(), 0
    for epoch in range(args.epochs):
        running = 0.0
        for x, lengths, y in batches(texts, labels, args.batch, shuffle=True):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(x, lengths), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            step, running = step + 1, running + loss.item()
            if step % 20 == 0:
                print(f"step {step}/{steps}  loss {running / 20:.3f}  {time.time() - started:.0f} s", flush=True)
                running = 0.0
        if dev is not None:
            with torch.no_grad():
                z = torch.cat(
                    [logits(x, n) for x, n, _ in batches(texts_of(dev), torch.zeros(len(dev["labels"])), 32, False)]
                )
            print(f"epoch {epoch + 1}: dev accuracy {((z > 0).numpy() == dev['labels']).mean():.4f}", flush=True)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    adapter = output / "adapter.tmp.gguf"
    write_adapter(adapter, blocks.lora_tensors(), args.alpha)
    settings = Settings()
    sha = model_sha256(Path(model), settings.resolved_home())
    role = mood_role(RoleRegistry.discover(None))
    saved = ChoiceHead(
        model_sha256=sha,
        point=str(train["sentiment_prompt"]),
        labels=role.label_names,  # one row: the first label's logit against the second's
        role=role.name,
        layers=args.head_blocks,
        weights=head.weight.detach().numpy()[0].astype(np.float64),
        bias=float(head.bias.detach()[0]),
        info={
            "examples": len(texts),
            "trained": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "method": f"LoRA rank {args.rank} (alpha {args.alpha:g}) on blocks {tuned[0] + 1}-{tuned[-1] + 1} "
            f"and the head, jointly: {args.epochs} epochs of batch {args.batch}, AdamW {args.lr:g}; "
            "tools/sentiment_lora",
            "seconds": round(time.time() - started, 1),
        },
        adapter=adapter,
    ).save(output)
    adapter.unlink()
    print(f"head and adapter -> {saved}")


if __name__ == "__main__":
    main()
