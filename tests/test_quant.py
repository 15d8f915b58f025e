"""A quantized frozen base (src/quant.py, train.py --quant, merge.py --quant), checked against
bitsandbytes itself: the model computes with exactly bitsandbytes' dequantize(quantize(W)), its
logits move by no more than the quantization error allows, autograd does not keep dequantized
weights, bone/bat/lora train on it under DeepSpeed, and merges give dequantize(quantize(W)) + dW
(ours) or the older repository's bf16 result (its files)."""
import gc
import os
import re
import subprocess
import sys
import weakref

import bitsandbytes.functional as bnb_F
import pytest
import torch

import merge
from src.bone import BoneConfig, apply_adapters, load_adapter, save_adapter
from src.checkpoint import atomic_save, load_state_dict
from src.family import from_checkpoint
from src.model import RWKV6
from src.quant import QUANT_TYPES, QuantizedWeight, quantize_model
from tests.test_train import latest_adapter, losses, setup, train  # noqa: F401 (setup is a fixture)
from tests.tiny import SHAPES, random_state_dict, randomize, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTS = [q for q in QUANT_TYPES if q != "none"]
MATRICES = ("att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.key", "ffn.receptance",
            "ffn.value")


def roundtrip(w, quant):
    """dequantize(quantize(W)) in fp32, straight from bitsandbytes with its default block sizes."""
    if quant == "int8":
        q, state = bnb_F.quantize_blockwise(w.float())
        return bnb_F.dequantize_blockwise(q, state)
    # Flat: bitsandbytes 0.50's CPU dequantize_4bit misreads 2-D shapes whose width is not a
    # multiple of the block size (test_bitsandbytes_cpu_4bit_blocks_run_across_rows).
    q, state = bnb_F.quantize_4bit(w.float().reshape(-1), quant_type=quant)
    return bnb_F.dequantize_4bit(q, state).view(w.shape)


def code_table_roundtrip(w, quant):
    """dequantize(quantize(W)) for nf4/fp4 from bitsandbytes' packed bytes and absmax, decoded
    here by hand (code[high nibble], code[low nibble], times the block's absmax), so that no
    bitsandbytes dequantize kernel is involved."""
    q, state = bnb_F.quantize_4bit(w.float(), quant_type=quant)
    nibbles = torch.stack([q.reshape(-1) >> 4, q.reshape(-1) & 15], -1).reshape(-1).long()
    return (state.code[nibbles].view(-1, state.blocksize) * state.absmax[:, None]).view(w.shape)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(300, 96), (7, 64 * 3), (128, 200)])
@pytest.mark.numerical
def test_dequantize_equals_the_code_table(quant, shape):
    """Our dequantize (and the flat bitsandbytes round trip the tests use) equal a decoding of
    bitsandbytes' packed bytes by hand, also where the width is not a multiple of the 64-value
    block (96, 200): there bitsandbytes' own CPU dequantize_4bit of the 2-D shape is wrong."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    expected = code_table_roundtrip(w, quant)
    assert torch.equal(QuantizedWeight(w, quant).dequantize(), expected)
    assert torch.equal(roundtrip(w, quant), expected)
    rows = torch.tensor([0, 3, shape[0] - 1, 1])
    assert torch.equal(QuantizedWeight(w, quant).dequantize_rows(rows), expected[rows])


def frozen_matrix(key):
    return key in ("emb.weight", "head.weight") or any(key.endswith(f"{m}.weight") for m in MATRICES)


def adapted(sd, mode, quant=None, seed=0, grad_cp=False):
    """A model of `sd` with random `mode` adapters (r = 16), held `quant` if given."""
    model = RWKV6.from_state_dict({k: v.clone() for k, v in sd.items()}, op="cpu", grad_cp=grad_cp)
    apply_adapters(model, BoneConfig(r=16, mode=mode, lora_alpha=32), verbose=False)
    randomize(model, seed, scale=0.05)
    if quant:
        quantize_model(model, quant)
    return model


def idx_for(shape="small", seed=0):
    return torch.randint(1, SHAPES[shape].vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def fwd_bwd(model, idx):
    logits = model(idx)[0]
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_the_quantized_model_computes_with_bitsandbytes_rounded_weights(quant, mode):
    """Logits and adapter gradients equal those of a model whose frozen matrices were replaced by
    bitsandbytes' own dequantize(quantize(W)); only fp32 rounding may differ."""
    sd = random_state_dict(SHAPES["small"], seed=1)
    ours = adapted(sd, mode, quant)
    reference = adapted({k: roundtrip(v, quant) if frozen_matrix(k) else v for k, v in sd.items()}, mode)
    idx = idx_for()
    (a, ga), (b, gb) = fwd_bwd(ours, idx), fwd_bwd(reference, idx)
    assert ours._base_quant["type"] == quant and len(ours._base_quant["keys"]) == 8 * 2 + 2
    # fp32 on the same rounded weights, only the order of sums differs: logits of order 1 agree to a
    # few eps (1e-6 = 8 eps), gradients (sums over every token) to 1e-5 relative; a weight not
    # quantized, or quantized twice, moves both by the quantization error (1e-2 and more).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) == 8 * 2 * (2 if mode == "lora" else 1)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.numerical
