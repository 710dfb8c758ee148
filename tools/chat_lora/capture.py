"""Step 2: run the chat prompt over each training pair on llama.cpp, reply included, and keep the
residual stream after the frozen blocks for every token after the prompt's fixed beginning (and
once for that beginning), so that training only needs to run the tuned blocks above them.

    .venv/bin/python tools/chat_lora/capture.py /tmp/chat_lora/examples.jsonl /tmp/chat_lora/capture

Writes shards of SHARD examples (shard-NNN.npz); an interrupted run starts again at the first
missing shard. ~5 KB per token in float16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from allinone.conversation.history import Turn
from allinone.engine import open_engine
from allinone.model.store import resolve_model_path
from allinone.roles.chat import ChatRole
from allinone.roles.definition import RoleRegistry
from allinone.service import CHAT_ROLE
from allinone.settings import Settings

SHARD = 200


def history(chat: ChatRole, row: dict) -> list[Turn]:
    """A later turn's conversation so far, as the product keeps it (each earlier message under its
    own mood, with the reply given to it)."""
    return [
        Turn(
            message=t["message"],
            sentiment=t["sentiment"],
            user_content=chat.user_content(t["message"], t["sentiment"]),
            reply=t["reply"],
        )
        for t in row.get("history", [])
    ]


def example_tokens(chat: ChatRole, row: dict) -> tuple[list[int], int, list[int]]:
    """The prompt (the conversation so far, then the message under the row's tag) followed by the
    reply; where the reply starts; the tokens the model must predict from there: the reply and the
    end of the turn."""
    prompt, dropped, _ = chat.prompt_tokens(history(chat, row), row["message"], row["tag"], reply_max_tokens=1)
    if dropped:
        raise SystemExit(f"{row['id']}: its conversation does not fit in the chat lane's context")
    reply = chat.engine.tokenize(row["reply"])
    end_of_turn = chat.engine.tokenize("<|im_end|>", special=True)
    return prompt + reply, len(prompt), reply + end_of_turn


def fixed_prefix(chat: ChatRole) -> list[int]:
    """The tokens every training example starts with: system prompt, examples, the user turn's opening."""
    a, _, _ = chat.prompt_tokens([], "a", "positive", reply_max_tokens=1)
    b, _, _ = chat.prompt_tokens([], "b", "negative", reply_max_tokens=1)
    n = 0
    while a[n] == b[n]:
        n += 1
    return a[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", help="prepare.py's output")
    parser.add_argument("output", help="a directory for the shards")
    parser.add_argument("--frozen-blocks", type=int, default=12, help="blocks below the tuned ones")
    parser.add_argument("--chat-prompt", default="warm")
    args = parser.parse_args()
    settings = Settings()
    model = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
    engine = open_engine(model, settings, n_lanes=1)
    chat = ChatRole(engine, RoleRegistry.discover(None).get(CHAT_ROLE).prompt(args.chat_prompt), lane=0)
    rows = [json.loads(line) for line in open(args.examples, encoding="utf-8") if line.strip()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    prefix = fixed_prefix(chat)
    meta = {
        "model": str(model),
        "chat_prompt": args.chat_prompt,
        "frozen_blocks": args.frozen_blocks,
        "examples": len(rows),
        "shard": SHARD,
        "prefix_tokens": len(prefix),
    }
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise SystemExit(f"{out} holds a capture with other settings ({meta_path}); use another directory")
    meta_path.write_text(json.dumps(meta, indent=1))
    if not (out / "prefix.npy").exists():
        np.save(out / "prefix.npy", engine.hidden_states_of_new_tokens(prefix, args.frozen_blocks))

    shards = range(0, len(rows), SHARD)
    with tqdm(total=len(rows), desc="capture", mininterval=10) as bar:
        for index, start in enumerate(shards):
            path = out / f"shard-{index:03d}.npz"
            batch = rows[start : start + SHARD]
            if path.exists():
                bar.update(len(batch))
                continue
            states, tokens, reply_starts, targets = [], [], [], []
            for row in batch:
                ids, reply_start, target = example_tokens(chat, row)
                if ids[: len(prefix)] != prefix:
                    raise SystemExit(f"{row['id']}: the prompt does not start with the fixed prefix")
                engine.hidden_state(prefix, args.frozen_blocks)  # the lane holds exactly the prefix
                evaluated = engine.hidden_states_of_new_tokens(ids, args.frozen_blocks)
                reused = engine.last_stats.reused
                states.append(evaluated[len(prefix) - reused :].astype(np.float16))
                tokens.append(np.array(ids[len(prefix) :], dtype=np.int32))
                reply_starts.append(reply_start - len(prefix))
                targets.append(np.array(target, dtype=np.int32))
                bar.update(1)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                states=np.concatenate(states),
                lengths=np.array([len(s) for s in states]),
                tokens=np.concatenate(tokens),
                reply_starts=np.array(reply_starts),
                targets=np.concatenate(targets),
                target_lengths=np.array([len(t) for t in targets]),
                ids=np.array([r["id"] for r in batch]),
                split=np.array([r["split"] for r in batch]),
            )
            tmp.replace(path)
    print(f"{len(rows)} examples -> {out}")


if __name__ == "__main__":
    main()
