"""Memory and speed of one training step (fwd+bwd, Bone r=64) as the sample grows.

Each configuration runs in a fresh process on a random model (default 6 layers, 512 wide, World
vocabulary, fp32 on the CPU, bf16 autocast on a GPU), one sample of ctx tokens:

  plain    the logits of the whole sample materialised, then the loss (the code before the fused head)
  fused    the fused head + loss (token blocks; what train.py runs by default)
  grad_cp  fused, and every block recomputed in the backward pass (train.py --grad_cp 1)
  chunked  fused, and the sample run --chunk tokens at a time (train.py --chunk_ctx N)

Peak memory: the process's peak resident set on the CPU (ru_maxrss), torch.cuda.max_memory_allocated
on a GPU; "extra" is the peak minus what the model alone holds. Time: the best of --repeat steps after
one warm-up step. The ratios against the goals are the last lines.

    python bench/memory.py [--ctx 512,2048,8192] [--chunk 512] [--layers 6 --width 512] [--repeat 2]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = ("plain", "fused", "grad_cp", "chunked")


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_config(args):
    """Runs in the child: build, step, print one JSON line."""
    import torch
    from src.bone import BoneConfig, apply_adapters
    from src.checkpoint import default_dim_ffn, x060_state_dict
    from src.config import RWKV6Config
    from src.model import RWKV6
    from src.training.loss import lm_loss, masked_lm_loss

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    cfg = RWKV6Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers, dim_att=args.width,
                      dim_ffn=default_dim_ffn(args.width), head_size=64)
    model = RWKV6.from_state_dict(x060_state_dict(cfg), grad_cp=args.config == "grad_cp").to(device).train()
    apply_adapters(model, BoneConfig(r=64), verbose=False)
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(1, args.vocab, (1, args.ctx), generator=g).to(device) for _ in range(2))
    chunk = args.chunk if args.config == "chunked" else 0
    base = torch.cuda.memory_allocated() if gpu else rss_now()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            if args.config == "plain":
                loss = masked_lm_loss(model(idx)[0], targets, None)
            else:
                loss = lm_loss(model, idx, targets, None, chunk_ctx=chunk)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"config": args.config, "ctx": args.ctx, "peak": peak, "base": base, "seconds": min(times),
                      "device": torch.cuda.get_device_name() if gpu else "cpu"}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", default=None, help="comma-separated sample lengths (default 512,2048,8192; "
                                               "and 32768 on a GPU)")
    p.add_argument("--chunk", type=int, default=512, help="the chunked configuration's --chunk_ctx")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=2, help="timed steps per configuration (the best is kept)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which of " + ", ".join(CONFIGS))
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        args.ctx = int(args.ctx)
        return one_config(args)

    import torch
    gpu = torch.cuda.is_available()
    ctxs = [int(c) for c in (args.ctx or ("512,2048,8192,32768" if gpu else "512,2048,8192")).split(",")]
    rows = {}
    for ctx in ctxs:
        for config in args.configs.split(","):
            cmd = [sys.executable, __file__, "--config", config, "--ctx", str(ctx), "--chunk", str(args.chunk),
                   "--layers", str(args.layers), "--width", str(args.width), "--vocab", str(args.vocab),
                   "--repeat", str(args.repeat)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                print(f"{config} at ctx {ctx}: failed ({out.stderr.strip().splitlines()[-1:]})", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[config, ctx] = row
            print(f"{config:>8} ctx {ctx:>6}: peak {row['peak'] / 2**30:6.2f} GiB (model {row['base'] / 2**30:.2f}, "
                  f"extra {(row['peak'] - row['base']) / 2**30:6.2f}), {ctx / row['seconds']:8.0f} tokens/s", flush=True)
    device = next(iter(rows.values()))["device"] if rows else "?"
    print(f"\nL={args.layers} C={args.width} V={args.vocab}, Bone r=64, one sample, {device}; "
          f"best of {args.repeat} timed steps each; the ratios:")
    ratio = lambda a, b, f: (f(rows[a]) / f(rows[b])) if a in rows and b in rows else float("nan")  # noqa: E731
    peak, extra, secs = (lambda r: r["peak"]), (lambda r: r["peak"] - r["base"]), (lambda r: r["seconds"])
    small, big = min(ctxs), max(ctxs)
    print(f"chunked peak at ctx {big} / plain peak at ctx {small}: {ratio(('chunked', big), ('plain', small), peak):.2f}x "
          f"(goal <= 1.3x; plain at ctx {big}: {ratio(('plain', big), ('plain', small), peak):.2f}x)")
    for ctx in ctxs:
        print(f"ctx {ctx}: fused extra memory / plain: {ratio(('fused', ctx), ('plain', ctx), extra):.2f}x (goal <= 0.5x at 2048); "
              f"fused time / plain: {ratio(('fused', ctx), ('plain', ctx), secs):.2f}x (goal <= 1.0x); "
              f"chunked time / grad_cp: {ratio(('chunked', ctx), ('grad_cp', ctx), secs):.2f}x (goal <= 1.1x)")
    if args.json:
        from src.checkpoint import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(list(rows.values()), indent=1).encode()))


if __name__ == "__main__":
    main()