def test_logits_move_by_no_more_than_the_quantization_error(quant):
    """The relative logit error of the quantized model is at most twice the relative weight error
    of the quantization (measured with bitsandbytes over the quantized matrices; measured on these
    random models: nf4 9.2% weights -> 14-16% logits, fp4 12.2% -> 17-22%, int8 1.3% -> 1.9-2.3%),
    and not far below it (the base really is quantized)."""
    for shape, seed in (("small", 0), ("deep", 1)):
        sd = random_state_dict(SHAPES[shape], seed=seed)
        model = RWKV6.from_state_dict(sd, op="cpu").eval()
        idx = idx_for(shape, seed)
        with torch.no_grad():
            full = model(idx)[0]
            keys = quantize_model(model.requires_grad_(False), quant)
            quantized = model(idx)[0]
        assert sorted(keys) == sorted(k for k in sd if frozen_matrix(k))
        weight_error = (sum((sd[k] - roundtrip(sd[k], quant)).pow(2).sum() for k in keys)
                        / sum(sd[k].pow(2).sum() for k in keys)).sqrt().item()
        logit_error = ((quantized - full).norm() / full.norm()).item()
        assert 0.5 * weight_error < logit_error <= 2 * weight_error, (shape, weight_error, logit_error)


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
def test_no_dequantized_weight_is_kept_for_the_backward_pass(mode, monkeypatch):
    """Every weight dequantized in the forward pass is freed when the pass ends (autograd keeps
    where to dequantize it again); with gradient checkpointing, what the adapter layers save goes
    to the checkpoint as before (their inputs are not kept either) and the gradients are the same."""
    sd = random_state_dict(SHAPES["small"], seed=2)
    made, inputs = [], []
    dequantize = QuantizedWeight.dequantize

    def watched(self, dtype=None):
        w = dequantize(self, dtype)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(QuantizedWeight, "dequantize", watched)
    grads = []
    for grad_cp in (False, True):
        model = adapted(sd, mode, "nf4", grad_cp=grad_cp).train()
        for name, layer in model.named_modules():
            if name.startswith("blocks.") and hasattr(layer, "quantized"):
                layer.register_forward_hook(lambda m, args, out: inputs.append(weakref.ref(args[0])))
        made.clear()
        inputs.clear()
        logits = model(idx_for())[0]
        gc.collect()
        assert len(made) == 8 * 2 + 1 and not [r for r in made if r() is not None]
        kept = [r for r in inputs if r() is not None]
        assert not kept if grad_cp else (mode == "bone" or kept)     # bat and lora save their input
        logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        # The same arithmetic with and without gradient checkpointing: equal to a last place (8 eps).
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=0)


@pytest.mark.parametrize("quant,shape", [("nf4", (300, 96)), ("fp4", (260, 64)), ("int8", (256, 64)),
                                         ("int8", (260, 64))])
