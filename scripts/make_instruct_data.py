"""Write the small instruction set shipped in ``data/instruct/`` (train.jsonl, validation.jsonl).

Deterministic (a fixed seed, no download): ``python scripts/make_instruct_data.py`` rewrites the
same bytes.  Each line is ``{"prompt": ..., "response": ...}``, drawn from eight small task
families whose answers follow from the prompt alone (arithmetic, comparison, word and list
manipulation), so a model can learn them and the held-out perplexity falls as it does.  400
training pairs and 100 validation pairs; validation prompts never repeat a training prompt.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "instruct"
SEED = 15
N_TRAIN, N_VALIDATION = 400, 100

WORDS = ("apple", "river", "stone", "garden", "window", "planet", "candle", "forest", "silver", "yellow",
         "market", "pencil", "rabbit", "orange", "bridge", "castle", "winter", "summer", "doctor", "guitar",
         "button", "mirror", "rocket", "pepper", "camera", "island", "butter", "ladder", "tunnel", "violin")

Pair = tuple[str, str]


def add(rng: random.Random) -> Pair:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def subtract(rng: random.Random) -> Pair:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def larger(rng: random.Random) -> Pair:
    a, b = rng.sample(range(100), 2)
    return f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger."


def reverse(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {', '.join(words)}.", ", ".join(reversed(words))


def uppercase(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, 2)
    text = " ".join(words)
    return f"Write '{text}' in capital letters.", text.upper()


def first_letters(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, 3)
    return f"Give the first letter of each word: {', '.join(words)}.", " ".join(w[0] for w in words)


def sort_words(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, 3)
    return f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))


def multiply(rng: random.Random) -> Pair:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


FAMILIES: tuple[Callable[[random.Random], Pair], ...] = (add, subtract, larger, reverse, uppercase,
                                                        first_letters, sort_words, multiply)


def make(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """The two splits: families in turn, each pair drawn until its prompt is new."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for split, n in (("train", N_TRAIN), ("validation", N_VALIDATION)):
        while len(splits[split]) < n:
            family = FAMILIES[len(splits[split]) % len(FAMILIES)]
            for _ in range(1000):
                prompt, response = family(rng)
                if prompt not in seen:
                    break
            else:
                raise RuntimeError(f"{family.__name__}: no new prompt in 1000 draws")
            seen.add(prompt)
            splits[split].append({"prompt": prompt, "response": response})
    return splits


def main(out: Path = OUT) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make().items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{out / split}.jsonl: {len(rows)} pairs, {len(text.encode())} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
