"""merge.py against a plain torch.load + torch.save of the same file: wall time and peak memory.

Makes (once, kept in --workdir) a bf16 base model of the RWKV-6 0.4B shape by default (24
layers, 1024 wide, World vocabulary: about 0.9 GB) and a Bone adapter for it (r=64 on every
default projection, time and ln parts trained), then runs, each in a fresh process and each
--repeat times alternately, best time kept:

  plain: python -c "sd = torch.load(base, weights_only=True); torch.save(sd, copy)"
  merge: python merge.py --base_model base --adapter adapter --output merged --quiet

Peak memory (the worst of the runs) is the process's peak resident set (ru_maxrss from wait4), which counts the pages of
a memory-mapped file it touches as well as its own allocations. The last lines are the ratios.

    python bench/merge.py [--n_layer 24 --n_embd 1024 --repeat 3]
"""
import argparse
import os
import subprocess
import sys

from measure import IDLE, PLAIN, ROOT, gb, run

sys.path.insert(0, ROOT)


def make_inputs(directory, n_layer, n_embd, r):
    # Run in a child process (--make): a child's ru_maxrss starts from its parent's resident set
    # at fork, so this parent must stay small for the measured processes' peaks to be their own.
    import torch
    from src.bone import BoneConfig, apply_adapters, save_adapter
    from src.checkpoint import make_checkpoint
    from src.model import RWKV6
    from tests.tiny import randomize

    base, adapter = os.path.join(directory, "base.pth"), os.path.join(directory, f"adapter-r{r}.pth")
    if not os.path.exists(base):
        print(f"making {base} (L={n_layer}, C={n_embd}, World vocabulary, bf16)...", flush=True)
        make_checkpoint(base, n_layer=n_layer, n_embd=n_embd, dtype="bf16")
    if not os.path.exists(adapter):
        print(f"making {adapter}...", flush=True)
        model = RWKV6.from_checkpoint(base)
        apply_adapters(model, BoneConfig(r=r, mode="bone", train_parts=["time", "ln"]), verbose=False)
        randomize(model, scale=1e-3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and not n.endswith(".bone"):
                    p.mul_(1.01)
        save_adapter(model, adapter)
        del model
    return base, adapter


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(ROOT, "out", "bench"))
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    directory = os.path.join(args.workdir, f"merge-L{args.n_layer}-C{args.n_embd}")
    os.makedirs(directory, exist_ok=True)
    if args.make:
        make_inputs(directory, args.n_layer, args.n_embd, args.r)
        return
    subprocess.run([sys.executable, __file__, "--make", "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
                    "--r", str(args.r), "--workdir", args.workdir], check=True)
    base, adapter = os.path.join(directory, "base.pth"), os.path.join(directory, f"adapter-r{args.r}.pth")
    copy, merged = os.path.join(directory, "plain-copy.pth"), os.path.join(directory, "merged.pth")
    size = os.path.getsize(base)

    py = sys.executable
    idle = run([py, "-c", IDLE])
    plain, merge = [], []
    for _ in range(args.repeat):
        plain.append(run([py, "-c", PLAIN, base, copy]))
        merge.append(run([py, os.path.join(ROOT, "merge.py"), "--base_model", base, "--adapter", adapter,
                          "--output", merged, "--overwrite", "--quiet"], stdout=subprocess.DEVNULL))
    for f in (copy, merged):
        os.remove(f)
    t_plain, m_plain = min(t for t, _ in plain), max(m for _, m in plain)
    t_merge, m_merge = min(t for t, _ in merge), max(m for _, m in merge)
    print(f"\nbase model {base}: {gb(size)}; adapter {os.path.getsize(adapter) / 1e6:.1f} MB; "
          f"best time and worst peak of {args.repeat}, each in a fresh process")
    print(f"{'':34}{'wall time':>12}{'peak RSS':>12}")
    print(f"{'python + import torch (floor)':34}{idle[0]:>11.2f}s{gb(idle[1]):>12}")
    print(f"{'plain torch.load + torch.save':34}{t_plain:>11.2f}s{gb(m_plain):>12}")
    print(f"{'merge.py':34}{t_merge:>11.2f}s{gb(m_merge):>12}")
    print(f"merge.py peak RSS above the import-torch floor: {gb(m_merge - idle[1])} "
          f"({(m_merge - idle[1]) / size:.2f}x the file size)")
    print(f"merge time / plain load+save time: {t_merge / t_plain:.2f}x (goal <= 1.5x)")
    print(f"merge peak RSS / file size: {m_merge / size:.2f}x (goal <= 1.3x; plain load+save: {m_plain / size:.2f}x)")


if __name__ == "__main__":
    main()
