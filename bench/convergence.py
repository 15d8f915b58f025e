"""Bone vs Bat vs LoRA (and full fine-tuning) on RWKV-6, at equal trainable parameters, here.

1. A small RWKV-6 base is pretrained on generated short stories (World tokenizer, its vocabulary
   cut down to the tokens the two data sets use, remapped to dense ids), seeded, and cached under
   --out_dir (base-<settings hash>.pth).
2. It is fine-tuned on another kind of text, generated additions (" 23 + 58 = 81."), with Bone, Bat
   and LoRA on the 8 projections (Bone and Bat r = 2 x LoRA's rank: in RWKV-6 the counts are then
   equal; both are printed), full fine-tuning as the ceiling, state tuning (each layer's initial
   WKV state, every weight frozen; its own lr grid, --state_lrs) and Bone + state (Bone's grid, the
   state at state's best lr), each at its own parameter count: the same steps, the same batches,
   each at its best learning rate from one grid, the same for all (best by final validation loss).
3. Training loss every step and validation loss (fixed held-out windows) every --val_every
   steps, per method at its best learning rate.
4. With --seeds N (the full run: 3), each method is run again at its best learning rate with N - 1
   more seeds (another data order and adapter init): the table gives every seed's final validation
   loss and their spread, the plot each method's mean curve with its min-max band.

The model, adapters and loss are the project's own (src.model.RWKV6, src.bone, src.training.loss
.lm_loss) in a plain AdamW loop, not train.py: the same math without Lightning's start-up cost.
Writes table.md, curves.csv, results.json and convergence.png to --out_dir (each atomically);
the last line printed is `bone_vs_lora_val_loss_ratio X` (Bone's final validation loss / LoRA's).

    python bench/convergence.py --quick          # under 5 minutes on 2 cores
    python bench/convergence.py                  # the full run, 3 seeds (under 60 minutes on 2 cores)
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.memory import peak_rss, reset_peak_rss, rss_now  # noqa: E402
from src.bone import BoneConfig, apply_adapters, trainable_parameters  # noqa: E402
from src.checkpoint import atomic_save, atomic_write, load_state_dict, new_config, x060_state_dict  # noqa: E402
from src.model import RWKV6  # noqa: E402
from src.tokenizer import world_tokenizer  # noqa: E402
from src.training.loss import lm_loss  # noqa: E402

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
THINGS = ["apples", "books", "coins", "stones", "shells", "cards"]
METHODS = ("bone", "bat", "lora", "full", "state", "bone+state")
LRS = (3e-3, 1e-2, 3e-2, 1e-1)
# A state (state tuning: each layer's initial WKV state, every weight frozen) learns at its own scale: its
# values are of order 1. bone+state sweeps bone's grid, its state at state's best lr (or STATE_LR).
STATE_LRS = (0.1, 0.3, 1.0, 3.0)
STATE_LR = 1.0
SIZES = {  # layers, width, ctx, batch, pretrain steps, fine-tune steps, validation every, seeds
    "quick": dict(layers=2, width=128, ctx=64, batch=8, pretrain=300, steps=60, lrs=LRS, val_every=10, seeds=1),
    "full": dict(layers=4, width=256, ctx=128, batch=8, pretrain=1500, steps=200, lrs=LRS, val_every=20, seeds=3),
}


def story(rng):
    a, b = rng.sample(NAMES, 2)
    # Two-digit counts, as in the additions: the fine-tuning data's number tokens are not new to the base.
    thing, x, y = rng.choice(THINGS), rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} has {x} {thing}. {b} gives {a} {y} more {thing}. Now {a} has {x + y} {thing}, and {b} is happy. "


def addition(rng):
    x, y = rng.randint(10, 99), rng.randint(10, 99)
    return f" {x} + {y} = {x + y}."      # " 23" as in the stories: the same number tokens


def token_stream(make, n, seed, tokenizer):
    rng = random.Random(seed)
    return [t for _ in range(n) for t in tokenizer.encode(make(rng))]


def make_data(seed):
    """Pretraining stories, fine-tuning additions (train and held out), in dense ids."""
    tok = world_tokenizer()
    stories = token_stream(story, 6000, 0, tok)              # the base's data never changes with the seed
    train = token_stream(addition, 20000, 1000 + seed, tok)
    held_out = token_stream(addition, 2000, 999, tok)        # the same held-out set for every seed
    # Every addition there can be, so that the vocabulary (and with it the cached base) is the same for every seed.
    every_sum = {t for x in range(10, 100) for y in range(10, 100) for t in tok.encode(f" {x} + {y} = {x + y}.")}
    used = sorted(set(stories) | every_sum)
    dense = {t: i for i, t in enumerate(used)}
    as_tensor = lambda s: torch.tensor([dense[t] for t in s])  # noqa: E731
    return len(used), as_tensor(stories), as_tensor(train), as_tensor(held_out)


def batches(stream, ctx, batch, seed):
    """Endless random windows of ctx + 1 tokens: (inputs, targets)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(stream) - ctx - 1, (batch,), generator=g)
        w = torch.stack([stream[s:s + ctx + 1] for s in start.tolist()])
        yield w[:, :-1], w[:, 1:]


