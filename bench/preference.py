"""Do DPO, SimPO and ORPO teach a preference the base does not have? Held-out preference accuracy of
each objective's Bone adapter along training, beside the base's, on a synthetic task.

The task: the prompt asks for a colour twice ("Say red twice."); the chosen reply repeats it
(" red red."), the rejected one switches colour (" red blue."). Every (named, other) combination of
12 colours is a pair, in each of 4 prompt wordings; a quarter of the combinations are held out
(when (red, blue) is, no training reply holds " red blue"), so the held-out accuracy measures
whether the model learnt to prefer the repeat, not which pairs it saw. A random base prefers either
reply by chance: about 50%. (The version where the reply must name the prompt's colour, three
tokens back past "\\n\\nAssistant:", was tried first: in 100 DPO steps at this lr, a random 2-layer
base stayed at chance on both the training and the held-out pairs, a 4-layer one fitted 78% of the
training pairs and stayed at chance on the held-out ones.)

The base: tests/tiny.py's random RWKV-7 with the World vocabulary ("world7": 2 layers, 64 wide, so
the chat format's tokens are real), its embedding drawn at N(0, 1). The official init's embedding
(about 1e-4) is far below ln0's eps (1e-5 on the variance), so that model barely tells one token
from another, as no trained model does; an adapter cannot fix that (the embedding stays frozen).

Each objective trains through train.py itself (a subprocess): the same data, order, seed, steps and
constant learning rate, Bone r = 16, each objective's default hyper-parameters (DPO beta 0.1;
SimPO beta 2, gamma 1; ORPO lambda 0.1), an adapter saved every --every steps. Held-out preference
accuracy is the same measure for the base and all three: the fraction of held-out pairs whose
chosen reply has a higher summed log-prob (src.training.loss.sequence_logps over the tokens the
chat format learns of a reply) than the rejected one; a tie counts as wrong.

    python bench/preference.py --tiny      # smoke run (a few steps; its figures mean nothing)
    python bench/preference.py             # the full run (figures in docs/training.md)

Prints a table (the base's accuracy beside each objective's, per saved step) and writes
preference.png (accuracy against step), results.json, the base, the data and the three runs to --out.
"""
import argparse
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src import bone, family  # noqa: E402
from src.checkpoint import save_checkpoint  # noqa: E402
from src.data import make_dataset  # noqa: E402
from src.training.loss import sequence_logps  # noqa: E402
from tests.tiny import ALL, random_state_dict  # noqa: E402

OBJECTIVES = ("dpo", "simpo", "orpo")
NAMES = {"dpo": "DPO", "simpo": "SimPO", "orpo": "ORPO"}
# Each one World token after a space (" red"), so "red red." differs from "red blue." in one token.
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "purple", "orange", "silver"]
TEMPLATES = ["Say {} twice.", "Twice: {}", "{}, two times.", "Repeat {} once more."]
SIZES = {
    "tiny": dict(steps=4, every=2, micro_bsz=2, held_out=8),
    "full": dict(steps=150, every=10, micro_bsz=8, held_out=None),   # None: every held-out pair
}
SHAPE = "world7"
CTX_LEN = 16        # longer than any pair's sequence (checked): nothing is cut
VOCAB = 65536


def make_base(out):
    """The random base (see the module's docstring): tests/tiny.py's model, embedding at N(0, 1)."""
    sd = random_state_dict(ALL[SHAPE], seed=0)
    sd["emb.weight"] = torch.randn(sd["emb.weight"].shape, generator=torch.Generator().manual_seed(0))
    path = os.path.join(out, "base.pth")
    save_checkpoint(sd, path, "fp32")
    return path


def write_pairs(out, seed=0):
    """train.jsonl and held_out.jsonl: every wording of each (named, other) colour combination,
    a quarter of the combinations (drawn with `seed`) held out."""
    combos = list(itertools.permutations(COLOURS, 2))
    random.Random(seed).shuffle(combos)
    held = len(combos) // 4
    paths = {}
    for part, part_combos in (("held_out", combos[:held]), ("train", combos[held:])):
        paths[part] = os.path.join(out, f"{part}.jsonl")
        with open(paths[part], "w") as f:
            for (named, other), template in itertools.product(part_combos, TEMPLATES):
                f.write(json.dumps({"prompt": template.format(named), "chosen": f"{named} {named}.",
                                    "rejected": f"{named} {other}."}) + "\n")
    return paths


