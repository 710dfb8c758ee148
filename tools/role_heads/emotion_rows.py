"""emotion-train.jsonl's rows on the built-in emotion role's labels: each source's own label names
mapped onto Ekman's six emotions and neutral; labels with no counterpart are left out."""

from __future__ import annotations

import json
import sys
from collections import Counter

TO_ROLE = {
    "happy": "joy",
    "happiness": "joy",
    "like": "joy",  # NLPCC's fondness / approval: the role's joy covers love and admiration
    "angry": "anger",
    "sad": "sadness",
    "none": "neutral",
}
LEFT_OUT = {"shame", "guilt"}  # ISEAR's: no counterpart among the seven


def main(source: str, target: str) -> None:
    kept = Counter()
    with open(source, encoding="utf-8") as rows, open(target, "w", encoding="utf-8") as out:
        for line in rows:
            row = json.loads(line)
            if row["label"] in LEFT_OUT:
                continue
            row["label"] = TO_ROLE.get(row["label"], row["label"])
            kept[row["label"]] += 1
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{sum(kept.values())} rows -> {target}: {dict(kept)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
