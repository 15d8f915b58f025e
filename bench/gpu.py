"""Everything that needs a GPU, in one command (under 8 minutes on one H100):

1. the GPU tests (tests/test_wkv6_cuda_gpu.py: the real kernel against the float64 reference);
2. WKV6 forward + backward in bf16 at (B=8, T=4096, H=64, N=64) and (B=1, T=4096, H=32, N=64):
   our kernel, and flash-linear-attention's chunk_rwkv6 when that package is installed, each with
   its time and its largest error against the float64 reference (y and every gradient; the decay
   gradient gw especially);
3. one training step (forward, backward, AdamW) on a random model of the RWKV-6 1.6B shape (24
   layers, 2048 wide, World vocabulary), bf16, batch 1: Bone r=64 and LoRA with as many trainable
   parameters, at ctx 1024, and at ctx 16384 with --chunk_ctx 2048: tokens/s and peak memory.

It prints a table and writes it as JSON (--json, default out/bench_gpu.json). Without a GPU it says
so in one line and exits 0.

    python bench/gpu.py [--json out/bench_gpu.json] [--skip_tests]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WKV_SHAPES = ((8, 4096, 64, 64), (1, 4096, 32, 64))
MODEL_1B6 = dict(n_layer=24, n_embd=2048, vocab_size=65536)
STEPS = (("bone", 1024, 0), ("lora", 1024, 0), ("bone", 16384, 2048), ("lora", 16384, 2048))


def equal_lora_r(layers, bone_params):
    """The LoRA rank whose adapters on the same layers (in x out each) have about `bone_params`
    parameters: LoRA holds r * (in + out) per layer."""
    return max(1, round(bone_params / sum(i + o for i, o in layers)))


def format_table(rows):
    """Markdown lines for result rows (dicts with what, ms, tokens_per_s, peak_gib, errors)."""
    lines = ["| what | time (ms) | tokens/s | peak memory (GiB) | max error vs float64 (y, gr, gk, gv, gw, gu) |",
             "|---|---|---|---|---|"]
    for row in rows:
        errors = row.get("errors")
        err = ", ".join(f"{errors[n]:.1e}" for n in ("y", "gr", "gk", "gv", "gw", "gu")) if errors else ""
        cell = lambda key, fmt: format(row[key], fmt) if row.get(key) is not None else ""  # noqa: E731
        lines.append(f"| {row['what']} | {cell('ms', '.1f')} | {cell('tokens_per_s', ',.0f')} | "
                     f"{cell('peak_gib', '.2f')} | {err or row.get('note', '')} |")
    return lines


def timed(fn, repeat=3):
    """Best wall time of fn() in ms over `repeat` runs after one warm-up, on the GPU's clock."""
    import torch
    fn()
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def wkv_rows():
    import torch
    from src.ops.wkv6_cuda import wkv6_cuda
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError:
        chunk_rwkv6 = None

    def fla(r, k, v, w, u, s0):
        # fla takes the log of the decay (-exp(w)) and scales r by `scale`; ours uses scale 1.
        return chunk_rwkv6(r, k, v, -torch.exp(w.float()).to(r.dtype), u.to(r.dtype), scale=1.0,
                           initial_state=s0, output_final_state=True)

    rows = []
    for B, T, H, N in WKV_SHAPES:
        rows += wkv_shape_rows(B, T, H, N, {"ours": wkv6_cuda, "fla chunk_rwkv6": fla if chunk_rwkv6 else None})
        torch.cuda.empty_cache()
    return rows


def wkv_shape_rows(B, T, H, N, paths):
    import torch
    from tests.wkv6_cuda_cases import make_case, reference, relative_errors, run
    case = make_case(B, T, H, N, torch.bfloat16, device="cuda", seed=0)
    truth = reference(case)
    rows = []
    for name, fn in paths.items():
        what = f"WKV6 fwd+bwd bf16 B={B} T={T} H={H} N={N}, {name}"
        if fn is None:
            rows.append({"what": what, "note": "flash-linear-attention not installed"})
            continue
        try:
            errors = relative_errors(run(fn, case), truth)
            ms = timed(lambda: run(fn, case))
        except Exception as e:      # report the other rows even if one path fails
            rows.append({"what": what, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        rows.append({"what": what, "ms": ms, "tokens_per_s": B * T / ms * 1000, "errors": errors})
    return rows


def random_model(n_layer, n_embd, vocab_size):
    """A random bf16 RWKV6 of this shape made on the GPU directly (no slow orthogonal init)."""
    import torch
    from src.checkpoint import default_dim_ffn
    from src.config import RWKV6Config
    from src.model import RWKV6
    cfg = RWKV6Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, dim_att=n_embd,
                      dim_ffn=default_dim_ffn(n_embd), head_size=64)
    sd = {}
    for key, shape in cfg.shapes().items():
        name = key.split(".")[-1]
        if name in ("weight", "bias") and len(shape) == 1:
            t = torch.ones(shape) if name == "weight" else torch.zeros(shape)
        elif name == "time_decay":
            t = -5 + torch.randn(shape)
        elif key.endswith(".weight"):
            t = torch.randn(shape, device="cuda") * shape[-1] ** -0.5
        else:
            t = 0.1 * torch.randn(shape)
        sd[key] = t.to("cuda", torch.bfloat16)
    return RWKV6.from_state_dict(sd, op="cuda")


def step_row(mode, ctx, chunk, lora_r):
    """One training step's figures; for Bone also the LoRA rank with as many parameters."""
    import torch
    from src.bone import BoneConfig, adapter_layers, apply_adapters
    from src.training.loss import lm_loss
    model = random_model(**MODEL_1B6).train()
    config = BoneConfig(r=64) if mode == "bone" else BoneConfig(r=lora_r, mode="lora", lora_alpha=2 * lora_r)
    apply_adapters(model, config, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    if mode == "bone":
        lora_r = equal_lora_r([(m.in_features, m.out_features) for m in adapter_layers(model).values()], n_params)
    for p in params:
        p.data = p.data.float()         # fp32 adapter weights, as DeepSpeed's master copy
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    idx, targets = (torch.randint(1, MODEL_1B6["vocab_size"], (1, ctx), device="cuda") for _ in range(2))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model, idx, targets, None, chunk_ctx=chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        ms = timed(step, repeat=2)
        row = {"ms": ms, "tokens_per_s": ctx / ms * 1000, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.cuda.OutOfMemoryError:
        row = {"note": "out of memory"}
    label = "Bone r=64" if mode == "bone" else f"LoRA r={config.r}"
    row["what"] = (f"train step 1.6B shape, {label} ({n_params:,} params), ctx {ctx}"
                   + (f", --chunk_ctx {chunk}" if chunk else ""))
    return row, lora_r


def step_rows():
    import torch
    rows, lora_r = [], None
    for mode, ctx, chunk in STEPS:
        row, lora_r = step_row(mode, ctx, chunk, lora_r)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(ROOT, "out", "bench_gpu.json"), help="where to write the table")
    p.add_argument("--skip_tests", action="store_true", help="do not run tests/test_wkv6_cuda_gpu.py first")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here (torch sees none), so nothing was measured.")
        return 0
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_wkv6_cuda_gpu.py"], cwd=ROOT,
                               capture_output=True, text=True)
        result["gpu_tests"] = (tests.stdout.strip().splitlines() or ["?"])[-1]
        print(f"GPU tests: {result['gpu_tests']}", flush=True)
    result["rows"] = wkv_rows() + step_rows()
    print(f"{result['device']}, torch {result['torch']}")
    print("\n".join(format_table(result["rows"])))
    from src.checkpoint import atomic_write
    atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
