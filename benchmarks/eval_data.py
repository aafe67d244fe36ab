"""Generate the evaluation set shipped with the repo: arithmetic and short word problems with known
integer answers, from a fixed seed (the same file every time).

    .venv/bin/python -m benchmarks.eval_data            # writes benchmarks/data/arith.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "arith.jsonl"
NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Zoe"]
ITEMS = ["apples", "books", "coins", "pencils", "cards", "stones", "cookies", "stamps"]


def _problem(rng: random.Random, kind: str) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", a + b
    if kind == "sub":
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        return f"What is {a} - {b}?", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", a * b
    if kind == "word_add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?", a + b
    if kind == "word_sub":
        a = rng.randint(5, 40)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b


DATASET_KINDS = ("add", "sub", "mul", "word_add", "word_sub", "word_mul")


def generate(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        kind = DATASET_KINDS[i % len(DATASET_KINDS)]
        question, answer = _problem(rng, kind)
        rows.append({"id": f"arith-{i:03d}", "kind": kind, "question": question, "answer": str(answer)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in generate(args.count, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.count} problems to {args.out}")


if __name__ == "__main__":
    main()
