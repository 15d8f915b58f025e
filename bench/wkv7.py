"""WKV7 speed on this machine, each against what it replaces.

1. CPU fwd+bwd of the chunked WKV7 (src/ops/wkv7_cpu.py) against the step-by-step reference
   loop (src/ops/wkv7_reference.py) in float64, the truth the tests hold it to, and in fp32
   (B=1, H=4, N=64, T=1024), with the fast path's largest error against the float64 result.
2. On a machine with CUDA: the CUDA kernel's fwd+bwd at B=8, H=32, N=64, T=4096 against the
   CPU path.

Run: python bench/wkv7.py  (prints each figure, then the ratios on its last lines)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.wkv6 import best_time, fwd_bwd  # noqa: E402
from src.ops import wkv7  # noqa: E402
from src.ops.wkv7_reference import wkv7_reference  # noqa: E402


def wkv7_inputs(B, T, H, N, device="cpu", dtype=torch.float32):
    """As the model makes them: kk unit-norm per head, a = -kk, b = kk * rate, w <= -0.5."""
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = -F.softplus(-rand()) - 0.5
    kk = F.normalize(rand(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rand())
    return [x.to(device, dtype).requires_grad_() for x in (r, w, k, v, a, b)]


def bench_cpu(repeats, T):
    inputs = wkv7_inputs(1, T, 4, 64)
    fast = best_time(fwd_bwd(lambda *a: wkv7(*a, op="cpu"), inputs), repeats)
    loop32 = best_time(fwd_bwd(lambda *a: wkv7_reference(*a, dtype=torch.float32), inputs), 1, warmup=0)
    loop64 = best_time(fwd_bwd(wkv7_reference, inputs), 1, warmup=0)
    with torch.no_grad():
        y, s = wkv7(*inputs, op="cpu")
        y64, s64 = wkv7_reference(*inputs)
    err = max(((y.double() - y64).abs().max() / y64.abs().max()).item(), ((s.double() - s64).abs().max() / s64.abs().max()).item())
    print(f"WKV7 fwd+bwd B=1 H=4 N=64 T={T}: chunked cpu {fast * 1e3:.1f} ms, step-by-step reference "
          f"{loop64 * 1e3:.0f} ms in float64, {loop32 * 1e3:.0f} ms in fp32 (chunked output vs float64: {err:.1e} of the scale)")
    return [("cpu wkv7 vs float64 reference loop", loop64 / fast), ("cpu wkv7 vs fp32 reference loop", loop32 / fast)]


def bench_cuda(repeats):
    inputs = wkv7_inputs(8, 4096, 32, 64, device="cuda", dtype=torch.bfloat16)
    t_cuda = best_time(fwd_bwd(lambda *a: wkv7(*a, op="cuda"), inputs), repeats)
    cpu_inputs = [x.detach().float().cpu().requires_grad_() for x in inputs]
    t_cpu = best_time(fwd_bwd(lambda *a: wkv7(*a, op="cpu"), cpu_inputs), 1, warmup=0)
    print(f"WKV7 fwd+bwd B=8 H=32 N=64 T=4096 bf16: cuda {t_cuda * 1e3:.2f} ms, cpu path {t_cpu * 1e3:.0f} ms")
    return [("cuda wkv7 vs cpu path", t_cpu / t_cuda)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    ratios = bench_cpu(args.repeats, args.tokens)
    if torch.cuda.is_available():
        ratios += bench_cuda(args.repeats)
    for name, ratio in ratios:
        print(f"{name}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