def test_embedding_rows_casts_and_state_dict(quant, shape):
    """dequantize_rows gives dequantize()[rows] (row groups that fill whole blocks, or the whole
    table where they cannot); casts leave the packed data alone; nothing quantized is saved."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02
    q = QuantizedWeight(w, quant)
    rows = torch.tensor([5, 0, shape[0] - 1, 5, 77])
    assert torch.equal(q.dequantize_rows(rows), roundtrip(w, quant)[rows])
    assert torch.equal(q.dequantize(), roundtrip(w, quant))
    before = {n: b.clone() for n, b in q.named_buffers()}
    q.to(torch.bfloat16)
    assert all(torch.equal(b, before[n]) for n, b in q.named_buffers()) and not q.state_dict()

    model = RWKV6.from_state_dict(random_state_dict(SHAPES["small"], seed=0), op="cpu")
    apply_adapters(model, BoneConfig(r=16), verbose=False)
    quantize_model(model, quant)
    assert not [k for k in model.state_dict() if k.endswith(".weight") and frozen_matrix(k)]
    model.to(torch.bfloat16)
    logits = model(idx_for())[0]
    assert logits.dtype == torch.bfloat16 and model.emb(idx_for()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
def test_train_with_quant_nf4_under_zero2(setup, tmp_path, mode):  # noqa: F811
    extra = ["--peft", "lora", "--lora_r", "8"] if mode == "lora" else ["--bone_mode", mode]
    train(setup, tmp_path, "--strategy", "deepspeed_stage_2", "--quant", "nf4", *extra)
    loss = losses(tmp_path)
    assert sorted(loss) == list(range(1, 17))
    # Step 1 is the untouched base (adapters start at zero, lora_B at zero); the adapters learn.
    assert sum(loss[s] for s in range(13, 17)) / 4 < loss[1] - 0.2, loss
    meta = torch.load(latest_adapter(tmp_path), weights_only=True)["__bone_meta__"]
    assert meta["quant"] == "nf4"
    assert sorted(meta["quantized"]) == sorted(k for k in SHAPES["small"].shapes() if frozen_matrix(k))
    if mode == "bone":     # merged as trained, the file gives the adapter model's logits
        d, base = setup
        out = tmp_path / "merged.pth"
        p = subprocess.run([sys.executable, "merge.py", "--base_model", base, "--adapter", latest_adapter(tmp_path),
                            "--output", out, "--dtype", "fp32", "--quant", "nf4", "--verify", "--quiet"],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "merge: rounded 18 base tensors through nf4 first" in p.stdout
        m = re.search(r"base held nf4 as in training: (\S+) \(the adapter itself moves the logits by up to (\S+)\)",
                      p.stdout)
        assert m and float(m.group(1)) <= 1e-4 and float(m.group(2)) > 1e-2, p.stdout


def test_zero3_with_a_quantized_base_trains(setup, tmp_path):  # noqa: F811
    train(setup, tmp_path, "--strategy", "deepspeed_stage_3", "--quant", "nf4", steps=8)
    loss = losses(tmp_path)
    assert sum(loss[s] for s in range(5, 9)) / 4 < loss[1] - 0.2, loss


def trained_pair(tmp_path, mode, quant="nf4", train_parts=("ln",), shape="small"):
    """A fp32 base file and an adapter 'trained' on it held `quant`: random adapter tensors,
    perturbed train parts, saved from the quantized model (so its metadata says so)."""
    base, _, sd = save_random_checkpoint(str(tmp_path), shape, 0, dtype="fp32")
    model = from_checkpoint(base, op="cpu")
    apply_adapters(model, BoneConfig(r=16, mode=mode, lora_alpha=32, train_parts=list(train_parts)), verbose=False)
    randomize(model, 1, scale=0.05)
    with torch.no_grad():
        model.blocks[0].ln1.weight.add_(0.1)
    quantize_model(model, quant)
    adapter = tmp_path / f"adapter-{mode}.pth"
    save_adapter(model, adapter)
    return base, adapter, load_state_dict(base), torch.load(adapter, weights_only=True)


def delta(mode, w, a, key):
    """dW for one weight, from the adapter tensors, by plain indexing (REFERENCE.md section 5)."""
    name = key[:-len(".weight")]
    if mode == "lora":
        return 2.0 * a[f"{name}.lora_B"] @ a[f"{name}.lora_A"]        # scaling = lora_alpha / r = 2
    b = a[f"{name}.bone"].float()
    out_f, in_f = w.shape
    if mode == "bone":
        return b[torch.arange(in_f) % b.shape[0]].t()                 # dW[o, i] = bone[i mod r, o]
    r = b.shape[1]
    dw = torch.empty_like(w)
    for i in range(out_f // r):
        for j in range(in_f // r):
            blk = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
            dw[i * r:(i + 1) * r, j * r:(j + 1) * r] = blk @ b[j] + b[j]
    return dw


@pytest.mark.parametrize("mode", ["bone", "bat", "lora"])
@pytest.mark.numerical
def test_merge_quant_nf4_is_the_rounded_base_plus_the_update(tmp_path, mode):
    base, adapter, base_sd, a = trained_pair(tmp_path, mode)
    for quant in ("nf4", "none"):
        out = tmp_path / f"merged-{quant}.pth"
        assert merge.main(["--base_model", base, "--adapter", str(adapter), "--output", str(out), "--quiet",
                           "--quant", quant, "--dtype", "fp32"]) is None
        merged = load_state_dict(out)
        assert list(merged) == list(base_sd)
        for k, w in base_sd.items():
            if frozen_matrix(k):
                w = roundtrip(w, "nf4") if quant == "nf4" else w
                expect = w + delta(mode, w, a, k) if not k.startswith(("emb", "head")) else w
            else:
                expect = a.get(k, w)
            # fp32 W + dW, weights of order 1e-1 to 1: a few eps (1e-6 = 8 eps of 1); dW is 1e-2 and more.
            assert (merged[k] - expect).abs().max() <= 1e-6, (quant, k)


def test_rwkv7_quantized_run_merges_as_trained_and_verifies(tmp_path, capsys):
    """An adapter trained on an nf4-held x070 base: merge --quant nf4 rounds the same 6 x 2 + 2
    matrices, and --verify (the rwkv package in x070 mode) finds the adapter model's logits."""
    base, adapter, base_sd, a = trained_pair(tmp_path, "bone", shape="small7", train_parts=("time", "ln"))
    assert len(a["__bone_meta__"]["quantized"]) == 6 * 2 + 2
    assert merge.main(["--base_model", base, "--adapter", str(adapter), "--output", str(tmp_path / "m.pth"),
                       "--quant", "nf4", "--dtype", "fp32", "--verify", "--quiet"]) is None
    out = capsys.readouterr().out
    assert "merge: rounded 14 base tensors through nf4 first" in out and "verify: PASS" in out, out
    m = re.search(r"base held nf4 as in training: (\S+) \(the adapter itself moves the logits by up to (\S+)\)", out)
    assert m and float(m.group(1)) <= 1e-4 and float(m.group(2)) > 1e-2, out


