"""Does the chat loss mask matter? --data_type chat_padded --loss_on assistant against --loss_on all,
on a synthetic three-turn recall task, from a small random RWKV-7 World base.

Each conversation: the user gives a name and a color in turn 1 ("I am Nina and I like blue."), the
assistant answers a fixed greeting; turn 2 is small talk, the user saying a few random words (noise
that no model can predict), the assistant a fixed "I see."; in turn 3 the user asks for the name or
the color and the assistant must reply with it (" Nina."). Only the turn-3 reply needs the history.
With --loss_on all the model is also trained to predict the user's turns, mostly that noise; with
assistant it is trained on the replies only.

Both runs: the same base, steps, seed, learning rate and batches (the same conversations in the same
order; only the mask differs), every weight trained. The data and loss are train.py's own
(src.data.make_dataset with its ChatFormat, src.training.loss.lm_loss) in a plain AdamW loop, as
bench/convergence.py does: the same math without Lightning's start-up (about 40 s a run here),
which would not fit a smoke run of seconds. Measured on held-out conversations (new combinations of name, color, question
and noise): the turn-3 recall accuracy, each greedy reply from src/generation.py's Chat (the code
path of generate.py --chat, the first two turns given as the resumed history, as --history does),
against chance (1/20 for a name, 1/10 for a color); the mean loss on the assistant tokens (the
tokens --loss_on assistant learns) and on the turn-3 reply alone.

    python bench/chat_recall.py --quick      # smoke run: seconds, figures meaningless
    python bench/chat_recall.py              # the full run (about 20 minutes on 2 cores)
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.chat_template import clean_turn, render  # noqa: E402
from src.checkpoint import fresh_state_dict, new_config  # noqa: E402
from src.data import make_dataset  # noqa: E402
from src.data.chat import ChatFormat, encode  # noqa: E402
from src.family import from_state_dict  # noqa: E402
from src.generation import Chat, model_step, world_sampler  # noqa: E402
from src.sampling import GREEDY  # noqa: E402
from src.tokenizer import world_tokenizer  # noqa: E402
from src.training.loss import lm_loss  # noqa: E402

# Each one World token after a space (" Nina"), as it is after "I am" and in the reply: the
# reply copies a token, it does not spell one out.
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Ivan", "Judy", "Karl",
         "Liam", "Mia", "Nina", "Oscar", "Paul", "Rita", "Sam", "Tina", "Victor", "Bill"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "purple"]
# Turn 2's noise: a few of these, at random (about 5 nats a word).
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "foot boy age policy music market sense nation plan college interest death experience effect class "
         "field river table window garden tree bird train road ship rain snow sun moon star stone glass paper").split()
QUESTIONS = {"name": "What is my name?", "color": "What color do I like?"}
CHANCE = (1 / len(NAMES) + 1 / len(COLORS)) / 2     # each question half the time
SIZES = {  # the base (RWKV-7, World vocabulary) and the run; --steps overrides steps
    "quick": dict(n_embd=32, n_layer=1, steps=2, micro_bsz=2, n_train=16, n_test=4),
    "full": dict(n_embd=128, n_layer=2, steps=200, micro_bsz=32, n_train=20000, n_test=400),
}
CTX_LEN = 56        # longer than any conversation (checked): chat_padded never cuts one


class DenseTokenizer:
    """The World tokenizer on the few ids the data uses, renumbered 0..n-1 (0 stays 0, the end of a
    conversation), as bench/convergence.py cuts its vocabulary: the head and embedding of 65,536
    rows would cost most of each step (some 50 GFLOP at 128 wide), for nothing the task needs.
    Text is still tokenized by the World tokenizer, whole, as chat data is."""

    def __init__(self, world, texts):
        self.world = world
        self.ids = sorted({0} | {i for t in texts for i in world.encode(t)})
        self.dense = {i: n for n, i in enumerate(self.ids)}
        self.vocab_size = len(self.ids)
        self.token_bytes = [world.token_bytes[i] for i in self.ids]

    def encode(self, text):
        return [self.dense[i] for i in self.world.encode(text)]

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def conversation(rng):
    name, color, asked = rng.choice(NAMES), rng.choice(COLORS), rng.choice(sorted(QUESTIONS))
    noise = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8)))
    return {"messages": [
        {"role": "user", "content": f"I am {name} and I like {color}."},
        {"role": "assistant", "content": "Nice to meet you."},
        {"role": "user", "content": noise[0].upper() + noise[1:] + "."},
        {"role": "assistant", "content": "I see."},
        {"role": "user", "content": QUESTIONS[asked]},
        {"role": "assistant", "content": (name if asked == "name" else color) + "."},
    ]}


def write_data(path, n, seed):
    rng = random.Random(seed)
    records = [conversation(rng) for _ in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def train(base_sd, data, tokenizer, loss_on, size, args):
    """The base fine-tuned (every weight) on `data` with `loss_on`'s mask; (model, seconds)."""
    dataset = make_dataset(data, "chat_padded", CTX_LEN, tokenizer.vocab_size, seed=args.seed, tokenizer=tokenizer,
                           chat=ChatFormat(loss_on=loss_on))
    torch.manual_seed(args.seed)
    model = from_state_dict({k: v.clone() for k, v in base_sd.items()}, op="cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    steps, bsz, warmup = size["steps"], size["micro_bsz"], min(50, size["steps"])
    start = time.time()
    for step in range(steps):
        # train.py's schedule: linear warmup from lr/100, then cosine down to lr/10
        t = max(0.0, (step - warmup) / max(1, steps - warmup))
        lr = args.lr / 10 + (args.lr - args.lr / 10) * 0.5 * (1 + math.cos(math.pi * t))
        for g in opt.param_groups:
            g["lr"] = lr * (0.01 + 0.99 * step / warmup if step < warmup else 1.0)
        # train.py's StepSampler on one process: step s reads samples s * bsz .. s * bsz + bsz - 1
        x, y, mask = (torch.stack(t) for t in zip(*(dataset[step * bsz + i] for i in range(bsz))))
        loss = lm_loss(model, x, y, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"--loss_on {loss_on}: step {step + 1}/{steps}, training loss {loss.item():.3f}, "
                  f"{time.time() - start:.0f} s", flush=True)
    return model.eval(), time.time() - start


def loss_on_mask(model, conversations, tokenizer, loss_on, batch=50):
    """The mean loss per token over the held-out conversations' tokens that `loss_on` learns."""
    total, count = 0.0, 0
    for i in range(0, len(conversations), batch):
        encoded = [encode(c["messages"], tokenizer, loss_on)[:2] for c in conversations[i:i + batch]]
        width = max(len(ids) for ids, _ in encoded)
        ids, mask = torch.zeros(len(encoded), width, dtype=torch.long), torch.zeros(len(encoded), width)
        for row, (a, m) in enumerate(encoded):     # padded with 0, which the mask leaves out
            ids[row, :len(a)], mask[row, :len(m)] = torch.as_tensor(a), torch.as_tensor(m)
        with torch.no_grad():
            n = mask[:, 1:].sum().item()
            total += lm_loss(model, ids[:, :-1], ids[:, 1:], mask[:, 1:]).item() * n
        count += n
    return total / count


def evaluate(model, held_out, tokenizer):
    """Turn-3 recall: each greedy reply through Chat, generate.py --chat's code path, the first two
    turns read as a resumed history (as --history does), then the question; and the losses."""
    sampler, step, right = world_sampler(GREEDY, tokenizer, tokenizer.vocab_size), model_step(model), 0
    for c in held_out:
        history, question, answer = c["messages"][:4], c["messages"][4]["content"], c["messages"][5]["content"]
        right += Chat(step, tokenizer, sampler, 8, (0,), history).reply(question) == clean_turn(answer)
    return {"recall": right / len(held_out),
            "assistant_loss": loss_on_mask(model, held_out, tokenizer, "assistant"),
            "reply3_loss": loss_on_mask(model, held_out, tokenizer, "last")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds (a tiny model, 2 steps)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 200; --quick 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to a tenth of it)")
    p.add_argument("--seed", type=int, default=1, help="both runs' seed: their data order (the base is "
                                                     "always seed 0)")
    p.add_argument("--out_dir", default="out/chat_recall", help="the data and results.json go here")
    args = p.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    size["steps"] = args.steps or size["steps"]
    os.makedirs(args.out_dir, exist_ok=True)
    data = os.path.join(args.out_dir, "train.jsonl")
    train_set = write_data(data, size["n_train"], seed=0)
    held_out = write_data(os.path.join(args.out_dir, "held_out.jsonl"), size["n_test"], seed=12345)
    tokenizer = DenseTokenizer(world_tokenizer(), [render(c["messages"])[0] for c in train_set + held_out])
    longest = max(len(encode(c["messages"], tokenizer)[0]) for c in train_set + held_out)
    assert longest <= CTX_LEN + 1, longest
    config = new_config("x070", tokenizer.vocab_size, size["n_embd"], size["n_layer"], head_size=32)
    base_sd = fresh_state_dict(config, seed=0)

    results = {}
    for loss_on in ("assistant", "all"):
        model, seconds = train(base_sd, data, tokenizer, loss_on, size, args)
        results[loss_on] = {**evaluate(model, held_out, tokenizer), "train_seconds": seconds}

    a, b = results["assistant"], results["all"]
    print(f"\n{size['steps']} steps of {size['micro_bsz']} conversations, seed {args.seed}, lr {args.lr:g}; "
          f"RWKV-7 {size['n_layer']} x {size['n_embd']} from random, {tokenizer.vocab_size} World ids; {len(held_out)} held-out conversations "
          f"(chance recall {CHANCE:.3f})")
    print("| held out | --loss_on assistant | --loss_on all | assistant / all |\n|---|---|---|---|")
    for label, key in (("turn-3 recall accuracy", "recall"), ("loss on the assistant tokens", "assistant_loss"),
                       ("loss on the turn-3 reply", "reply3_loss")):
        ratio = f"{a[key] / b[key]:.2f}" if b[key] else "n/a"
        print(f"| {label} | {a[key]:.3f} | {b[key]:.3f} | {ratio} |")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"size": size, "lr": args.lr, "seed": args.seed, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
