"""Step 1: run the analyst's prompt over labelled texts on llama.cpp and keep the residual stream
after the frozen blocks for every token after the prompt's fixed beginning (and once for that
beginning), so that training only needs to run the tuned blocks.

    .venv/bin/python tools/sentiment_lora/capture.py ../shared/data/sentiment-train.jsonl /tmp/lora/train.npz

~10 minutes for 3,000 texts on 2 cores; ~5 KB per token-state in float16 (~390 MB for 3,000).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm

from allinone.engine import open_engine
from allinone.model.store import resolve_model_path
from allinone.roles.choice import ChoiceRole
from allinone.roles.definition import RoleRegistry
from allinone.service import mood_role
from allinone.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--frozen-blocks", type=int, default=12, help="blocks below the tuned ones")
    parser.add_argument("--sentiment-prompt", default="fewshot")
    args = parser.parse_args()
    settings = Settings()
    model = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
    engine = open_engine(model, settings, n_lanes=1)
    role = mood_role(RoleRegistry.discover(None))
    analyst = ChoiceRole(engine, role, role.prompt(args.sentiment_prompt))
    before = len(analyst.prefix_tokens)
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]

    prefix = engine.hidden_states_of_new_tokens(analyst.prefix_tokens, args.frozen_blocks)
    assert prefix.shape[0] == before
    states, lengths = [], []
    for row in tqdm(rows, mininterval=20, desc="capture"):
        analyst.warm_prefix()  # the lane holds exactly the prompt's beginning: the text is all new
        tokens, _ = analyst.prompt_tokens(row["text"])
        evaluated = engine.hidden_states_of_new_tokens(tokens, args.frozen_blocks)
        reused = engine.last_stats.reused
        assert evaluated.shape[0] == len(tokens) - reused and reused <= before
        states.append(evaluated[before - reused :].astype(np.float16))
        lengths.append(states[-1].shape[0])
    np.savez(
        args.output,
        states=np.concatenate(states),
        lengths=np.array(lengths),
        prefix=prefix,
        frozen_blocks=args.frozen_blocks,
        model=str(model),
        sentiment_prompt=args.sentiment_prompt,
        # True for the role's first label (positive): the head's logit is that label's.
        labels=np.array([row["label"] == role.label_names[0] for row in rows]),
    )
    print(f"{len(rows)} texts -> {args.output}")


if __name__ == "__main__":
    main()
