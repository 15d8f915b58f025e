"""Make a small RWKV-6 checkpoint, run it in our model and in the official `rwkv` runtime,
and print how closely they agree and how fast each reads a prompt."""
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
from tests.tiny import random_state_dict  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    cfg = RWKV6Config(vocab_size=args.vocab_size, n_embd=args.n_embd, n_layer=args.n_layer, dim_att=args.n_embd,
                      dim_ffn=int(args.n_embd * 3.5) // 32 * 32, head_size=64)
    tokens = torch.randint(1, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "demo.pth")
        print(f"Writing a random RWKV-6 checkpoint: {cfg}")
        save_checkpoint(random_state_dict(cfg), path, "fp32")
        ours = RWKV6.from_checkpoint(path, op="cpu").eval()
        theirs = RWKV(path, strategy="cpu fp32", verbose=False)
    with torch.no_grad():
        start = time.perf_counter()
        ours_logits, _ = ours(tokens[None])
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs_logits, _ = theirs.forward(tokens.tolist(), None, full_output=True)
        t_theirs = time.perf_counter() - start
    diff = (ours_logits[0] - theirs_logits).abs().max().item()
    print(f"max |logit difference| over {args.tokens} tokens: {diff:.2e} (logits span {theirs_logits.abs().max():.2f})")
    print(f"prompt reading: ours {args.tokens / t_ours:.0f} tok/s, rwkv runtime {args.tokens / t_theirs:.0f} tok/s")
    if diff > 1e-4:
        sys.exit("Our model and the rwkv runtime disagree: please report this.")


if __name__ == "__main__":
    main()
