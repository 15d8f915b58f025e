"""Bone adapters: layer math against the merged weight, gradients against finite differences,
module selection, train parts, zero init, merging, adapter files and their refusals."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.adapters import PeakMemory
from src.bone import (DEFAULT_TARGETS, META_KEY, AdapterError, BatLinear, BoneConfig, BoneLinear, LoraLinear,
                      adapter_layers, apply_adapters, bat_linear, bone_linear, load_adapter, lora_linear,
                      merge_and_unload, merge_weight, plan_merge, save_adapter, train_part_of, unload)
from src.checkpoint import atomic_save, load_state_dict
from src.config import RWKV6Config
import src.model
from src.model import RWKV6
from src.ops.wkv6_reference import wkv6_reference
from tests.tiny import SHAPES, random_state_dict, randomize

LAYER = {"bone": BoneLinear, "bat": BatLinear, "lora": LoraLinear}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_model(name="small", seed=1, dtype=torch.float64):
    return RWKV6.from_state_dict(random_state_dict(SHAPES[name], seed=seed), op="cpu").to(dtype)


def tokens(name="small", seed=0, T=12):
    return torch.randint(0, SHAPES[name].vocab_size, (2, T), generator=gen(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def layer_with_random_adapter(mode, in_f, out_f, r, seed=0):
    g = gen(seed)
    base = nn.Linear(in_f, out_f, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5)
    layer = LAYER[mode](base, r, name="blocks.0.att.key")
    with torch.no_grad():
        for p in layer.adapter_tensors().values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def adapter_of(layer):
    t = layer.adapter_tensors()
    return (t["lora_A"], t["lora_B"]) if layer.mode == "lora" else t["bone"]


# --------------------------------------------------------------------------------------------
# Layer math

# (in, out, r): divisible, in not divisible by r, in < r, out not divisible
CASES = {"bone": [(64, 96, 16), (100, 72, 16), (10, 24, 16), (48, 50, 16)],
         "bat": [(64, 96, 16), (32, 32, 32), (24, 8, 8)],
         "lora": [(64, 96, 16), (100, 72, 5)]}


@pytest.mark.parametrize("mode,shape", [(m, s) for m, cases in CASES.items() for s in cases])
@pytest.mark.numerical
def test_forward_equals_forward_with_merged_weight(mode, shape):
    in_f, out_f, r = shape
    layer = layer_with_random_adapter(mode, in_f, out_f, r)
    x = torch.randn(3, 7, in_f, generator=gen(1), dtype=torch.float64)
    scaling = getattr(layer, "scaling", 1.0)
    merged = merge_weight(layer.weight, adapter_of(layer), mode, scaling)
    expected = F.linear(x, merged)
    # float64, sums of at most 100 products of order 1: reordered they differ by ~100 eps = 2e-14.
    assert (layer(x) - expected).abs().max() <= 1e-10
    assert (layer(x) - F.linear(x, layer.weight)).abs().max() > 1e-3   # the adapter does something


@pytest.mark.numerical
def test_bone_weight_update_is_bone_tiled_along_the_input_axis():
    """dW[o, i] = bone[i mod r, o], written out element by element (REFERENCE.md 5)."""
    layer = layer_with_random_adapter("bone", 11, 5, 4)
    dW = merge_weight(layer.weight, layer.bone, "bone") - layer.weight
    expected = torch.tensor([[layer.bone[i % 4, o].item() for i in range(11)] for o in range(5)], dtype=torch.float64)
    # (W + dW) - W rounds once, by at most eps/2 |W + dW| = 1.1e-16 x (|W + dW| about 1 here): elementwise
    # IEEE arithmetic, the same on every CPU.
    assert torch.allclose(dW, expected, rtol=0, atol=1e-15)


@pytest.mark.numerical
def test_bat_weight_update_follows_the_block_formula():
    """dW[a, b] = W[a, b] @ B_b + B_b with B indexed by the input block b, block by block."""
    r = 4
    layer = layer_with_random_adapter("bat", 12, 8, r)
    W, B = layer.weight.detach(), layer.bone.detach()
    dW = merge_weight(W, B, "bat") - W
    for a in range(8 // r):
        for b in range(12 // r):
            block = W[a * r:(a + 1) * r, b * r:(b + 1) * r]
            # float64 sums of r = 4 products of order 1, and one rounding of W + dW: a few eps = 1e-15.
            assert torch.allclose(dW[a * r:(a + 1) * r, b * r:(b + 1) * r], block @ B[b] + B[b], rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode,shape", [("bone", (21, 7, 4)), ("bone", (3, 5, 4)), ("bone", (16, 6, 8)),
                                        ("bat", (8, 12, 4)), ("lora", (9, 6, 3))])
@pytest.mark.numerical
def test_gradients_match_finite_differences(mode, shape):
    in_f, out_f, r = shape
    layer = layer_with_random_adapter(mode, in_f, out_f, r)
    x = torch.randn(2, 3, in_f, generator=gen(2), dtype=torch.float64, requires_grad=True)
    W = layer.weight.detach().clone().requires_grad_(True)   # also the (unused in training) weight gradient
    if mode == "bone":
        fn, args = bone_linear, (x, W, layer.bone.detach().clone().requires_grad_(True))
    elif mode == "bat":
        fn, args = bat_linear, (x, W, layer.bone.detach().clone().requires_grad_(True))
    else:
        fn = lambda x, W, A, B: lora_linear(x, W, A, B, 0.5)  # noqa: E731
        args = (x, W, layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
    # float64 central differences: truncation (h^2 times the third derivative) ~ 1e-12, rounding
    # eps |f| / h ~ 1e-9 for |f| of order 1: atol 1e-8 is 10x above that, far below a wrong term's effect.
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_model_gradients_of_adapters_match_finite_differences(mode, monkeypatch):
    """Whole tiny model, float64 (with the float64 reference WKV6, as the fast CPU op computes in
    fp32): the directional derivative along a random direction in the space of all trainable
    tensors (adapters and time parameters) equals the central finite difference."""
    monkeypatch.setattr(src.model, "wkv6", lambda r, k, v, w, u, s, op: wkv6_reference(r, k, v, w, u, s))
    model = make_model("deep")
    apply_adapters(model, BoneConfig(r=8 if mode == "bat" else 16, mode=mode, train_parts=["time"]), verbose=False)
    randomize(model)
    idx = tokens("deep", T=9)

    def loss():
        out = model(idx)[0]
        return F.cross_entropy(out.flatten(0, 1), idx.roll(-1, 1).flatten())

    params = [p for p in model.parameters() if p.requires_grad]
    loss().backward()
    g = gen(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = sum(d.pow(2).sum() for d in direction).sqrt()
    direction = [d / norm for d in direction]   # a unit step in the space of all trainable tensors
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = loss().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    # The loss (about 5.8) is evaluated twice at inputs 1e-6 apart, along the same code path, so the
    # difference rounds to about eps |f| / h = 1.3e-9, 4e-7 of the smallest analytic value here (3.2e-3).
    # Measured on MKL's AVX-512, AVX2 paths and one thread: 1.1e-7 relative at worst (9x headroom).
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic)


def test_bone_forward_and_backward_never_form_the_weight_update():
    """Tensor memory of a bone fwd+bwd: output, block sums, grads; no [out, in] temporary and no
    padded copy of x (in % r != 0)."""
    in_f, out_f, r, n = 1000, 600, 64, 256
    layer = layer_with_random_adapter("bone", in_f, out_f, r).float()
    layer.weight.requires_grad_(False)
    x = torch.randn(n, in_f, requires_grad=True)
    gy = torch.randn(n, out_f)
    with PeakMemory() as mem:
        layer(x).backward(gy)
    allowed = 4 * (n * out_f + n * in_f + 3 * n * r + r * out_f + out_f)   # y, x.grad, s + small, bone.grad
    assert mem.peak <= allowed, (mem.peak, allowed)
    assert 4 * in_f * out_f > allowed - 4 * n * in_f   # the bound is below a weight-sized temporary


def test_bat_keeps_at_most_one_weight_sized_temporary():
    """Forward and backward each form the merged weight once, one weight-sized tensor at a time,
    and nothing weight-sized is kept between them."""
    in_f, out_f, r, n = 512, 768, 64, 128
    layer = layer_with_random_adapter("bat", in_f, out_f, r).float()
    layer.weight.requires_grad_(False)
    x = torch.randn(n, in_f, requires_grad=True)
    gy = torch.randn(n, out_f)
    with PeakMemory() as mem:
        y = layer(x)
        after_forward = mem.live
        y.backward(gy)
    small = 4 * (3 * in_f * r + 4096)
    assert after_forward <= 4 * n * out_f + small                       # just y
    assert mem.peak <= 4 * (n * out_f + n * in_f + in_f * out_f) + small   # y, x.grad, one weight


def test_bat_refuses_non_divisible_shapes_naming_module_and_shapes():
    base = nn.Linear(64, 224, bias=False)
    with pytest.raises(AdapterError, match=r"blocks\.1\.ffn\.key is 64 -> 224 and r = 64: use r = 32"):
        BatLinear(base, 64, name="blocks.1.ffn.key")
    model = make_model("small")
    with pytest.raises(AdapterError, match=r"ffn\.key is 64 -> 224"):
        apply_adapters(model, BoneConfig(r=64, mode="bat"), verbose=False)
    assert not adapter_layers(model)   # nothing changed


def test_adapter_params_are_fp32_for_a_bf16_base_and_forward_runs_in_bf16():
    base = nn.Linear(40, 24, bias=False).to(torch.bfloat16)
    for mode in ("bone", "lora"):
        layer = LAYER[mode](base, 8)
        assert all(p.dtype == torch.float32 for p in layer.adapter_tensors().values())
        x = torch.randn(3, 40, dtype=torch.bfloat16)
        assert layer(x).dtype == torch.bfloat16
    layer = BatLinear(nn.Linear(32, 24, bias=False).to(torch.bfloat16), 8)
    assert layer.bone.dtype == torch.float32 and layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_autocast_computes_in_its_dtype_and_gradients_reach_fp32_adapters(mode):
    layer = LAYER[mode](nn.Linear(32, 24, bias=False).requires_grad_(False), 8)
    with torch.no_grad():
        for p in layer.adapter_tensors().values():
            p.normal_(std=0.1, generator=gen(4))
    x = torch.randn(5, 32, generator=gen(5), requires_grad=True)
    full = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and (y.float() - full).abs().max() <= 0.05 * full.abs().max()
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in layer.adapter_tensors().values())


@pytest.mark.numerical
def test_merge_is_computed_in_fp32_and_cast_once():
    """REFERENCE.md 6: in bf16 a 1e-4 update to 2e-2 weights is mostly lost; merge in fp32."""
    g = gen(3)
    W = (0.02 + 0.002 * torch.randn(32, 64, generator=g)).to(torch.bfloat16)
    bone = 1e-4 * torch.randn(16, 32, generator=g)
    merged = merge_weight(W, bone, "bone")
    exact = W.float() + bone.t().repeat(1, 4)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.to(torch.bfloat16))
    naive = W + bone.t().repeat(1, 4).to(torch.bfloat16)
    assert not torch.equal(naive, merged)   # the test can tell the two apart


def test_unknown_mode_is_an_error():
    with pytest.raises(AdapterError, match="Unknown adapter mode 'bon'"):
        BoneConfig(mode="bon")
    with pytest.raises(AdapterError, match="Unknown adapter mode"):
        merge_weight(torch.zeros(2, 2), torch.zeros(2, 2), "pissa")


# --------------------------------------------------------------------------------------------
# Selection and train parts

def selected(config, name="deep"):
    model = make_model(name, dtype=torch.float32)
    apply_adapters(model, config, verbose=False)
    return {n: m.r for n, m in adapter_layers(model).items()}


def test_default_targets_are_the_eight_projections_of_every_layer():
    got = selected(BoneConfig(r=8))
    assert set(got) == {f"blocks.{i}.{t}" for i in range(3) for t in DEFAULT_TARGETS}
    assert set(got.values()) == {8}


def test_target_names_suffixes_and_regex_select_exactly_what_they_say():
    assert set(selected(BoneConfig(r=8, target_modules=["att.key"]))) == {f"blocks.{i}.att.key" for i in range(3)}
    assert set(selected(BoneConfig(r=8, target_modules=["key"]))) == \
        {f"blocks.{i}.{m}.key" for i in range(3) for m in ("att", "ffn")}
    assert set(selected(BoneConfig(r=8, target_modules=["blocks.2.ffn.value", "att.gate"]))) == \
        {"blocks.2.ffn.value"} | {f"blocks.{i}.att.gate" for i in range(3)}
    assert set(selected(BoneConfig(r=8, target_modules=r"blocks\.[01]\.ffn\..*"))) == \
        {f"blocks.{i}.ffn.{m}" for i in (0, 1) for m in ("key", "receptance", "value")}
    assert set(selected(BoneConfig(r=8, target_modules=["head"]))) == {"head"}


def test_excluded_modules_layers_to_transform_and_rank_pattern():
    got = selected(BoneConfig(r=8, exclude_modules=["att.output", "blocks.0.ffn.key"]))
    expected = {f"blocks.{i}.{t}" for i in range(3) for t in DEFAULT_TARGETS if t != "att.output"} - {"blocks.0.ffn.key"}
    assert set(got) == expected
    assert set(selected(BoneConfig(r=8, exclude_modules=r".*\.att\..*"))) == \
        {f"blocks.{i}.ffn.{m}" for i in range(3) for m in ("key", "receptance", "value")}
    assert set(selected(BoneConfig(r=8, layers_to_transform=1))) == {f"blocks.1.{t}" for t in DEFAULT_TARGETS}
    assert set(selected(BoneConfig(r=8, layers_to_transform=[0, 2], target_modules=["att.key", "head"]))) == \
        {"blocks.0.att.key", "blocks.2.att.key"}
    got = selected(BoneConfig(r=8, rank_pattern={"ffn.key": 4, "blocks.1.att.value": 2, r"blocks\.2\.att\.(key|gate)": 16}))
    for name, r in got.items():
        want = 4 if name.endswith("ffn.key") else 2 if name == "blocks.1.att.value" else \
            16 if name in ("blocks.2.att.key", "blocks.2.att.gate") else 8
        assert r == want, name
    assert len(got) == 24


@pytest.mark.parametrize("kwargs,message", [
    ({"target_modules": ["att.kee"]}, "target_modules entry 'att.kee' matches no linear module"),
    ({"target_modules": r"blocks\.9\..*"}, r"target_modules pattern 'blocks\\\\.9\\\\..\*' matches no"),
    ({"exclude_modules": ["ffn.kye"]}, "exclude_modules entry 'ffn.kye' matches no"),
    ({"layers_to_transform": [1, 3]}, "layers_to_transform names layer 3, but the model has layers 0..2"),
    ({"rank_pattern": {"att.gate": 4}, "target_modules": ["att.key"]}, "rank_pattern key 'att.gate' matches none"),
    ({"target_modules": ["att.key"], "exclude_modules": ["key"]}, "select no module"),
    ({"target_modules": ["head"], "train_parts": ["head"]}, "head is both an adapter target and a train part"),
])
def test_selection_errors_name_the_pattern(kwargs, message):
    model = make_model("deep", dtype=torch.float32)
    with pytest.raises(AdapterError, match=message):
        apply_adapters(model, BoneConfig(r=8, **kwargs), verbose=False)
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"train_parts": ["time", "lnx"]}, "Unknown train part 'lnx'"),
    ({"layers_to_transform": -1}, "layers_to_transform must be"),
    ({"rank_pattern": {"att.key": 0}}, "rank_pattern entry 'att.key'"),
    ({"target_modules": "blocks.(["}, "not a valid regular expression"),
    ({"bone_mod": "bat"}, "Unknown adapter config key 'bone_mod'"),
    ({"r": 8, "bone_r": 16}, "gives r twice"),
])
def test_config_errors(bad, message):
    with pytest.raises(AdapterError, match=re.escape(message)):
        BoneConfig.from_dict(bad)


def expected_trainable(cfg: RWKV6Config, parts, adapted):
    names = set()
    for key in cfg.shapes():
        last = key.split(".")[-1]
        if "time" in parts and last.startswith("time_"):
            names.add(key)
        if "ln" in parts and any(f"{ln}." in key for ln in ("ln0", "ln1", "ln2", "ln_x", "ln_out")):
            names.add(key)
        if "emb" in parts and key == "emb.weight":
            names.add(key)
        if "head" in parts and key == "head.weight":
            names.add(key)
    return names | adapted


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.parametrize("parts", [[], ["time"], ["ln", "emb"], ["time", "ln", "emb", "head"]])
def test_train_parts_are_exactly_the_trainable_set(mode, parts):
    cfg = SHAPES["small"]
    model = make_model("small", dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=32, mode=mode, train_parts=parts), verbose=False)
    suffixes = ("lora_A", "lora_B") if mode == "lora" else ("bone",)
    adapted = {f"blocks.{i}.{t}.{s}" for i in range(cfg.n_layer) for t in DEFAULT_TARGETS for s in suffixes}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(cfg, parts, adapted)


def test_apply_prints_the_trainable_summary(capsys):
    model = make_model("small", dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=16))
    cfg = SHAPES["small"]
    bone = cfg.n_layer * 16 * (5 * 64 + 224 + 64 + 64)       # [r, out] for each of the 8 projections
    total = sum(p.numel() for p in model.parameters())
    line = capsys.readouterr().out.strip()
    assert line == f"trainable params: {bone:,} || all params: {total:,} || trainable%: {100 * bone / total:.4f}"


@pytest.mark.parametrize("n_embd,n_layer,dim_ffn,count", [(2048, 24, 7168, 33_030_144), (2560, 32, 8960, 55_050_240),
                                                          (4096, 32, 14336, 88_080_384)])
def test_bone_r64_parameter_counts_of_the_official_models(n_embd, n_layer, dim_ffn, count):
    """REFERENCE.md 5: 33.0M (1.6B), 55.1M (3B), 88.1M (7B) at r = 64 on all 8 projections."""
    cfg = RWKV6Config(vocab_size=65536, n_embd=n_embd, n_layer=n_layer, dim_att=n_embd, dim_ffn=dim_ffn, head_size=64)
    with torch.device("meta"):
        model = RWKV6(cfg)
    apply_adapters(model, BoneConfig(r=64), verbose=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_legacy_json_config_and_its_bone_load(tmp_path):
    cfg = BoneConfig.from_json('{"bone_mode": "bat", "bone_r": 32, "bone_load": ""}')
    assert (cfg.mode, cfg.r, cfg.load, cfg.target_modules) == ("bat", 32, None, None)   # None: the model's projections
    assert BoneConfig.from_dict({"bone_load": "", "bone_r": 64}).mode == "bone"
    with pytest.raises(AdapterError, match="Unknown adapter mode 'lora2'"):
        BoneConfig.from_json('{"bone_mode": "lora2", "bone_r": 32}')
    # bone_load really loads: apply with it and get the saved logits
    trained = make_model()
    apply_adapters(trained, BoneConfig(r=16), verbose=False)
    randomize(trained)
    path = tmp_path / "a.pth"
    save_adapter(trained, path)
    (tmp_path / "cfg.json").write_text(f'{{"bone_mode": "bone", "bone_r": 16, "bone_load": "{path}"}}')
    fresh = apply_adapters(make_model(), BoneConfig.from_json(str(tmp_path / "cfg.json")), verbose=False)
    assert torch.equal(logits(fresh, tokens()), logits(trained, tokens()))
    other = make_model()
    with pytest.raises(AdapterError, match="adapts blocks.0.att.receptance with r = 16, but this model has r = 32"):
        apply_adapters(other, BoneConfig(r=32, load=str(path)), verbose=False)
    assert not adapter_layers(other) and all(p.requires_grad for p in other.parameters())


# --------------------------------------------------------------------------------------------
# Zero init, merge, unload

@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_zero_adapter_leaves_logits_unchanged(mode):
    model = make_model(dtype=torch.float32)
    idx = tokens()
    base = logits(model, idx)
    apply_adapters(model, BoneConfig(r=32, mode=mode), verbose=False)
    out = logits(model, idx)
    assert torch.equal(out, base)
    randomize(model)
    assert (logits(model, idx) - base).abs().max() > 1e-2   # and a trained adapter changes them


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_merge_and_unload_gives_the_adapted_logits_and_an_official_state_dict(mode):
    model = make_model()
    apply_adapters(model, BoneConfig(r=32 if mode == "bat" else 24, mode=mode, lora_alpha=12 if mode == "lora" else None,
                                     train_parts=["time", "ln"]), verbose=False)
    randomize(model)
    idx = tokens()
    adapted = logits(model, idx)
    merge_and_unload(model)
    assert not adapter_layers(model) and not hasattr(model, "_bone_adapters")
    assert list(model.state_dict()) == list(SHAPES["small"].shapes())
    # float64 (make_model's default): the merged weight is W + dW rounded once; through the tiny
    # model that is 1e-14 of the logits (of order 1); a lost or doubled update moves them 1e-2.
    assert (logits(model, idx) - adapted).abs().max() <= 1e-10
    assert all(p.requires_grad for p in model.parameters())   # as before apply_adapters


def test_safe_merge_refuses_nan_before_touching_any_weight():
    model = make_model()
    apply_adapters(model, BoneConfig(r=16), verbose=False)
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.blocks[1].ffn.value.bone[3, 5] = float("nan")
    with pytest.raises(AdapterError, match=r"blocks\.1\.ffn\.value\.bone holds NaN or Inf: nothing was merged"):
        merge_and_unload(model)
    assert len(adapter_layers(model)) == 16
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or n == "blocks.1.ffn.value.bone", n


def test_unload_gives_back_the_plain_base():
    model = make_model()
    idx = tokens()
    base = logits(model, idx)
    weights = {n: p for n, p in model.named_parameters()}
    apply_adapters(model, BoneConfig(r=16, train_parts=["ln"]), verbose=False)
    randomize(model)
    unload(model)
    assert list(model.state_dict()) == list(SHAPES["small"].shapes())
    assert all(p is weights[n] and p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(logits(model, idx), base)
    with pytest.raises(AdapterError, match="has no adapters"):
        unload(model)


def test_apply_twice_is_refused():
    model = apply_adapters(make_model(), BoneConfig(r=16), verbose=False)
    with pytest.raises(AdapterError, match="already has adapters"):
        apply_adapters(model, BoneConfig(r=16), verbose=False)


# --------------------------------------------------------------------------------------------
# Adapter files

def trained_model(mode="bone", parts=("time", "ln", "emb", "head"), name="small", r=None, seed=0, **kwargs):
    model = make_model(name, dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=r or (32 if mode == "bat" else 16), mode=mode, train_parts=list(parts), **kwargs),
                   verbose=False)
    randomize(model, seed)
    with torch.no_grad():   # the train parts moved too
        for n, p in model.named_parameters():
            if p.requires_grad and not n.endswith((".bone", ".lora_A", ".lora_B")):
                p.add_(0.01 * torch.randn(p.shape, generator=gen(seed + 1)))
    return model


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
def test_save_load_round_trips_bit_exactly(tmp_path, mode):
    model = trained_model(mode, lora_alpha=8 if mode == "lora" else None)
    idx = tokens()
    path = tmp_path / "adapter.pth"
    save_adapter(model, path)
    sd = torch.load(path, weights_only=True)
    meta = sd.pop(META_KEY)
    assert meta["mode"] == mode and meta["fingerprint"] == SHAPES["small"].fingerprint()
    assert meta["targets"] == list(adapter_layers(model)) and set(meta["r"].values()) == {32 if mode == "bat" else 16}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(sd) == [n for n in model.state_dict() if n in trainable]   # only adapter and train-part tensors
    assert "blocks.1.att.key." + ("lora_A" if mode == "lora" else "bone") in sd and "blocks.1.att.time_decay" in sd

    # into a plain model: the file's adapters are applied, then loaded
    fresh = make_model(dtype=torch.float32)
    base = logits(fresh, idx)
    load_adapter(fresh, path)
    for n, p in fresh.named_parameters():
        if n in sd:
            assert torch.equal(p, sd[n]) and p.dtype == sd[n].dtype, n
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert not torch.equal(logits(fresh, idx), base)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(trainable)

    # into a model already adapted (zero adapters): the logits change to exactly the saved ones
    again = apply_adapters(make_model(dtype=torch.float32),
                           BoneConfig(r=32 if mode == "bat" else 16, mode=mode, lora_alpha=8 if mode == "lora" else None),
                           verbose=False)
    load_adapter(again, path)
    assert torch.equal(logits(again, idx), logits(model, idx))


def test_adapter_file_refuses_another_model_shape(tmp_path):
    path = tmp_path / "small.pth"
    save_adapter(trained_model(name="small"), path)
    other = make_model("deep", dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"was made for a model with vocab_size=260, n_embd=64, n_layer=2, dim_ffn=224, "
                                           r"but this model has vocab_size=300, n_embd=96, n_layer=3, dim_ffn=200"):
        load_adapter(other, path)
    assert not adapter_layers(other)


def test_adapter_file_refuses_another_mode_and_other_ranks(tmp_path):
    path = tmp_path / "bone.pth"
    save_adapter(trained_model("bone", r=32), path)
    bat = apply_adapters(make_model(dtype=torch.float32), BoneConfig(r=32, mode="bat"), verbose=False)
    with pytest.raises(AdapterError, match="holds bone adapters, but this model has bat adapters"):
        load_adapter(bat, path)
    bone16 = apply_adapters(make_model(dtype=torch.float32), BoneConfig(r=16), verbose=False)
    with pytest.raises(AdapterError, match=r"adapts blocks\.0\.att\.\w+ with r = 32, but this model has r = 16"):
        load_adapter(bone16, path)
    fewer = apply_adapters(make_model(dtype=torch.float32), BoneConfig(r=32, target_modules=["att.key"]), verbose=False)
    with pytest.raises(AdapterError, match="this model has r = none there"):
        load_adapter(fewer, path)


def test_adapter_file_with_stray_missing_or_misshapen_tensors_is_refused(tmp_path):
    model = trained_model(parts=("time",))
    good = tmp_path / "good.pth"
    save_adapter(model, good)
    sd = load_state_dict(good, mmap=False)

    def refusal(change, name):
        bad = dict(sd)
        change(bad)
        atomic_save(bad, tmp_path / name)
        target = apply_adapters(make_model(dtype=torch.float32), BoneConfig(r=16, train_parts=["time"]), verbose=False)
        before = {n: p.detach().clone() for n, p in target.named_parameters()}
        with pytest.raises(AdapterError) as e:
            load_adapter(target, tmp_path / name)
        assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())   # nothing loaded
        return str(e.value)

    stray = lambda d: d.__setitem__("model.blocks.0.att.key.bone", d["blocks.0.att.key.bone"])  # noqa: E731
    assert "has a tensor model.blocks.0.att.key.bone that belongs to no adapter" in refusal(stray, "stray.pth")
    assert "lacks blocks.1.ffn.value.bone" in refusal(lambda d: d.pop("blocks.1.ffn.value.bone"), "missing.pth")
    assert "lacks blocks.0.att.time_decay" in refusal(lambda d: d.pop("blocks.0.att.time_decay"), "missing_part.pth")
    shape = lambda d: d.__setitem__("blocks.0.att.key.bone", torch.zeros(16, 65))  # noqa: E731
    assert "has blocks.0.att.key.bone of shape [16, 65], but this model's is [16, 64]" in refusal(shape, "shape.pth")
    weight = lambda d: d.__setitem__("blocks.0.att.key.weight", torch.zeros(64, 64))  # noqa: E731
    assert "blocks.0.att.key.weight that belongs to no adapter" in refusal(weight, "weight.pth")


def test_legacy_adapter_files_load_with_model_prefix_or_not(tmp_path):
    """The older repository's files: no metadata, keys X.bone (r and mode read off the shapes),
    perhaps all under 'model.' (the prefix whose mismatch made it load nothing)."""
    model = trained_model("bat", parts=("ln",))
    sd = load_state_dict(_saved(model, tmp_path), mmap=False)
    sd.pop(META_KEY)
    for prefix in ("", "model."):
        path = tmp_path / f"legacy{prefix}.pth"
        atomic_save({prefix + k: v for k, v in sd.items()}, path)
        fresh = load_adapter(make_model(dtype=torch.float32), path)
        assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
    with pytest.raises(AdapterError, match="not an adapter file"):
        atomic_save({"blocks.0.att.key.weight": torch.zeros(64, 64)}, tmp_path / "x.pth")
        load_adapter(make_model(dtype=torch.float32), tmp_path / "x.pth")


def _saved(model, tmp_path):
    path = tmp_path / "saved.pth"
    save_adapter(model, path)
    return path


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
def test_merge_plan_follows_the_base_order_and_the_layers(tmp_path, mode):
    model = make_model(dtype=torch.float32)
    apply_adapters(model, BoneConfig(r=16, mode=mode, train_parts=["time"], lora_alpha=32), verbose=False)
    randomize(model)
    path = _saved(model, tmp_path)
    shapes = SHAPES["small"].shapes()
    got_mode, plan = plan_merge(shapes, SHAPES["small"].fingerprint(), path)
    assert got_mode == mode
    assert list(plan) == [k for k in shapes if k in plan]                       # base order
    layers = adapter_layers(model)
    for name, layer in layers.items():
        kind, tensors, scaling = plan[f"{name}.weight"]
        assert kind == "merge" and scaling == (2.0 if mode == "lora" else 1.0)
        merged = merge_weight(layer.weight, tensors, mode, scaling)
        assert torch.equal(merged, layer.merged_weight())
    replaced = [k for k, c in plan.items() if c[0] == "replace"]
    assert replaced == [k for k in shapes if train_part_of(k) == "time"]
    with pytest.raises(AdapterError, match="was made for a model with"):
        plan_merge(SHAPES["deep"].shapes(), SHAPES["deep"].fingerprint(), path)