def test_merge_says_what_it_did(tmp_path, capsys):
    base, adapter, _, _ = trained_pair(tmp_path, "bone")
    for quant, says in (("nf4", "merge: rounded 18 base tensors through nf4 first"),
                        ("none", "merge: added the update to the base as stored (full precision); note: the adapter "
                                 "was trained on a base held nf4 (merge with --quant nf4 to reproduce that base)"),
                        ("int8", "rounded 18 base tensors through int8 first (dequantize(quantize(W)) with bitsandbytes' "
                                 "defaults, in fp32), then added the update; note: the adapter was trained on a base "
                                 "held nf4")):
        assert merge.main(["--base_model", base, "--adapter", str(adapter), "--output", str(tmp_path / "m.pth"),
                           "--quiet", "--overwrite", "--quant", quant]) is None
        assert says in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["bone", "bat"])
def test_an_older_repository_disha_file_merges_as_its_own_quantized_merge(tmp_path, mode):
    """The older repository's merge_disha.py --quant nf4, recomputed here as it does it (bitsandbytes'
    quantize_nf4 of the bf16 base, dequantized to bf16, the update added in bf16): ours is within
    bf16 rounding of it, |ours - theirs| <= 4 * 2^-8 * (the magnitude of the terms), for every
    adapted weight, and the other tensors are the base's own."""
    base, _, _ = save_random_checkpoint(str(tmp_path), "small", 0, dtype="bf16")
    base_sd = load_state_dict(base)
    g = torch.Generator().manual_seed(4)
    disha = {}
    for k, w in base_sd.items():
        if any(k.endswith(f"{m}.weight") for m in MATRICES):
            out_f, in_f = w.shape
            shape = (16, out_f) if mode == "bone" else (in_f // 16, 16, 16)
            disha[k[:-len("weight")] + "disha"] = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    atomic_save(disha, tmp_path / "rwkv-0.pth")
    outs = {}
    for quant in ("nf4", "none"):
        outs[quant] = tmp_path / f"merged-{quant}.pth"
        assert merge.main(["--base_model", base, "--adapter", str(tmp_path / "rwkv-0.pth"), "--output",
                           str(outs[quant]), "--quant", quant, "--quiet"]) is None
    ours, unrounded = load_state_dict(outs["nf4"]), load_state_dict(outs["none"])
    for k, w in base_sd.items():
        d = disha.get(k[:-len("weight")] + "disha")
        if d is None:
            assert torch.equal(ours[k], w), k
            continue
        q, state = bnb_F.quantize_nf4(w.reshape(-1))     # flat: see roundtrip()
        wq = bnb_F.dequantize_nf4(q, quant_state=state).view(w.shape).to(torch.bfloat16)
        r = d.shape[1] if mode == "bat" else d.shape[0]
        if mode == "bone":
            theirs = (wq.reshape(-1, w.shape[1] // r, r).permute(1, 2, 0) + d).permute(2, 0, 1).reshape(w.shape)
            scale = wq.float().abs() + d.float().abs()[torch.arange(w.shape[1]) % r].t()
        else:
            a, b = w.shape[0] // r, w.shape[1] // r

            def blocks(x):
                return x.reshape(a, r, b, r).permute(0, 2, 1, 3)

            def unblocks(x):
                return x.permute(0, 2, 1, 3).reshape(w.shape)

            theirs = wq + unblocks(blocks(wq) @ d + d)
            scale = wq.float().abs() + unblocks(blocks(wq.float().abs()) @ d.float().abs() + d.float().abs())
        bound = 4 * 2 ** -8 * scale
        assert ((ours[k].float() - theirs.float()).abs() <= bound).all(), k
        assert not ((unrounded[k].float() - theirs.float()).abs() <= bound).all(), k   # the test can tell


def test_bad_quant_arguments_are_one_sentence(setup, tmp_path):  # noqa: F811
    d, model = setup
    common = [sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"),
              "--proj_dir", str(tmp_path / "out"), "--accelerator", "cpu"]
    fake = tmp_path / "fake"
    for version, body in (("missing", "raise ImportError('no bitsandbytes here')"), ("old", "__version__ = '0.43.1'")):
        (fake / version / "bitsandbytes").mkdir(parents=True)
        (fake / version / "bitsandbytes" / "__init__.py").write_text(body + "\n")
    cases = [
        (common + ["--quant", "nf8"], None, "train.py: Unknown --quant 'nf8': choose none, nf4, fp4 or int8."),
        (common + ["--quant", "nf4", "--peft", "none", "--train_parts", "ln"], None,
         "but --peft none trains the base weights themselves"),
        (common + ["--quant", "nf4"], "missing", "--quant needs bitsandbytes >= 0.46, which could not be imported"),
        (common + ["--quant", "int8"], "old", "--quant needs bitsandbytes >= 0.46 (the first that quantizes on the CPU"),
    ]
    base, adapter, _, _ = trained_pair(tmp_path, "bone")
    merging = [sys.executable, "merge.py", "--base_model", base, "--adapter", str(adapter), "--output",
               str(tmp_path / "merged.pth")]
    cases += [(merging + ["--quant", "nf8"], None, "merge.py: --quant 'nf8' is not a choice: choose from"),
              (merging + ["--quant", "nf4"], "old", "merge.py: --quant needs bitsandbytes >= 0.46")]
    for cmd, bnb, message in cases:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake / bnb), ROOT]) if bnb else ROOT)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, (cmd, p.stderr[-2000:])
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged.pth").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
