"""Memory and speed of one training step (fwd+bwd, Bone r=64): as the sample grows, and with the
frozen base held quantized (--quant); an RWKV-6 model, or RWKV-7 with --family x070.

Each configuration runs in a fresh process on a random model (default 6 layers, 512 wide, World
vocabulary, fp32 on the CPU, bf16 autocast on a GPU), one sample of ctx tokens:

  plain    the logits of the whole sample materialised, then the loss (the code before the fused head)
  fused    the fused head + loss (token blocks; what train.py runs by default)
  grad_cp  fused, and every block recomputed in the backward pass (train.py --grad_cp 1)
  chunked  fused, and the sample run --chunk tokens at a time (train.py --chunk_ctx N)

With --state it compares instead state tuning (train.py --peft state: only each layer's initial
WKV state trains, every weight frozen) with Bone r=64 at the same shape, fused head + loss, at each
--ctx (default 512,2048).

With --preference it compares instead a preference step on one pair (its chosen and rejected
sequences, each --ctx tokens, default 1024, sharing the first half, the prompt; the reply the
second half) with an SFT step on the same two sequences and mask: dpo (the trained pass and the
reference pass without gradients), simpo and orpo (no reference), fused head + loss, for --family.

With --quant nf4,int8 it compares instead a bf16 base with the same base held quantized as
train.py --quant holds it (src/quant.py), at the RWKV-6 0.4B shape (24 layers, 1024 wide) unless
--layers/--width say otherwise, fused head + loss, one sample of --ctx tokens (default 256):
"weights" are the bytes of the tensors the model holds (the frozen base; the adapters apart).

Peak memory: the process's peak resident set during the steps on the CPU (VmHWM, reset after the
model is built; the whole process's ru_maxrss where that reset is not allowed),
torch.cuda.max_memory_allocated on a GPU; "extra" is the peak minus what the process held before
the first step. Time: the best of --repeat steps after one warm-up step. The ratios against the
goals are the last lines.

    python bench/memory.py [--ctx 512,2048,8192] [--chunk 512] [--layers 6 --width 512] [--repeat 2]
    python bench/memory.py --quant nf4,int8 [--ctx 256] [--layers 24 --width 1024]
    python bench/memory.py --state [--ctx 512,2048]
    python bench/memory.py --preference [--ctx 1024] [--family x070]
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
PREFERENCE = ("sft", "dpo", "simpo", "orpo")


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Start the kernel's peak-RSS counter (VmHWM) again from now; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(reset):
    if not reset:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def storage_bytes(tensors):
    """Bytes of the storages behind `tensors`, each storage counted once."""
    return sum({(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}.values())


def one_config(args):
    """Runs in the child: build, step, print one JSON line."""
    import torch
    from src.bone import BoneConfig, adapter_layers, apply_adapters
    from src.checkpoint import fresh_state_dict, new_config, trim_heap
    from src.family import from_state_dict
    from src.training.loss import lm_loss, masked_lm_loss

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    cfg = new_config(args.family, args.vocab, args.width, args.layers, head_size=64)
    model = from_state_dict(fresh_state_dict(cfg), grad_cp=args.config == "grad_cp").to(device).train()
    if args.base != "fp32":
        model = model.to(torch.bfloat16)    # the base as train.py holds it under DeepSpeed's bf16
    config = BoneConfig(target_modules=[], train_parts=["state"]) if args.peft == "state" else BoneConfig(r=64)
    apply_adapters(model, config, verbose=False)
    if args.base not in ("fp32", "bf16"):
        from src.quant import quantize_model
        quantize_model(model, args.base)
    trim_heap()
    adapters = [p for layer in adapter_layers(model).values() for p in layer.adapter_tensors().values()]
    adapters += [p for n, p in model.named_parameters() if n.endswith("time_state")]
    held = [t for t in list(model.parameters()) + list(model.buffers()) if all(t is not p for p in adapters)]
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(1, args.vocab, (1, args.ctx), generator=g).to(device) for _ in range(2))
    chunk = args.chunk if args.config == "chunked" else 0
    if args.config in PREFERENCE:   # (built before the baseline is read: its imports are not the step's)
        pair_step = preference_step(args, model, idx, targets)
    base = torch.cuda.memory_allocated() if gpu else rss_now()
    reset = not gpu and reset_peak_rss()

    def step():
        if args.config in PREFERENCE:
            return pair_step()
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
    peak = torch.cuda.max_memory_allocated() if gpu else peak_rss(reset)
    print(json.dumps({"config": args.config, "peft": args.peft, "base_weights": args.base, "ctx": args.ctx, "peak": peak, "base": base,
                      "weights": storage_bytes(held), "adapters": storage_bytes(adapters), "seconds": min(times),
                      "device": torch.cuda.get_device_name() if gpu else "cpu"}))


def preference_step(args, model, idx, targets):
    """The step of a preference configuration: one pair, chosen and rejected each ctx tokens, the
    reply the second half (as in real pairs, the first half, the prompt, is the same in both: the
    given sample's; the chosen reply is the rest of the sample, the rejected one the sample's reverse);
    sft is the language-model loss on the same two sequences and mask."""
    import torch
    import train        # for every configuration, sft too: the same imports in each process
    from src.training.loss import lm_loss
    from src.training.module import RWKVLightning
    half = args.ctx // 2
    idx, targets = (torch.cat([t, torch.cat([t[:, :half], t.flip(1)[:, half:]], 1)]) for t in (idx, targets))  # [2, T]
    mask = torch.zeros_like(idx)
    mask[:, half:] = 1
    if args.config == "sft":
        def loss():
            return lm_loss(model, idx, targets, mask)
    else:
        options = train.parse_args(["--load_model", "-", "--data_file", "-", "--data_type", "preference",
                                    "--objective", args.config])
        objective, hyper = train.preference(options)
        module = RWKVLightning(model, lr_init=1e-4, objective=objective, hyper=hyper)

        def loss():
            return module.preference_loss(idx[None], targets[None], mask[None])[0]

    def step():
        loss().backward()
        model.zero_grad(set_to_none=True)
    return step


def run_child(args, config, ctx, base="fp32", peft="bone"):
    """One configuration in a fresh process: its row, or None (said) when it failed."""
    cmd = [sys.executable, __file__, "--config", config, "--base", base, "--ctx", str(ctx), "--chunk", str(args.chunk),
           "--peft", peft,
           "--layers", str(args.layers), "--width", str(args.width), "--vocab", str(args.vocab),
           "--repeat", str(args.repeat), "--family", args.family]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        print(f"{base} {config} at ctx {ctx}: failed ({out.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n):
    return f"{n / 2**30:6.2f} GiB"


def ctx_table(args, ctxs):
    rows = {}
    for ctx in ctxs:
        for config in args.configs.split(","):
            row = rows[config, ctx] = run_child(args, config, ctx)
            if row:
                print(f"{config:>8} ctx {ctx:>6}: peak {gib(row['peak'])} (before the step {gib(row['base'])}, "
                      f"extra {gib(row['peak'] - row['base'])}), {ctx / row['seconds']:8.0f} tokens/s", flush=True)
    rows = {k: r for k, r in rows.items() if r}
    device = next(iter(rows.values()))["device"] if rows else "?"
    print(f"\n{args.family} L={args.layers} C={args.width} V={args.vocab}, Bone r=64, one sample, {device}; "
          f"best of {args.repeat} timed steps each; the ratios:")
    peak, extra, secs = (lambda r: r["peak"]), (lambda r: r["peak"] - r["base"]), (lambda r: r["seconds"])

    def ratio(text, a, b, f, goal):
        """'text: 0.42x (goal)', or None where a configuration of the pair was not run."""
        return f"{text}: {f(rows[a]) / f(rows[b]):.2f}x ({goal})" if a in rows and b in rows else None

    def line(*parts):
        parts = [part for part in parts if part]
        if parts:
            print("; ".join(parts))
    small, big = min(ctxs), max(ctxs)
    line(ratio(f"chunked peak at ctx {big} / plain peak at ctx {small}", ("chunked", big), ("plain", small), peak,
               "goal <= 1.3x"),
         ratio(f"plain peak at ctx {big} / at ctx {small}", ("plain", big), ("plain", small), peak, "for comparison"))
    for ctx in ctxs:
        line(ratio(f"ctx {ctx}: fused extra memory / plain", ("fused", ctx), ("plain", ctx), extra, "goal <= 0.5x at 2048"),
             ratio("fused time / plain", ("fused", ctx), ("plain", ctx), secs, "goal <= 1.0x"),
             ratio("chunked time / grad_cp", ("chunked", ctx), ("grad_cp", ctx), secs, "goal <= 1.1x"))
    return list(rows.values())


def state_table(args, ctxs):
    """State tuning against Bone r=64: the same shape, the fused head + loss, each ctx."""
    rows = {}
    for ctx in ctxs:
        for peft in ("bone", "state"):
            row = rows[peft, ctx] = run_child(args, "fused", ctx, peft=peft)
            if row:
                print(f"{peft:>5} ctx {ctx:>6}: trains {row['adapters'] / 4:,.0f} values, step peak {gib(row['peak'])} "
                      f"(before the step {gib(row['base'])}, extra {gib(row['peak'] - row['base'])}), "
                      f"{ctx / row['seconds']:8.0f} tokens/s", flush=True)
    rows = {k: r for k, r in rows.items() if r}
    device = next(iter(rows.values()))["device"] if rows else "?"
    print(f"\n{args.family} L={args.layers} C={args.width} V={args.vocab}, one sample, {device}; best of {args.repeat} "
          "timed steps each; the ratios:")
    for ctx in ctxs:
        if ("state", ctx) in rows and ("bone", ctx) in rows:
            s, b = rows["state", ctx], rows["bone", ctx]
            print(f"ctx {ctx}: state / bone: step peak {s['peak'] / b['peak']:.3f}x, extra memory "
                  f"{(s['peak'] - s['base']) / max(1, b['peak'] - b['base']):.3f}x, time {s['seconds'] / b['seconds']:.2f}x")
    return list(rows.values())


def quant_table(args, quants):
    rows = {}
    for base in ["bf16"] + quants:
        row = rows[base] = run_child(args, "fused", args.ctx, base)
        if row:
            print(f"{base:>5}: weights {gib(row['weights'])} (+ adapters {gib(row['adapters'])}), "
                  f"step peak {gib(row['peak'])} (before the step {gib(row['base'])}), "
                  f"{args.ctx / row['seconds']:6.0f} tokens/s", flush=True)
    rows = {k: r for k, r in rows.items() if r}
    device = next(iter(rows.values()))["device"] if rows else "?"
    print(f"\n{args.family} L={args.layers} C={args.width} V={args.vocab}, Bone r=64, one sample of {args.ctx} tokens, {device}; "
          f"best of {args.repeat} timed steps each; the ratios:")
    for base in quants:
        if base in rows and "bf16" in rows:
            q, b = rows[base], rows["bf16"]
            print(f"{base} / bf16: resident base weights {q['weights'] / b['weights']:.3f}x (goal <= 0.35x for nf4), "
                  f"step peak {q['peak'] / b['peak']:.3f}x, time {q['seconds'] / b['seconds']:.2f}x")
    return list(rows.values())


def preference_table(args):
    """A preference step on one pair against an SFT step on the same two sequences."""
    rows = {}
    for config in PREFERENCE:
        row = rows[config] = run_child(args, config, args.ctx)
        if row:
            print(f"{config:>5}: step peak {gib(row['peak'])} (before the step {gib(row['base'])}, extra "
                  f"{gib(row['peak'] - row['base'])}), {row['seconds']:.3f} s", flush=True)
    rows = {k: r for k, r in rows.items() if r}
    device = next(iter(rows.values()))["device"] if rows else "?"
    print(f"\n{args.family} L={args.layers} C={args.width} V={args.vocab}, Bone r=64, one pair of 2 x {args.ctx} tokens, "
          f"{device}; best of {args.repeat} timed steps each; the ratios:")
    for config in PREFERENCE[1:]:
        if config in rows and "sft" in rows:
            o, s = rows[config], rows["sft"]
            goal = " (goal <= 1.4x time, <= 1.1x peak)" if config == "dpo" else ""
            print(f"{config} / sft: time {o['seconds'] / s['seconds']:.2f}x, step peak {o['peak'] / s['peak']:.3f}x, "
                  f"extra memory {(o['peak'] - o['base']) / max(1, s['peak'] - s['base']):.3f}x{goal}")
    return list(rows.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", default=None, help="comma-separated sample lengths (default 512,2048,8192; "
                                               "and 32768 on a GPU; with --quant one length, default 256)")
    p.add_argument("--chunk", type=int, default=512, help="the chunked configuration's --chunk_ctx")
    p.add_argument("--layers", type=int, default=None, help="default 6 (24 with --quant)")
    p.add_argument("--width", type=int, default=None, help="default 512 (1024 with --quant)")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--family", choices=("x060", "x070"), default="x060", help="RWKV-6 (x060) or RWKV-7 (x070)")
    p.add_argument("--repeat", type=int, default=2, help="timed steps per configuration (the best is kept)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which of " + ", ".join(CONFIGS))
    p.add_argument("--quant", default=None, help="compare a bf16 base with it held quantized: comma-separated "
                                                 "from nf4, fp4, int8")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--state", action="store_true", help="compare state tuning (--peft state) with Bone r=64 instead")
    p.add_argument("--preference", action="store_true", help="compare DPO, SimPO and ORPO steps with an SFT step instead")
    p.add_argument("--peft", default="bone", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--base", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    quants = args.quant.split(",") if args.quant else []
    bad = [q for q in quants if q not in ("nf4", "fp4", "int8")]
    if bad:
        p.error(f"--quant {bad[0]!r} is not a quantization this bench knows: choose from nf4, fp4, int8.")
    args.layers = args.layers or (24 if quants else 6)
    args.width = args.width or (1024 if quants else 512)
    if args.config:
        args.ctx = int(args.ctx)
        return one_config(args)

    import torch
    gpu = torch.cuda.is_available()
    if quants:
        args.ctx = int(args.ctx or 256)
        rows = quant_table(args, quants)
    elif args.preference:
        args.ctx = int(args.ctx or 1024)
        rows = preference_table(args)
    elif args.state:
        rows = state_table(args, [int(c) for c in (args.ctx or "512,2048").split(",")])
    else:
        rows = ctx_table(args, [int(c) for c in (args.ctx or ("512,2048,8192,32768" if gpu else "512,2048,8192")).split(",")])
    if args.json:
        from src.checkpoint import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))


if __name__ == "__main__":
    main()
