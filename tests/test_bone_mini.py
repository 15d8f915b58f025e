"""--bone_mode mini (HF PEFT's MiSS "mini") and bone against HF PEFT's own MissLinear, the
independent reference: forward, gradients and merge in fp64; then mini through the rest of the
project (apply, save, load, merge, train.py's flag) and its one-sentence refusals."""
import pytest
import torch
import torch.nn as nn

from src.bone import (AdapterError, BoneConfig, BoneLinear, adapter_layers, apply_adapters, load_adapter,
                      merge_and_unload, merge_weight, plan_merge, read_adapter, save_adapter)
from src.bone.functional import lora_factors, merged_exact
from src.bone.layers import MiniLinear
from tests.runtimes import require
from tests.test_bone import logits, make_model, tokens
from tests.tiny import SHAPES, randomize

peft = require("peft", "pip install -r requirements-test.txt (README, Set up)")
from peft.tuners.miss import MissConfig, MissLinear  # noqa: E402



def pair(in_f, out_f, r, mini_r=None, seed=0):
    """(ours, PEFT's) on the same fp64 weight, holding the same random adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5)
    theirs_base = nn.Linear(in_f, out_f, bias=False).double()
    with torch.no_grad():
        theirs_base.weight.copy_(base.weight)
    config = MissConfig(r=r, init_weights="mini" if mini_r else True, mini_r=mini_r or 1)
    theirs = MissLinear(theirs_base, "default", config, r=r).double()
    ours = MiniLinear(base, r, name="m", mini_r=mini_r) if mini_r else BoneLinear(base, r, name="m")
    assert ours.bone.shape == theirs.miss_block["default"].shape
    assert not ours.bone.any() and not theirs.miss_block["default"].any()     # both start at zero
    with torch.no_grad():
        ours.bone.copy_(torch.randn(ours.bone.shape, generator=g, dtype=torch.float64))
        theirs.miss_block["default"].copy_(ours.bone)
    return ours, theirs


# (in, out, r, mini_r): mini on divisible widths and with in % r != 0; bone with both.
MINI = [(64, 96, 16, 8), (64, 96, 16, 96), (48, 32, 16, 1), (100, 72, 16, 24)]
BONE = [(64, 96, 16), (100, 72, 16), (10, 24, 16)]


@pytest.mark.parametrize("in_f,out_f,r,mini_r", MINI + [(i, o, r, None) for i, o, r in BONE])
@pytest.mark.numerical
def test_forward_gradients_and_merge_equal_peft_miss(in_f, out_f, r, mini_r):
    """PEFT pads x and adds the tail's first in % r rows, as Bone does: equal on non-divisible
    inputs too (r > in is refused by PEFT, so not compared)."""
    if r > in_f:
        pytest.skip("PEFT refuses r > in_features")
    ours, theirs = pair(in_f, out_f, r, mini_r)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = ours(x), theirs(x2)
    # float64, the same sums grouped differently (PEFT pads and reshapes): at most ~in_f eps = 2e-14 of
    # the largest value for in_f <= 100; 1e-12 leaves 50x and catches any wrong term (order 1e-1).
    assert (y - y2).abs().max() <= 1e-12 * y2.abs().max()
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy)
    y2.backward(gy)
    assert (x.grad - x2.grad).abs().max() <= 1e-12 * x2.grad.abs().max()
    g_ours, g_theirs = ours.bone.grad, theirs.miss_block["default"].grad
    assert (g_ours - g_theirs).abs().max() <= 1e-12 * g_theirs.abs().max()
    theirs.merge()
    merged = theirs.get_base_layer().weight
    mine = merge_weight(ours.weight, ours.bone, ours.mode)
    # Both add the tiled block to W elementwise: one rounding each, the same one (or eps/2 apart).
    assert torch.equal(mine, merged) or (mine - merged).abs().max() <= 1e-15 * merged.abs().max()


@pytest.mark.parametrize("in_f,out_f,r,mini_r", MINI)
@pytest.mark.numerical
def test_mini_update_is_b_tiled_both_ways_and_an_exact_lora(in_f, out_f, r, mini_r):
    g = torch.Generator().manual_seed(1)
    mini = torch.randn(r, mini_r, generator=g, dtype=torch.float64)
    dw = merged_exact(torch.zeros(out_f, in_f, dtype=torch.float64), mini, "mini")
    o, i = torch.meshgrid(torch.arange(out_f), torch.arange(in_f), indexing="ij")
    assert torch.equal(dw, mini[i % r, o % mini_r])
    a, b = lora_factors(mini, "mini", out_f, in_f)
    assert a.shape == (r, in_f) and b.shape == (out_f, r) and torch.equal(b @ a, dw)


@pytest.mark.numerical
def test_mini_in_the_model_saves_loads_and_merges(tmp_path):
    cfg = SHAPES["small"]
    model = make_model("small", dtype=torch.float64)
    apply_adapters(model, BoneConfig(r=16, mode="mini", mini_r=32), verbose=False)
    assert all(layer.bone.shape == (16, 32) for layer in adapter_layers(model).values())
    randomize(model, 0, scale=0.1)
    idx = tokens()
    out = logits(model, idx)
    path = tmp_path / "mini.pth"
    save_adapter(model, path)
    assert read_adapter(str(path))[1]["mini_r"] == 32
    loaded = load_adapter(make_model("small", dtype=torch.float64), str(path))
    assert torch.equal(logits(loaded, idx), out)
    mode, plan = plan_merge(cfg.shapes(), cfg.fingerprint(), str(path))
    assert mode == "mini" and all(v[1].shape == (16, 32) for v in plan.values())
    merged = merge_and_unload(loaded)
    # float64 through the whole tiny model: rounding of order 1e-14 relative; a lost update is 1e-2.
    assert (logits(merged, idx) - out).abs().max() <= 1e-10 * out.abs().max()


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "mini"}, r"mode mini needs mini_r"),
    ({"mode": "bone", "mini_r": 4}, r"mini_r is for mode mini only"),
    ({"mode": "mini", "mini_r": 48}, r"mini mode needs mini_r dividing the output size, but blocks\.0\.att\.receptance "
                                     r"has 64 outputs and mini_r = 48"),
])
def test_mini_refusals_are_one_sentence(kwargs, message):
    import re
    with pytest.raises(AdapterError) as e:
        apply_adapters(make_model("small"), BoneConfig(r=16, **kwargs), verbose=False)
    assert re.search(message, str(e.value)) and str(e.value).count(". ") == 0, str(e.value)


def test_train_py_bone_mini_r_reaches_the_config():
    import train
    from src import bone
    args = train.parse_args(["--load_model", "x.pth", "--data_file", "d", "--bone_mode", "mini", "--bone_r", "16",
                             "--bone_mini_r", "32"])
    model = make_model("small")
    train.apply_peft(model, args, bone)
    assert {type(m).__name__ for m in adapter_layers(model).values()} == {"MiniLinear"}
    assert all(m.mini_r == 32 for m in adapter_layers(model).values())


def test_train_py_trains_a_mini_adapter_that_merges_and_exports(tmp_path_factory, tmp_path):
    """train.py --bone_mode mini: the loss falls, the adapter holds [r, mini_r] tensors, merge.py merges
    it and export.py writes it as a LoRA of rank r."""
    from tests.test_train import latest_adapter, losses, make_setup, train
    from tests.test_export import run_export
    from tests.test_merge import run_merge
    setup = make_setup(tmp_path_factory, "small")
    train(setup, tmp_path, "--bone_mode", "mini", "--bone_mini_r", "32")
    loss = losses(tmp_path)
    assert sum(loss[s] for s in range(13, 17)) < sum(loss[s] for s in range(1, 5)) - 0.4, loss
    adapter = latest_adapter(tmp_path)
    sd, meta, _ = read_adapter(str(adapter))
    assert meta["mode"] == "mini" and meta["mini_r"] == 32 and all(v.shape == (16, 32) for v in sd.values())
    assert run_merge("--base_model", setup[1], "--adapter", adapter, "--output", tmp_path / "m.pth", "--quiet") is None
    assert run_export("--adapter", adapter, "--model", setup[1], "--format", "gguf", "--output", tmp_path / "a.gguf",
                      "--quiet") is None
