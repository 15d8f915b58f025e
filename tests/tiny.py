"""Tiny RWKV-6 and RWKV-7 models for tests: initialised as the official code does, then perturbed
so that no weight is trivial (the init schemes zero att.output, ffn.value and more, which would
hide errors)."""
import os

import torch

from src.checkpoint import fresh_state_dict, save_checkpoint
from src.config import RWKV6Config, RWKV7Config

# Two shapes: the second has n_layer >= 3, a non-default dim_ffn and dims not a multiple of 64.
SHAPES = {
    "small": RWKV6Config(vocab_size=260, n_embd=64, n_layer=2, dim_att=64, dim_ffn=224, head_size=32),
    "deep": RWKV6Config(vocab_size=300, n_embd=96, n_layer=3, dim_att=96, dim_ffn=200, head_size=32),
}
# The World vocabulary, for what writes text (generate.py); not among the SHAPES every model test runs.
WORLD = RWKV6Config(vocab_size=65536, n_embd=64, n_layer=2, dim_att=64, dim_ffn=224, head_size=32)
# RWKV-7: two heads and a ffn width that is not 4 x n_embd; one head, three layers, 4 x n_embd.
SHAPES7 = {
    "small7": RWKV7Config(vocab_size=260, n_embd=64, n_layer=2, dim_ffn=192, head_size=32,
                          w_lora=32, a_lora=32, v_lora=16, g_lora=48),
    "deep7": RWKV7Config(vocab_size=300, n_embd=32, n_layer=3, dim_ffn=128, head_size=32,
                         w_lora=16, a_lora=16, v_lora=16, g_lora=32),
}
WORLD7 = RWKV7Config(vocab_size=65536, n_embd=64, n_layer=2, dim_ffn=256, head_size=32,
                     w_lora=32, a_lora=32, v_lora=16, g_lora=64)
ALL = {**SHAPES, **SHAPES7, "world": WORLD, "world7": WORLD7}


def random_state_dict(cfg, seed=0, noise=0.2):
    """The family's init plus noise of `noise` times each tensor's typical size (1/sqrt(fan-in) where zero)."""
    g = torch.Generator().manual_seed(seed + 1000)
    sd = fresh_state_dict(cfg, seed)
    for key, t in sd.items():
        scale = t.pow(2).mean().sqrt().item() if t.numel() > 1 else 0.0
        if scale == 0.0:
            scale = t.shape[-1] ** -0.5 if t.dim() > 1 else 1.0
        sd[key] = t + noise * scale * torch.randn(t.shape, generator=g)
    return sd


def save_random_checkpoint(directory, name="small", seed=0, dtype="fp32"):
    """Write a random tiny checkpoint in the official layout; returns (path, config, state dict)."""
    cfg = ALL[name]
    sd = random_state_dict(cfg, seed)
    path = os.path.join(directory, f"{name}-{seed}.pth")
    save_checkpoint(sd, path, dtype)
    return path, cfg, sd


def randomize(model, seed=0, scale=0.05):
    """Give every adapter tensor random values (a trained adapter, not the zero start)."""
    from src.bone import adapter_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_tensors().values():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def package_logits(path, ids):
    """The `rwkv` package's logits at every position of ids for the file at path, either family
    (RWKV-6 in this process, RWKV-7 in a child process set for it: src/rwkv_package.py)."""
    from src.checkpoint import load_checkpoint
    from src.rwkv_package import run_rwkv_package
    family = load_checkpoint(path)[1].family
    if family == "x060":
        import torch
        with torch.no_grad():
            return rwkv_runtime(str(path)).forward(list(ids), None, full_output=True)[0]
    return run_rwkv_package(path, family, list(ids))["logits"]


def rwkv_runtime(path):
    """The official `rwkv` package's model on CPU in fp32 (env read at its import: set it first)."""
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV
    return RWKV(path, strategy="cpu fp32", verbose=False)