def windows(stream, ctx, n=16):
    """Fixed held-out windows, evenly spaced."""
    step = (len(stream) - ctx - 1) // n
    w = torch.stack([stream[i * step:i * step + ctx + 1] for i in range(n)])
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def val_loss(model, val):
    model.eval()
    loss = lm_loss(model, *val).item()
    model.train()
    return loss


def pretrained_base(size, vocab, stories, out_dir, say):
    """The cached base, or pretrain one (seed 0) and cache it."""
    base_keys = ("layers", "width", "ctx", "batch", "pretrain")
    settings = json.dumps({**{k: size[k] for k in base_keys}, "vocab": vocab, "v": 1}, sort_keys=True)
    path = os.path.join(out_dir, f"base-{hashlib.sha256(settings.encode()).hexdigest()[:10]}.pth")
    if os.path.exists(path):
        say(f"base: cached {path}")
        return load_state_dict(path, mmap=False)
    torch.manual_seed(0)
    cfg = new_config("x060", vocab, size["width"], size["layers"], head_size=32)
    model = RWKV6.from_state_dict(x060_state_dict(cfg, seed=0), op="cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = batches(stories, size["ctx"], size["batch"], 0)
    start = time.time()
    for step in range(1, size["pretrain"] + 1):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, step / 50) * (0.1 + 0.9 * (1 - step / size["pretrain"]))
        loss = lm_loss(model, *next(data))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == size["pretrain"]:
            say(f"base: pretraining step {step}/{size['pretrain']}, loss {loss.item():.3f}, {time.time() - start:.0f} s")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_save(sd, path)
    return sd


