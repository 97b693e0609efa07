"""Write examples/data/ranked.jsonl: a small synthetic ranked-preference dataset (deterministic).

python examples/data/make_ranked.py            # rewrites examples/data/ranked.jsonl

Task: "repeat WORD N times". Each prompt gets 3 to 5 completions: the right answer and
mistakes (a wrong count, a wrong word, both). A completion's score is minus its distance
from the right answer, so the right answer is the unique best and some mistakes tie (one
word too many and one too few). Most rows carry "scores"; some carry a "ranking" (a top-2
list, best first) instead; about a third are conversational (chat messages).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "green", "light", "tiger", "piano"]
NUMBERS = ["one", "two", "three", "four", "five"]


def completion(word: str, count: int) -> str:
    return " ".join([word] * count) + " ."


def make_row(rng: random.Random, index: int) -> dict:
    word, n = rng.choice(WORDS), rng.randint(1, 4)
    candidates = {(word, n)}
    size = rng.randint(3, 5)
    while len(candidates) < size:
        w = word if rng.random() < 0.6 else rng.choice(WORDS)
        candidates.add((w, max(1, n + rng.choice([-2, -1, 1, 2]))))
    candidates = list(candidates)
    rng.shuffle(candidates)
    texts = [completion(w, c) for w, c in candidates]
    scores = [-(abs(c - n) + 2 * (w != word)) for w, c in candidates]
    question = f"repeat {word} {NUMBERS[n - 1]} times"
    row: dict = {"prompt": question, "completions": texts}
    if index % 3 == 2:  # conversational
        row["prompt"] = [{"role": "user", "content": question}]
        row["completions"] = [[{"role": "assistant", "content": t}] for t in texts]
    if index % 5 == 4:  # a top-2 list instead of scores
        order = sorted(range(size), key=lambda j: -scores[j])
        if scores[order[1]] > scores[order[2]]:  # a ranking is a strict order
            row["ranking"] = order[:2]
            return row
    row["scores"] = [float(s) for s in scores]
    return row


def main(path: Path | None = None, num_prompts: int = 48, seed: int = 0) -> None:
    path = Path(__file__).with_name("ranked.jsonl") if path is None else path
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_prompts):
            f.write(json.dumps(make_row(rng, i)) + "\n")


if __name__ == "__main__":
    main()
