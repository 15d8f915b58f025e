"""WKV6 and model prefill speed on this machine, each against what it replaces.

1. CPU fwd+bwd of the chunked WKV6 against the step-by-step reference (B=1, H=4, N=64, T=1024).
2. Prefill (prompt in, last logits and state out) of our model against the `rwkv` runtime's
   CPU forward, same weights, same tokens, fp32.
3. On a machine with CUDA: the CUDA kernel's fwd+bwd at B=8, H=32, N=64, T=4096 against the
   CPU path, and against flash-linear-attention's chunk_rwkv6 where that is installed.

Run: python bench/wkv6.py  (prints each figure, then the ratios on its last lines)
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.checkpoint import save_checkpoint  # noqa: E402
from src.config import RWKV6Config  # noqa: E402
from src.model import RWKV6  # noqa: E402
from src.ops import wkv6  # noqa: E402
from src.ops.wkv6_reference import wkv6_reference  # noqa: E402
from tests.tiny import random_state_dict  # noqa: E402  (x060 init with no zeroed layers)


def best_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def wkv_inputs(B, T, H, N, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.empty(B, T, H, N).uniform_(-6, 1, generator=g)
    u = torch.randn(H, N, generator=g)
    return [x.to(device, dtype).requires_grad_() for x in (r, k, v, w, u)]


def fwd_bwd(fn, inputs):
    def run():
        y, s = fn(*inputs)
        (y.float().sum() + s.sum()).backward()
    return run


def bench_wkv_cpu(repeats):
    inputs = wkv_inputs(1, 1024, 4, 64)
    fast = best_time(fwd_bwd(lambda *a: wkv6(*a, op="cpu"), inputs), repeats)
    slow = best_time(fwd_bwd(wkv6_reference, inputs), max(1, repeats // 3), warmup=0)
    print(f"WKV6 fwd+bwd B=1 H=4 N=64 T=1024: chunked cpu {fast * 1e3:.1f} ms, "
          f"step-by-step reference {slow * 1e3:.1f} ms")
    return slow / fast


def bench_prefill(n_layer, n_embd, vocab, T, repeats):
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    cfg = RWKV6Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, dim_att=n_embd,
                      dim_ffn=int(n_embd * 3.5) // 32 * 32, head_size=64)
    tokens = torch.randint(1, vocab, (T,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.pth")
        save_checkpoint(random_state_dict(cfg), path, "fp32")
        ours = RWKV6.from_checkpoint(path, op="cpu").eval()
        theirs = RWKV(path, strategy="cpu fp32", verbose=False)
    with torch.no_grad():
        t_ours = best_time(lambda: ours(tokens[None], full_output=False), repeats)
        t_theirs = best_time(lambda: theirs.forward(tokens.tolist(), None), repeats)
        ours_logits = ours(tokens[None], full_output=False)[0][0, -1]
        theirs_logits = theirs.forward(tokens.tolist(), None)[0]
    print(f"Prefill L={n_layer} C={n_embd} V={vocab} T={T} fp32: ours {T / t_ours:.0f} tok/s, "
          f"rwkv runtime {T / t_theirs:.0f} tok/s (max logit difference {(ours_logits - theirs_logits).abs().max():.1e})")
    return t_theirs / t_ours


def bench_cuda(repeats):
    inputs = wkv_inputs(8, 4096, 32, 64, device="cuda", dtype=torch.bfloat16)
    t_cuda = best_time(fwd_bwd(lambda *a: wkv6(*a, op="cuda"), inputs), repeats)
    cpu_inputs = [x.detach().float().cpu().requires_grad_() for x in inputs]
    t_cpu = best_time(fwd_bwd(lambda *a: wkv6(*a, op="cpu"), cpu_inputs), 1, warmup=0)
    print(f"WKV6 fwd+bwd B=8 H=32 N=64 T=4096 bf16: cuda {t_cuda * 1e3:.2f} ms, cpu path {t_cpu * 1e3:.0f} ms")
    ratios = [("cuda vs cpu path", t_cpu / t_cuda)]
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError:
        print("flash-linear-attention is not installed: no chunk_rwkv6 comparison")
        return ratios
    r, k, v, w, u = inputs
    # fla takes the log decay (-exp(w)) and, by default, scales r by N^-0.5: undo that.
    fla = lambda r, k, v, w, u: chunk_rwkv6(r, k, v, -torch.exp(w.float()).to(r.dtype), u, scale=1.0, output_final_state=True)  # noqa: E731
    t_fla = best_time(fwd_bwd(fla, inputs), repeats)
    print(f"flash-linear-attention chunk_rwkv6: {t_fla * 1e3:.2f} ms")
    return ratios + [("cuda vs chunk_rwkv6", t_fla / t_cuda)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill_layers", type=int, default=12)
    parser.add_argument("--prefill_embd", type=int, default=512)
    parser.add_argument("--prefill_vocab", type=int, default=65536)
    parser.add_argument("--prefill_tokens", type=int, default=1024)
    args = parser.parse_args()
    ratios = [("cpu wkv6 vs reference", bench_wkv_cpu(args.repeats)),
              ("prefill vs rwkv runtime", bench_prefill(args.prefill_layers, args.prefill_embd, args.prefill_vocab,
                                                        args.prefill_tokens, max(1, args.repeats // 2)))]
    if torch.cuda.is_available():
        ratios += bench_cuda(args.repeats)
    goals = {"cpu wkv6 vs reference": 30, "prefill vs rwkv runtime": 3, "cuda vs chunk_rwkv6": 1}
    for name, ratio in ratios:
        goal = f" (goal >= {goals[name]}x)" if name in goals else ""
        print(f"{name}: {ratio:.1f}x{goal}")


if __name__ == "__main__":
    main()