def adapted(base_sd, method, r):
    model = RWKV6.from_state_dict({k: v.clone() for k, v in base_sd.items()}, op="cpu").train()
    if method == "full":
        return model
    if method == "state":
        return apply_adapters(model, BoneConfig(target_modules=[], train_parts=["state"]), verbose=False)
    if method == "bone+state":
        return apply_adapters(model, BoneConfig(mode="bone", r=r, train_parts=["state"]), verbose=False)
    config = BoneConfig(mode=method, r=r // 2, lora_alpha=r // 2) if method == "lora" else BoneConfig(mode=method, r=r)
    return apply_adapters(model, config, verbose=False)


def fine_tune(base_sd, method, r, lr, size, train, val, seed, state_lr=None):
    torch.manual_seed(seed)
    model = adapted(base_sd, method, r)
    # bone+state: the states in a group of their own, at state_lr (train.py's --lr_state), on the same warmup.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    states = [p for n, p in named if n.endswith("time_state")] if state_lr is not None else []
    groups = [{"params": [p for n, p in named if not any(p is q for q in states)], "scale": 1.0}]
    groups += [{"params": states, "scale": state_lr / lr}] if states else []
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    data = batches(train, size["ctx"], size["batch"], seed)
    curve = {"train": [], "val": [(0, val_loss(model, val))]}
    reset = reset_peak_rss()
    before = rss_now()
    start = time.perf_counter()
    for step in range(1, size["steps"] + 1):
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * min(1.0, step / 10)
        loss = lm_loss(model, *next(data))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve["train"].append((step, loss.item()))
        if step % size["val_every"] == 0 or step == size["steps"]:
            curve["val"].append((step, val_loss(model, val)))
    seconds = time.perf_counter() - start
    return {"method": method, "lr": lr, "state_lr": state_lr, "params": trainable_parameters(model)[0], "curve": curve,
            "tokens_per_s": size["steps"] * size["batch"] * size["ctx"] / seconds,
            "peak_extra_rss": peak_rss(reset) - before if reset else None}


def steps_to(curve, threshold):
    return next((s for s, v in curve["val"] if v <= threshold), None)


def table(results, threshold):
    rows = ["| method | trainable params | best lr | final train loss | final val loss | steps to val <= "
            f"{threshold:.3f} | tokens/s | peak extra RSS |", "|---|---|---|---|---|---|---|---|"]
    for m in (m for m in METHODS if m in results):
        r = results[m]
        last_train = sum(v for _, v in r["curve"]["train"][-10:]) / len(r["curve"]["train"][-10:])
        reach = steps_to(r["curve"], threshold)
        mem = f"{r['peak_extra_rss'] / 2**20:.0f} MiB" if r["peak_extra_rss"] is not None else "n/a"
        lr = f"{r['lr']:g}" + (f" (state {r['state_lr']:g})" if r.get("state_lr") is not None else "")
        rows.append(f"| {m} | {r['params']:,} | {lr} | {last_train:.3f} | {r['curve']['val'][-1][1]:.3f} | "
                    f"{reach if reach is not None else 'not reached'} | {r['tokens_per_s']:.0f} | {mem} |")
    return "\n".join(rows)


def final(run):
    return run["curve"]["val"][-1][1]


def spread_table(runs, seeds):
    """Every seed's final validation loss per method at its best lr, with mean and min-max."""
    rows = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min-max |",
            "|---|" + "---|" * (len(seeds) + 2)]
    for m in (m for m in METHODS if m in runs[seeds[0]]):
        finals = [final(runs[s][m]) for s in seeds]
        rows.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in finals) +
                    f" | {sum(finals) / len(finals):.3f} | {min(finals):.3f}-{max(finals):.3f} |")
    if not {"bone", "lora"} <= set(runs[seeds[0]]):
        return "\n".join(rows)
    ratios = [final(runs[s]["bone"]) / final(runs[s]["lora"]) for s in seeds]
    rows.append("| bone / lora | " + " | ".join(f"{v:.4f}" for v in ratios) +
                f" | {sum(ratios) / len(ratios):.4f} | {min(ratios):.4f}-{max(ratios):.4f} |")
    return "\n".join(rows)


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def plot(runs, seeds, path, title):
    """Validation loss per step: each method's mean over the seeds, its min-max band when there are several.
    Left: every method from the first validation after step 0 (the base's step-0 loss, far above, would
    squash the rest into a line). Right: a zoom on the last half of the steps, on the methods that end
    within 1.5x of the best final loss (state tuning, far above on a new task, would squash the others)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    methods = [m for m in METHODS if m in runs[seeds[0]]]
    best = min(sum(final(runs[s][m]) for s in seeds) / len(seeds) for m in methods)
    last = max(s for s, _ in runs[seeds[0]][methods[0]]["curve"]["val"])
    for ax, zoom in zip(axes, (False, True)):
        shown = []
        for i, m in enumerate(methods):
            steps = [s for s, _ in runs[seeds[0]][m]["curve"]["val"]]
            per_seed = [[v for _, v in runs[s][m]["curve"]["val"]] for s in seeds]
            mean = [sum(col) / len(col) for col in zip(*per_seed)]
            if zoom and mean[-1] > 1.5 * best:
                continue
            first = last / 2 if zoom else 1
            shown += [v for s, row in zip(steps, zip(*per_seed)) if s >= first for v in row]
            line, = ax.plot(steps, mean, marker="o", markersize=3, color=f"C{i}",
                            label=f"{m} (lr {runs[seeds[0]][m]['lr']:g})")
            if len(seeds) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*per_seed)], [max(c) for c in zip(*per_seed)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        if shown:
            low, high = min(shown), max(shown)
            ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.05 * (high - low or 1))
        if zoom:
            ax.set_xlim(last / 2 - last / 40, last + last / 40)
            ax.set_title("zoom: the last half, methods within 1.5x of the best", fontsize=9)
        else:
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("validation loss" + (f" (mean, min-max of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def sweep_lrs(base_sd, r, size, train, val, seed, say, methods=METHODS):
    """Every method at every lr of its grid (state: STATE_LRS); the best run per method by final validation loss."""
    results, sweep = {}, []
    for method in methods:
        for lr in size["state_lrs"] if method == "state" else size["lrs"]:
            run = fine_tune(base_sd, method, r, lr, size, train, val, seed, state_lr_of(method, results))
            sweep.append({"method": method, "lr": lr, "final_val_loss": final(run)})
            say(f"seed {seed} {method:>4} lr {lr:g}: {run['params']:,} trainable, final val loss {final(run):.4f}, "
                f"{run['tokens_per_s']:.0f} tokens/s")
            if math.isfinite(final(run)) and (method not in results or final(run) < final(results[method])):
                results[method] = run
    missing = [m for m in methods if m not in results]
    if missing:
        sys.exit(f"convergence: {missing[0]} diverged at every learning rate of the grid; give another --lrs.")
    return results, sweep


def state_lr_of(method, results):
    """bone+state's state learns at the state-only run's best lr (STATE_LR when that did not run)."""
    return (results["state"]["lr"] if "state" in results else STATE_LR) if method == "bone+state" else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small version (under 5 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=1, help="the first fine-tuning seed: data order and adapter init "
                                                       "(the base is pretrained once, with seed 0)")
    p.add_argument("--seeds", type=int, default=None, help="how many seeds, from --seed on (default: 1 quick, "
                                                           "3 full); the lr sweep runs on the first")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "convergence"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core; on a shared "
                   "machine 1 avoids threads waiting for each other)")
    p.add_argument("--r", type=int, default=16, help="Bone and Bat r; LoRA's rank is r / 2 (equal parameters)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: 60 quick, 200 full)")
    p.add_argument("--pretrain", type=int, default=None, help="pretraining steps of the base")
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid")
    p.add_argument("--state_lrs", default=None, help="comma-separated learning-rate grid of the state (state tuning) "
                                                     f"(default {','.join(map(str, STATE_LRS))})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run (default all: "
                   f"{', '.join(METHODS)}); e.g. state,bone+state to add those rows to an earlier run's table")
    args = p.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    for key in ("steps", "pretrain", "seeds"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    size["state_lrs"] = STATE_LRS
    for flag, key, value in (("--lrs", "lrs", args.lrs), ("--state_lrs", "state_lrs", args.state_lrs)):
        if value:
            try:
                size[key] = tuple(float(x) for x in value.split(","))
            except ValueError:
                p.error(f"{flag} must be comma-separated numbers such as 0.003,0.01, not {value!r}.")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods {args.methods!r}: choose among {', '.join(METHODS)}.")
    methods = [m for m in METHODS if m in methods]
    if args.r < 2 or args.r % 2:
        p.error(f"--r must be an even number of at least 2 (LoRA's rank is r / 2), not {args.r}.")
    for key in ("steps", "pretrain", "seeds"):
        if size[key] < 1:
            p.error(f"--{key} must be at least 1, not {size[key]}.")
    size["val_every"] = min(size["val_every"], size["steps"])
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    say = lambda m: print(m, flush=True)  # noqa: E731
    start = time.time()

    seeds = list(range(args.seed, args.seed + size["seeds"]))
    vocab, stories, train, held_out = make_data(seeds[0])
    unseen = len(set(train.tolist()) - set(stories.tolist()))
    say(f"data: {len(stories):,} story tokens (pretraining), {len(train):,} addition tokens (fine-tuning), "
        f"{len(held_out):,} held out; {vocab} distinct World tokens, {unseen} of the fine-tuning data's never "
        "seen in pretraining (their embeddings stay at their init for the adapters, not for full fine-tuning)")
    base_sd = pretrained_base(size, vocab, stories, args.out_dir, say)
    val = windows(held_out, size["ctx"])

    results, sweep = sweep_lrs(base_sd, args.r, size, train, val, seeds[0], say, methods)
    runs = {seeds[0]: results}
    for seed in seeds[1:]:
        train = make_data(seed)[2]
        runs[seed] = {}
        for m in methods:
            runs[seed][m] = fine_tune(base_sd, m, args.r, results[m]["lr"], size, train, val, seed,
                                      results[m].get("state_lr"))
            say(f"seed {seed} {m:>4} lr {results[m]['lr']:g}: final val loss {final(runs[seed][m]):.4f}")
    say("trainable parameters: " + ", ".join(f"{m} {results[m]['params']:,}" for m in methods))
    if {"bone", "lora"} <= set(methods):
        say(f"bone / lora parameters: {results['bone']['params'] / results['lora']['params']:.3f}")
    threshold = final(results["lora"] if "lora" in results else results[methods[0]])
    text = table(results, threshold)
    spread = spread_table(runs, seeds)
    title = (f"RWKV-6 {size['layers']}x{size['width']}, additions after stories, "
             f"{size['steps']} steps of {size['batch']}x{size['ctx']} tokens")
    report = (f"{title}, seed {seeds[0]} (the lr sweep)\n\n{text}\n\n"
              f"Final validation loss per seed, each method at its best lr:\n\n{spread}\n")
    write_text(os.path.join(args.out_dir, "table.md"), report)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["seed", "method", "lr", "kind", "step", "loss"])
    for seed in seeds:
        for m in methods:
            for kind in ("train", "val"):
                for s, v in runs[seed][m]["curve"][kind]:
                    w.writerow([seed, m, runs[seed][m]["lr"], kind, s, f"{v:.6f}"])
    write_text(os.path.join(args.out_dir, "curves.csv"), buf.getvalue())
    mean = {m: sum(final(runs[s][m]) for s in seeds) / len(seeds) for m in methods}
    ratio = mean["bone"] / mean["lora"] if {"bone", "lora"} <= set(methods) else None
    minutes = (time.time() - start) / 60
    summary = {"size": {**size, "lrs": list(size["lrs"]), "state_lrs": list(size["state_lrs"])}, "seeds": seeds,
               "r": args.r, "methods": methods, "sweep": sweep,
               "results": {m: {k: v for k, v in results[m].items() if k != "curve"} | {"final_val_loss": final(results[m])}
                           for m in methods},
               "final_val_loss_per_seed": {m: [final(runs[s][m]) for s in seeds] for m in methods},
               "mean_final_val_loss": mean, "bone_vs_lora_val_loss_ratio": ratio, "minutes": minutes}
    write_text(os.path.join(args.out_dir, "results.json"), json.dumps(summary, indent=1))
    plot(runs, seeds, os.path.join(args.out_dir, "convergence.png"), title)
    print(f"\n{report}\nwritten to {args.out_dir} in {minutes:.1f} minutes: table.md, curves.csv, results.json, "
          "convergence.png")
    if ratio is None:
        return
    if len(seeds) > 1:
        print(f"the ratio below is of the mean final validation loss over the {len(seeds)} seeds")
    print(f"bone_vs_lora_val_loss_ratio {ratio:.4f}")


if __name__ == "__main__":
    main()
