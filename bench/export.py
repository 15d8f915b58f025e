"""export.py against a plain torch.load + torch.save of the same file: wall time and peak memory
for each output format, against the input's size.

Makes (once, kept in --workdir) a bf16 model of the RWKV-6 0.4B shape by default (24 layers,
1024 wide, World vocabulary: about 0.9 GB; --family x070 for RWKV-7), then runs, each in a
fresh process and each --repeat times, best time and worst peak kept:

  plain:  python -c "sd = torch.load(model, weights_only=True); torch.save(sd, copy)"
  export: python export.py --model model --format F --output out --dtype D --quiet
          for gguf (same = bf16), gguf q8_0, safetensors (same) and st (fp16)
  adapter: python export.py --adapter adapter.pth --format gguf --output lora.gguf --quiet, for a
          bone adapter of r = --adapter_r on the default targets (made once beside the model), with
          its size beside the merged GGUF's (bf16) and the time beside that model export's

    python bench/export.py [--n_layer 24 --n_embd 1024 --family x060 --repeat 3]
"""
import argparse
import os
import subprocess
import sys

from measure import IDLE, PLAIN, ROOT, gb, run

CASES = (("gguf", "same"), ("gguf", "q8_0"), ("safetensors", "same"), ("st", "fp16"))
SUFFIX = {"gguf": "gguf", "safetensors": "safetensors", "st": "st"}


def make_input(path, n_layer, n_embd, family):
    # In a child process (--make), so that this parent stays small: a child's ru_maxrss starts
    # from its parent's resident set at fork.
    sys.path.insert(0, ROOT)
    from src.checkpoint import make_checkpoint
    print(f"making {path} ({family}, L={n_layer}, C={n_embd}, World vocabulary, bf16)...", flush=True)
    make_checkpoint(path, n_layer=n_layer, n_embd=n_embd, dtype="bf16", family=family)


def make_adapter(model, path, r):
    sys.path.insert(0, ROOT)
    import torch
    from src.bone import BoneConfig, apply_adapters, save_adapter
    from src.family import from_checkpoint
    print(f"making {path} (bone, r={r})...", flush=True)
    net = from_checkpoint(model, dtype=torch.bfloat16, op="cpu")
    apply_adapters(net, BoneConfig(r=r), verbose=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-3)
    save_adapter(net, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--family", choices=("x060", "x070"), default="x060")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(ROOT, "out", "bench"))
    p.add_argument("--adapter_r", type=int, default=64)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make_adapter", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    directory = os.path.join(args.workdir, f"export-{args.family}-L{args.n_layer}-C{args.n_embd}")
    os.makedirs(directory, exist_ok=True)
    model = os.path.join(directory, "model.pth")
    adapter = os.path.join(directory, f"adapter-bone-r{args.adapter_r}.pth")
    if args.make:
        return make_input(model, args.n_layer, args.n_embd, args.family)
    if args.make_adapter:
        return make_adapter(model, adapter, args.adapter_r)
    for flag, path in (("--make", model), ("--make_adapter", adapter)):
        if not os.path.exists(path):
            subprocess.run([sys.executable, __file__, flag, "--n_layer", str(args.n_layer), "--n_embd",
                            str(args.n_embd), "--family", args.family, "--workdir", args.workdir,
                            "--adapter_r", str(args.adapter_r)], check=True)
    size = os.path.getsize(model)
    py, copy = sys.executable, os.path.join(directory, "plain-copy.pth")
    idle = run([py, "-c", IDLE])
    results = {"plain": []}
    for _ in range(args.repeat):
        results["plain"].append(run([py, "-c", PLAIN, model, copy]))
        for fmt, dtype in CASES:
            out = os.path.join(directory, f"out-{dtype}.{SUFFIX[fmt]}")
            results.setdefault((fmt, dtype), []).append(
                (*run([py, os.path.join(ROOT, "export.py"), "--model", model, "--format", fmt, "--output", out,
                       "--dtype", dtype, "--overwrite", "--quiet"], stdout=subprocess.DEVNULL), os.path.getsize(out)))
        out = os.path.join(directory, "out-lora.gguf")
        results.setdefault("adapter", []).append(
            (*run([py, os.path.join(ROOT, "export.py"), "--adapter", adapter, "--format", "gguf", "--output", out,
                   "--overwrite", "--quiet"], stdout=subprocess.DEVNULL), os.path.getsize(out)))
    for name in os.listdir(directory):
        if name not in ("model.pth", os.path.basename(adapter)):
            os.remove(os.path.join(directory, name))
    t_plain, m_plain = min(r[0] for r in results["plain"]), max(r[1] for r in results["plain"])
    print(f"\ninput {model}: {gb(size)} ({args.family}, bf16); best time and worst peak of {args.repeat}, "
          "each in a fresh process")
    print(f"{'':30}{'wall time':>11}{'peak RSS':>11}{'output':>11}{'time/plain':>12}{'peak/input':>12}"
          f"{'above floor/input':>19}")
    print(f"{'python + import torch (floor)':30}{idle[0]:>10.2f}s{gb(idle[1]):>11}")
    row = lambda name, t, m, out: print(f"{name:30}{t:>10.2f}s{gb(m):>11}{gb(out):>11}{t / t_plain:>11.2f}x"  # noqa: E731
                                        f"{m / size:>11.2f}x{(m - idle[1]) / size:>18.2f}x")
    row("plain torch.load + torch.save", t_plain, m_plain, size)
    for fmt, dtype in CASES:
        rows = results[(fmt, dtype)]
        row(f"export.py {fmt} {dtype}", min(r[0] for r in rows), max(r[1] for r in rows), rows[0][2])
    rows, merged = results["adapter"], results[("gguf", "same")]
    t, m, out = min(r[0] for r in rows), max(r[1] for r in rows), rows[0][2]
    t_merged, out_merged = min(r[0] for r in merged), merged[0][2]
    print(f"\nadapter {os.path.basename(adapter)} ({gb(os.path.getsize(adapter))}) as a llama.cpp LoRA, "
          f"export.py --adapter --format gguf:")
    print(f"adapter gguf lora r={args.adapter_r}: {t:.2f}s, peak {gb(m)}, {out / 1e6:.1f} MB; "
          f"{t / t_merged:.3f}x the time and {out / out_merged:.3f}x the size of the merged GGUF (bf16, "
          f"{t_merged:.2f}s, {out_merged / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
