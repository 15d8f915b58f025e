"""Training and generation speed on this machine: RWKV-6 and RWKV-7, training against the machine's
own matmul rate, generation against the `rwkv` package.

One process builds a random model of each family (default 6 layers x 512 wide, World vocabulary,
fp32 on the CPU) with Bone r=64 adapters, the frozen base as train.py holds it, and times a training
step of each (forward and backward, the fused head + loss, one sample of --ctx tokens), the two
families alternately, keeping each one's best of --repeat: both see whatever else the machine runs.

The bound: a frozen-base step multiplies by every weight matrix once forward and once backward (to
the activations), 2 FLOPs a multiply-add: about 4 FLOPs per weight per token (the adapters, the WKV
operator and everything elementwise come on top). The matmul rate is measured at the model's own
shapes (each weight's [ctx, in] x [in, out] product, best of --repeat), so "of the matmul rate" is
4 x weights x tokens/s over that rate: the share of the step's time the base's products would take.

Generation: each family's random model of the same shape saved as one fp32 file, run by generate.py's
path (load_model, model_step, generate; greedy) and by the `rwkv` package's forward loop (cpu fp32,
in its own process, as RWKV-7 needs), both timed alike (src/generation.py's generation_times, best
of --repeat): prefill reads a --gen_prompt-token prompt in one call; per token is the time of
--gen_tokens + 1 new tokens after a 6-token prompt less that of 1.

    python bench/speed.py [--ctx 1024] [--layers 6 --width 512] [--repeat 5] [--threads N]
    python bench/speed.py --tiny      (a smoke run of a few seconds, for CI: its figures mean nothing)

The ratios are the last lines.
"""
import argparse
import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.bone import BoneConfig, apply_adapters  # noqa: E402
from src.checkpoint import fresh_state_dict, new_config, save_checkpoint  # noqa: E402
from src.family import from_state_dict  # noqa: E402
from src.generation import best_time, generation_times, load_model, model_step  # noqa: E402
from src.rwkv_package import time_rwkv_package  # noqa: E402
from src.training.loss import lm_loss  # noqa: E402

FAMILIES = {"x060": "RWKV-6", "x070": "RWKV-7"}


def build(family, args):
    cfg = new_config(family, args.vocab, args.width, args.layers, head_size=args.head_size)
    model = from_state_dict(fresh_state_dict(cfg)).train()
    apply_adapters(model, BoneConfig(r=args.r), verbose=False)
    return model


def matmul_shapes(model):
    """{(in, out): count}: the products by the base's weights a step makes, per token row. Every
    weight matrix but the embedding (a lookup) and the vectors ([1, 1, C]; [H, N]: r_k, time_faaaa);
    RWKV-7's layer-0 v1, v2 are in the file but unused: counted (0.1% of the weights here)."""
    cfg, shapes = model.config, collections.Counter()
    for name, p in model.named_parameters():
        if (p.requires_grad or p.dim() < 2 or min(p.shape[-2:]) == 1 or name == "emb.weight"
                or tuple(p.shape) == (cfg.n_head, cfg.head_size)):
            continue
        # nn.Linear holds [out, in]; the low-rank matrices (w1, time_maa_w2 [5, r, C], ...) [in, out].
        linear = name.endswith(".weight")
        shapes[tuple(p.shape[-1:-3:-1] if linear else p.shape[-2:])] += p.numel() // p.shape[-1] // p.shape[-2]
    return shapes


def matmul_rate(shapes, rows, repeat):
    """FLOP/s of fp32 [rows, in] x [in, out] products at these shapes, weighted as the step weights them."""
    flops = seconds = 0.0
    for (n_in, n_out), count in shapes.items():
        x, w = torch.randn(rows, n_in), torch.randn(n_in, n_out)
        seconds += count * best_time(lambda: x @ w, repeat)
        flops += count * 2 * rows * n_in * n_out
    return flops / seconds


def training_speeds(models, ctx, vocab, repeat):
    """{family: best seconds of one step}, the families' steps interleaved."""
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(1, vocab, (1, ctx), generator=g) for _ in range(2))

    def step(model):
        lm_loss(model, idx, targets).backward()
        model.zero_grad(set_to_none=True)
    times = collections.defaultdict(list)
    for model in models.values():
        step(model)          # warm-up
    for _ in range(repeat):
        for family, model in models.items():
            start = time.perf_counter()
            step(model)
            times[family].append(time.perf_counter() - start)
    return {family: min(t) for family, t in times.items()}


