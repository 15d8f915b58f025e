"""bench/gpu.py's parts that need no GPU: the one line without one, equal-parameter LoRA, the table."""
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu  # noqa: E402

from src.bone import BoneConfig, adapter_layers, apply_adapters  # noqa: E402
from src.model import RWKV6  # noqa: E402
from tests.tiny import SHAPES, random_state_dict  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, "bench/gpu.py", "--json", str(tmp_path / "g.json")], cwd=gpu.ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().count("\n") == 0 and "no CUDA GPU here" in p.stdout, p
    assert not (tmp_path / "g.json").exists()


def test_lora_gets_as_many_parameters_as_bone():
    counts, layers = {}, None
    for mode, r in (("bone", 32), ("lora", None)):
        model = RWKV6.from_state_dict(random_state_dict(SHAPES["deep"], seed=0), op="cpu")
        if r is None:
            r = gpu.equal_lora_r(layers, counts["bone"])
        apply_adapters(model, BoneConfig(r=r, mode=mode), verbose=False)
        layers = [(m.in_features, m.out_features) for m in adapter_layers(model).values()]
        counts[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(counts["lora"] - counts["bone"]) <= sum(i + o for i, o in layers) / 2, counts


def test_the_table():
    lines = gpu.format_table([
        {"what": "a", "ms": 12.345, "tokens_per_s": 1234567.0, "peak_gib": 7.4,
         "errors": dict(y=1e-3, gr=2e-3, gk=3e-3, gv=4e-3, gw=5e-2, gu=6e-3)},
        {"what": "b", "note": "flash-linear-attention not installed"}])
    assert lines[2] == "| a | 12.3 | 1,234,567 | 7.40 | 1.0e-03, 2.0e-03, 3.0e-03, 4.0e-03, 5.0e-02, 6.0e-03 |"
    assert lines[3] == "| b |  |  |  | flash-linear-attention not installed |"
