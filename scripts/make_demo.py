"""The demo's inputs, made once: a small base model (World vocabulary; RWKV-6 with the x060 init,
or with --family x070 RWKV-7 with the x070 init) and a generated dataset of short templated
stories, tokenized with the World tokenizer into binidx."""
import argparse
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.checkpoint import make_checkpoint  # noqa: E402

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
THINGS = ["apples", "books", "coins", "stones", "shells", "cards"]


def story(rng):
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    return (f"{a} has {x} {thing}. {b} gives {a} {y} more {thing}. "
            f"Now {a} has {x + y} {thing}, and {b} is happy.")


def main(out_dir, family="x060"):
    os.makedirs(out_dir, exist_ok=True)
    base, data = os.path.join(out_dir, "base.pth"), os.path.join(out_dir, "stories")
    if not os.path.exists(base):
        print(f"making the demo base model {base} ({family})", flush=True)    # before the wait, and before make_binidx's lines
        make_checkpoint(base, vocab_size=65536, n_embd=256, n_layer=4, head_size=64, seed=0, family=family)
    if not os.path.exists(data + ".idx"):
        rng = random.Random(0)
        jsonl = data + ".jsonl"
        with open(jsonl + ".tmp", "w") as f:
            for _ in range(4000):
                f.write(json.dumps({"text": story(rng)}) + "\n")
        os.replace(jsonl + ".tmp", jsonl)
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_binidx.py"), jsonl, data,
                        "--overwrite"], check=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", nargs="?", default="out/demo")
    p.add_argument("--family", choices=("x060", "x070"), default="x060")
    args = p.parse_args()
    main(args.out_dir, args.family)