def generation_speeds(args):
    """{family: {"ours": (prefill, per token), "package": (prefill, per token)}} in tokens/s, both
    on the same random fp32 file of the bench's shape."""
    prompt = torch.randint(1, args.vocab, (args.gen_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    timing = (prompt, prompt[:6], args.gen_tokens, args.repeat)
    speeds = {}
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        for family in FAMILIES:
            path = os.path.join(tmp, f"{family}.pth")
            save_checkpoint(fresh_state_dict(new_config(family, args.vocab, args.width, args.layers,
                                                        head_size=args.head_size)), path, "fp32")
            seconds = {"ours": generation_times(model_step(load_model(path)), *timing),
                       "package": time_rwkv_package(path, family, *timing, torch.get_num_threads())}
            speeds[family] = {who: (len(prompt) / prefill, 1 / per_token) for who, (prefill, per_token) in seconds.items()}
    return speeds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=1024, help="tokens in the one training sample")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--r", type=int, default=64, help="Bone's block size")
    p.add_argument("--repeat", type=int, default=5, help="timed steps (and generation runs) per family (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--gen_prompt", type=int, default=512, help="tokens of the prompt read in one call (prefill)")
    p.add_argument("--gen_tokens", type=int, default=64, help="new tokens timed one by one")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers x 128, vocabulary 1024, 64 tokens, one step, a 16-token prompt, 8 new tokens: a smoke run")
    args = p.parse_args()
    if args.tiny:
        args.ctx, args.layers, args.width, args.vocab, args.r, args.repeat = 64, 2, 128, 1024, 16, 1
        args.gen_prompt, args.gen_tokens = 16, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {family: build(family, args) for family in FAMILIES}
    seconds = training_speeds(models, args.ctx, args.vocab, args.repeat)
    print(f"{args.layers} layers x {args.width}, vocabulary {args.vocab}, Bone r={args.r}, one sample of {args.ctx} tokens, "
          f"fp32, {torch.get_num_threads()} threads; best of {args.repeat} steps, the families interleaved:")
    tokens_per_s, of_rate = {}, {}
    for family, model in models.items():
        shapes = matmul_shapes(model)
        weights = sum(n_in * n_out * count for (n_in, n_out), count in shapes.items())
        rate = matmul_rate(shapes, args.ctx, args.repeat)
        tokens_per_s[family] = args.ctx / seconds[family]
        of_rate[family] = 4 * weights * tokens_per_s[family] / rate
        print(f"{FAMILIES[family]}: {tokens_per_s[family]:8.1f} tokens/s; {weights / 1e6:.1f}M weights, "
              f"{4 * weights * tokens_per_s[family] / 1e9:.1f} GFLOP/s of base products against the machine's "
              f"{rate / 1e9:.1f} GFLOP/s at these shapes", flush=True)
    del models
    generation = generation_speeds(args)
    print(f"\ngeneration, the same fp32 file for both, best of {args.repeat}: prefill reads a {args.gen_prompt}-token "
          f"prompt in one call; per token is {args.gen_tokens} new tokens after a 6-token prompt:")
    for family, speeds in generation.items():
        (prefill, token), (package_prefill, package_token) = speeds["ours"], speeds["package"]
        print(f"{FAMILIES[family]}: prefill {prefill:8.1f} tokens/s, per token {token:6.1f} tokens/s; the rwkv package: "
              f"prefill {package_prefill:8.1f} tokens/s, per token {package_token:6.1f} tokens/s", flush=True)
    print("\nthe ratios:")
    for family in FAMILIES:
        print(f"{FAMILIES[family]} training at {of_rate[family]:.2f}x of the matmul rate (goal >= 0.8x for RWKV-6)")
    print(f"RWKV-7 / RWKV-6 training tokens/s: {tokens_per_s['x070'] / tokens_per_s['x060']:.2f}x (goal >= 0.9x)")
    for family, speeds in generation.items():
        (prefill, token), (package_prefill, package_token) = speeds["ours"], speeds["package"]
        print(f"{FAMILIES[family]} generation per token: {token / package_token:.2f}x of the rwkv package (goal >= 1.0x)")
        print(f"{FAMILIES[family]} prefill faster than token-by-token: {prefill / token:.1f}x "
              f"({prefill / package_prefill:.1f}x the rwkv package's prefill)")


if __name__ == "__main__":
    main()
