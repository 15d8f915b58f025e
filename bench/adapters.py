"""Adapter layers on RWKV-6 1.6B's layer shapes: fwd+bwd time and peak memory of the frozen base
alone, our Bone and Bat (r=64), our LoRA at the same trainable-parameter count as Bone, and, where
PEFT imports, PEFT's Bone/MiSS (bone and bat) and LoRA layers on the same shapes. Ratios last.

Every row runs y = layer(x); y.backward(gy) with x [tokens, in] requiring grad (as inside a
network), the base weight frozen. Time: the fastest of --repeats runs (more for the smaller shape),
rows taken in turn, after one warm-up.
Memory: the peak of tensor memory allocated during one fwd+bwd (outputs, saved tensors,
gradients, temporaries), not counting x, gy and the weights that exist before it; on a GPU,
torch.cuda.max_memory_allocated; on the CPU, every tensor an aten op returns is tracked
(a temporary that a kernel allocates internally, without going through an aten op, is not seen).
"""
import argparse
import inspect
import os
import statistics
import sys
import time
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.bone import BatLinear, BoneLinear, LoraLinear  # noqa: E402

SHAPES = (("ffn.key", 2048, 7168), ("att.key", 2048, 2048))   # RWKV-6 1.6B: n_embd 2048, dim_ffn 7168


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time
    (CPU or any device). Outputs that alias an input (views) are not counted again."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ptrs = set()

    def _free(self, ptr, nbytes):
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr and ptr not in self._ptrs and ptr not in inputs:
                    self._ptrs.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def peft_factories(r, r_lora):
    """(label, factory(base) -> layer) for PEFT's layers, or a reason why there are none.
    PEFT before 0.19 ships Bone (peft.tuners.bone); later releases call it MiSS
    (peft.tuners.miss) and want a config object in the layer's constructor."""
    try:
        import peft
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLora
        try:
            from peft import BoneConfig as PeftConfig
            from peft.tuners.bone.layer import BoneLinear as PeftLayer
            name = "Bone"
        except ImportError:
            from peft import MissConfig as PeftConfig
            from peft.tuners.miss.layer import MissLinear as PeftLayer
            name = "MiSS"
    except Exception as e:  # not installed, or a dependency missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [], f"PEFT not importable ({type(e).__name__}: {reason})"

    def build(layer_cls, config_cls, base, **kw):
        if "config" in inspect.signature(layer_cls.__init__).parameters:
            config = config_cls(**kw)
            return layer_cls(base, "default", config=config, **{k: v for k, v in kw.items() if k in ("r", "lora_alpha")})
        return layer_cls(base, "default", **kw)

    v = peft.__version__
    return [
        (f"PEFT {v} {name} r={r}", lambda base: build(PeftLayer, PeftConfig, base, r=r, init_weights=True)),
        (f"PEFT {v} {name}-bat r={r}", lambda base: build(PeftLayer, PeftConfig, base, r=r, init_weights="bat")),
        (f"PEFT {v} LoRA r={r_lora}", lambda base: build(PeftLora, LoraConfig, base, r=r_lora, lora_alpha=r_lora)),
    ], None


def fwd_bwd(layer, x, gy, params):
    layer(x).backward(gy)
    x.grad = None
    for p in params:
        p.grad = None


def timed(layer, x, gy, device):
    params = [p for p in layer.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fwd_bwd(layer, x, gy, params)
    sync()
    return time.perf_counter() - start


def peak_memory(layer, x, gy, device):
    params = [p for p in layer.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd(layer, x, gy, params)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakMemory() as tracker:
        fwd_bwd(layer, x, gy, params)
    return tracker.peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's rows")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {dtype}, {args.tokens} tokens, "
          f"time = fastest of N fwd+bwd (rows taken in turn) after a warm-up, memory = peak allocated during one fwd+bwd")
    results = {}
    for label, in_f, out_f in SHAPES:
        r_lora = max(1, round(args.r * out_f / (in_f + out_f)))   # LoRA r with Bone's parameter count
        rows = [("frozen base", lambda base: base),
                (f"ours Bone r={args.r}", lambda base: BoneLinear(base, args.r)),
                (f"ours Bat r={args.r}", lambda base: BatLinear(base, args.r)),
                (f"ours LoRA r={r_lora}", lambda base: LoraLinear(base, r_lora))]
        peft_rows, why = ([], "skipped (--no-peft)") if args.no_peft else peft_factories(args.r, r_lora)
        rows += peft_rows
        base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(args.tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(args.tokens, out_f, device=device, dtype=dtype)
        print(f"\n{label}: {in_f} -> {out_f}, fastest of {max(args.repeats, round(args.repeats * SHAPES[0][2] / out_f))}")
        print(f"  {'layer':<30} {'trainable':>10} {'fwd+bwd ms':>11} {'median ms':>10} {'peak MiB':>9}")
        layers = []
        for name, make in rows:
            layer = make(base).to(device)
            for q in layer.parameters():
                if q is not base.weight and q.is_floating_point():
                    q.data = q.data.to(dtype)      # adapters in the compute dtype, as PEFT's would be
            layers.append((name, layer))
            timed(layer, x, gy, device)            # warm-up
        times = {name: [] for name, _ in layers}
        repeats = max(args.repeats, round(args.repeats * SHAPES[0][2] / out_f))   # as many seconds for each shape
        for _ in range(repeats):                   # round robin: a busy moment hits every row alike
            for name, layer in layers:
                times[name].append(timed(layer, x, gy, device))
        for name, layer in layers:
            n = sum(q.numel() for q in layer.parameters() if q.requires_grad)
            best, median = min(times[name]), statistics.median(times[name])
            peak = peak_memory(layer, x, gy, device)
            results[(label, name.split(" r=")[0])] = (best, peak)
            print(f"  {name:<30} {n:>10,} {best * 1e3:>11.1f} {median * 1e3:>10.1f} {peak / 2**20:>9.1f}")
        del layers
        if why:
            print(f"  PEFT rows: {why}")
    print()
    for label, _, _ in SHAPES:
        t = lambda name: results.get((label, name), (float("nan"), 0))  # noqa: E731
        (frozen, m_frozen), (bone, m_bone), (bat, m_bat), (lora, m_lora) = \
            t("frozen base"), t("ours Bone"), t("ours Bat"), t("ours LoRA")
        mem = lambda a, b: f"{a / b:.2f}x" if b else "n/a"  # noqa: E731
        print(f"{label}: bone/frozen = {bone / frozen:.3f}x time (goal <= 1.05x), {mem(m_bone, m_frozen)} memory")
        overhead = f"{(lora - frozen) / (bone - frozen):.2f}x" if bone > frozen and lora > frozen else "n/a (within noise)"
        print(f"{label}: lora/bone = {lora / bone:.3f}x time (goal >= 1.3x), {mem(m_lora, m_bone)} memory; "
              f"time above the frozen base, lora/bone = {overhead}")
        peft = {k[1]: v for k, v in results.items() if k[0] == label and k[1].startswith("PEFT")}
        for name, (value, m_value) in peft.items():
            (ours, m_ours), what = ((bat, m_bat), "bat") if name.endswith("-bat") else \
                ((lora, m_lora), "LoRA") if name.endswith("LoRA") else ((bone, m_bone), "bone")
            print(f"{label}: PEFT {what} / ours = {value / ours:.3f}x time (goal >= 1.2x), {mem(m_value, m_ours)} memory")
        if not peft:
            print(f"{label}: PEFT / ours: no PEFT rows")


if __name__ == "__main__":
    main()