def free_port():
    """A port no one listens on now, for the run's process group (others may train beside it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(objective, base, data, run_dir, size, args):
    """One train.py run of `objective`; its seconds. Adapters land in run_dir/adapter-STEP.pth."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--load_model", base, "--data_file", data,
           "--data_type", "preference", "--objective", objective, "--proj_dir", run_dir, "--overwrite",
           "--ctx_len", str(CTX_LEN), "--micro_bsz", str(size["micro_bsz"]), "--epoch_steps", str(size["steps"]),
           "--epoch_count", "1", "--save_every_steps", str(size["every"]), "--keep_last", "0",
           "--lr_init", str(args.lr), "--lr_final", str(args.lr), "--bone_r", "16", "--seed", str(args.seed),
           "--accelerator", "cpu", "--strategy", "deepspeed_stage_1"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    if proc.returncode != 0:
        sys.exit(f"train.py --objective {objective} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.time() - start


def held_out_batches(path, limit, batch=32):
    """The held-out pairs (the first `limit`; None: all), each once, as [B, 2, T] batches."""
    dataset = make_dataset(path, "preference", CTX_LEN, VOCAB, seed=0)
    n = min(limit or len(dataset), len(dataset))
    items = [dataset[i] for i in range(n)]
    for _, _, mask in items:
        assert not mask[:, -1].any(), "a pair is longer than CTX_LEN: raise it"
    return [[torch.stack(t) for t in zip(*items[i:i + batch])] for i in range(0, n, batch)]


def accuracy(model, batches):
    """The fraction of pairs whose chosen reply's summed log-prob beats the rejected one's."""
    right = total = 0
    with torch.no_grad():
        for idx, targets, mask in batches:
            logps = sequence_logps(model, idx.flatten(0, 1), targets.flatten(0, 1), mask.flatten(0, 1)).view(-1, 2)
            right += (logps[:, 0] > logps[:, 1]).sum().item()
            total += len(logps)
    return right / total


def adapters(run_dir):
    """{step: path} of the run's saved adapters, in step order."""
    found = {int(name[len("adapter-"):-len(".pth")]): os.path.join(run_dir, name)
             for name in os.listdir(run_dir) if name.startswith("adapter-") and name.endswith(".pth")}
    return dict(sorted(found.items()))


def plot(curves, base_accuracy, path):
    """Held-out accuracy against step, a line per objective from the base's at step 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for objective, curve in curves.items():
        ax.plot([0, *curve], [base_accuracy, *curve.values()], "o-", lw=1, ms=3, label=NAMES[objective])
    ax.axhline(base_accuracy, ls="--", color="gray", lw=1, label=f"base ({base_accuracy:.3f})")
    ax.axhline(0.9, ls=":", color="black", lw=1, label="0.9")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out preference accuracy")
    ax.set_title("held-out pairs whose chosen reply has the higher summed log-prob")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a smoke run (a few steps, a few held-out pairs)")
    p.add_argument("--steps", type=int, default=None, help="training steps per objective (default 150; --tiny 4)")
    p.add_argument("--every", type=int, default=None, help="save and measure an adapter every N steps "
                                                           "(default 10; --tiny 2)")
    p.add_argument("--lr", type=float, default=1e-2, help="every run's learning rate (constant)")
    p.add_argument("--seed", type=int, default=1, help="train.py's --seed: adapter init and data order")
    p.add_argument("--out", default="out/preference_bench", help="the base, data, runs, results and plot go here")
    args = p.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "full"])
    size["steps"] = args.steps or size["steps"]
    size["every"] = args.every or size["every"]
    os.makedirs(args.out, exist_ok=True)
    start = time.time()

    base = make_base(args.out)
    data = write_pairs(args.out)
    batches = held_out_batches(data["held_out"], size["held_out"])
    pairs = sum(len(b[0]) for b in batches)
    model = family.from_checkpoint(base, dtype=torch.float32, op="cpu").eval()
    base_accuracy = accuracy(model, batches)
    print(f"base: held-out preference accuracy {base_accuracy:.3f} on {pairs} pairs", flush=True)

    curves, seconds = {}, {}
    for objective in OBJECTIVES:
        run_dir = os.path.join(args.out, objective)
        seconds[objective] = train(objective, base, data["train"], run_dir, size, args)
        model = family.from_checkpoint(base, dtype=torch.float32, op="cpu").eval()
        curves[objective] = {}
        for step, path in adapters(run_dir).items():
            bone.load_adapter(model, path)      # the first applies the adapters, the next ones refill them
            curves[objective][step] = accuracy(model, batches)
        print(f"{objective}: {size['steps']} steps in {seconds[objective]:.0f} s, held-out preference accuracy "
              f"{curves[objective][size['steps']]:.3f}", flush=True)

    cfg = ALL[SHAPE]
    print(f"\n{size['steps']} steps of {size['micro_bsz']} pairs, lr {args.lr:g} constant, seed {args.seed}, "
          f"Bone r 16, RWKV-7 {cfg.n_layer} x {cfg.n_embd} random base (World vocabulary); {pairs} held-out pairs; "
          f"{time.time() - start:.0f} s in all")
    print("| step | base | " + " | ".join(NAMES[o] for o in OBJECTIVES) + " |")
    print("|---|---|" + "---|" * len(OBJECTIVES))
    for step in curves[OBJECTIVES[0]]:
        print(f"| {step} | {base_accuracy:.3f} | " + " | ".join(f"{curves[o][step]:.3f}" for o in OBJECTIVES) + " |")
    plot(curves, base_accuracy, os.path.join(args.out, "preference.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"size": size, "lr": args.lr, "seed": args.seed, "held_out_pairs": pairs, "base": base_accuracy,
                   "curves": curves, "train_seconds": seconds, "seconds": time.time() - start}, f, indent=1)


if __name__ == "__main__":
    main()
