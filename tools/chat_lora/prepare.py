"""Step 1: choose the chat role's training pairs and split off a held-out set.

    .venv/bin/python tools/chat_lora/prepare.py ../shared/data/chat-real-train.jsonl \
        tools/chat_lora/data/zh-written.jsonl -o /tmp/chat_lora/examples.jsonl

Reads message -> reply pairs (fields id, lang, sentiment, message, reply) and keeps the ones worth
imitating:

* a reply that fails the chat rubric's content checks (copies the message, speaks as the user,
  blames, repeats itself, wrong tone) is dropped: the model should not learn what we judge a fault;
* an English listener who tells their own story ("that happened to me", "my dog…") is dropped:
  from an assistant that is an invented experience;
* Chinese replies are model-written counselling talk with a handful of stock openings ("我理解你的",
  "听起来你"): at most MAX_SAME_OPENING replies may share their first four characters, so the model
  does not learn one formula.

Every row gets `split` ("train" / "heldout": a fixed-seed HELDOUT_SHARE of each language and
sentiment) and `tag`: the sentiment the chat prompt shows the model. For FLIPPED_TAG_SHARE of the
training rows it is the wrong one, as the detector's is now and then; the reply still follows the
message, so the model learns to read the message rather than trust the tag blindly.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

from allinone.evaluation.chat_rubric import check_reply

HELDOUT_SHARE = 0.05
FLIPPED_TAG_SHARE = 0.10
MAX_SAME_OPENING = 8
SEED = 20261201
# Failure kinds that judge a reply's content; length and language are the data's own business.
CONTENT_FAILURES = {"echo", "copy", "as_user", "blame", "repetition", "tone", "refusal", "tag_echo", "list_or_markdown"}
OWN_STORY = re.compile(
    r"happened to me|i've been there|i have been there|\bme too\b|i remember when|\bi used to\b|same here"
    r"|same thing happened|i had (?:a|the) same|\bi once\b|in my (?:personal )?experience"
    r"|\bmy (?:own )?(?:mom|dad|mother|father|wife|husband|son|daughter|kids?|children|dog|cat|brother|sister"
    r"|friend|boss|family|grandma|grandpa|grandmother|grandfather|car|house|job|parents|uncle|aunt|cousin"
    r"|girlfriend|boyfriend|grandparents)\b",
    re.I,
)


def conversation_pairs(row: dict) -> list[dict]:
    """A conversation row (`turns`: message, sentiment, reply each) as one pair per turn, each
    later one with the turns before it as its `history`, so the model learns to reply to a
    message in the light of what was said before. `conversation` keeps them in one split."""
    pairs = []
    for i, turn in enumerate(row["turns"]):
        pairs.append(
            {
                "id": f"{row['id']}-t{i + 1}",
                "lang": row["lang"],
                "sentiment": turn["sentiment"],
                "message": turn["message"],
                "reply": turn["reply"],
                "history": [dict(t) for t in row["turns"][:i]],
                "conversation": row["id"],
                **{k: row[k] for k in ("source", "origin") if k in row},
            }
        )
    return pairs


def read_pairs(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "turns" in row:
                    bad = (
                        not isinstance(row["turns"], list)
                        or not row["turns"]
                        or any(not all(t.get(k) for k in ("message", "sentiment", "reply")) for t in row["turns"])
                    )
                    if bad or row.get("lang") not in ("zh", "en"):
                        sys.exit(
                            f"{path} line {number}: a conversation needs id, lang zh|en, and turns of "
                            "message, sentiment, reply"
                        )
                    rows.extend(conversation_pairs(row))
                    continue
                missing = [k for k in ("id", "lang", "sentiment", "message", "reply") if not row.get(k)]
                if missing or row["lang"] not in ("zh", "en") or row["sentiment"] not in ("positive", "negative"):
                    sys.exit(f"{path} line {number}: needs id, lang zh|en, sentiment positive|negative, message, reply")
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", help="JSONL files of message -> reply pairs")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    rows = read_pairs(args.data)
    dropped = collections.Counter()
    kept = []
    openings = collections.Counter()
    for row in rows:
        failures = set(check_reply(row["message"], row["reply"], row["lang"], row["sentiment"])) & CONTENT_FAILURES
        if failures:
            dropped["rubric: " + ",".join(sorted(failures))] += 1
            continue
        if row["lang"] == "en" and OWN_STORY.search(row["reply"]):
            dropped["own story"] += 1
            continue
        if row["lang"] == "zh":
            opening = row["reply"][:4]
            if openings[opening] >= MAX_SAME_OPENING:
                dropped["stock opening"] += 1
                continue
            openings[opening] += 1
        kept.append(row)

    rng = random.Random(SEED)
    groups = collections.defaultdict(list)
    for row in kept:
        if "conversation" not in row:
            groups[row["lang"], row["sentiment"]].append(row)

    def tag(row: dict, rng: random.Random) -> str:
        flip = row["split"] == "train" and rng.random() < FLIPPED_TAG_SHARE
        return {"positive": "negative", "negative": "positive"}[row["sentiment"]] if flip else row["sentiment"]

    for group in groups.values():
        rng.shuffle(group)
        heldout = round(len(group) * HELDOUT_SHARE)
        for i, row in enumerate(group):
            row["split"] = "heldout" if i < heldout else "train"
            row["tag"] = tag(row, rng)
    # A conversation's turns share one split (a held-out later turn must not have its history
    # trained on). Their own generator: the single-turn pairs keep the split and tags they had
    # before conversations were added, so the shipped adapter's recipe still reproduces.
    rng = random.Random(SEED + 1)
    conversations = sorted({row["conversation"] for row in kept if "conversation" in row})
    rng.shuffle(conversations)
    held = set(conversations[: round(len(conversations) * HELDOUT_SHARE)])
    for row in kept:
        if "conversation" in row:
            row["split"] = "heldout" if row["conversation"] in held else "train"
            row["tag"] = tag(row, rng)
    out = sorted(kept, key=lambda r: r["id"])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for row in out:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = collections.Counter((r["split"], r["lang"], r["sentiment"]) for r in out)
    print(f"{len(rows)} pairs read, {len(out)} kept -> {args.output}")
    for reason, n in dropped.most_common():
        print(f"  dropped {n:4d}  {reason}")
    for key, n in sorted(counts.items()):
        print(f"  {' '.join(key):<24} {n}")
    print(f"  tag flipped on {sum(r['tag'] != r['sentiment'] for r in out)} training rows")


if __name__ == "__main__":
    main()
