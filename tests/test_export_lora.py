"""export.py --adapter: a bone, mini or lora adapter as a llama.cpp LoRA GGUF. In llama.cpp, the
base's GGUF plus the adapter gives the merged model's GGUF logits (fp32: within 1e-5 of their range
at every position, the same greedy text; f16 / q8_0 bases: within that type's rounding); the
file's B A is the merge's update; broken adapters are caught; what a LoRA cannot hold is refused
with one sentence and nothing written."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from src.bone import BoneConfig, apply_adapters, save_adapter
from src.bone.functional import merged_exact
from src.checkpoint import load_state_dict
from src.family import from_checkpoint
from tests.test_export import FP32_TOL, PROMPT, ROUNDED_TOL, off, run_export
from tests.test_export import llama_run as export_run
from tests.test_merge import make_pair, run_merge, snapshot
from tests.tiny import randomize, save_random_checkpoint

# (tiny shape, mode, r, mini_r): r = 48 leaves a tail on every input (64 and 224 are not multiples).
CASES = {"bone-x060": ("world", "bone", 48, None), "lora-x060": ("world", "lora", 16, None),
         "bone-x070": ("world7", "bone", 16, None), "lora-x070": ("world7", "lora", 16, None),
         "mini-x060": ("world", "mini", 16, 32)}


def make_adapter(d, shape, mode, r, mini_r=None, parts=()):
    """A random 'trained' adapter (no train parts) for a fresh fp32 base; (base, adapter) paths."""
    if mode != "mini":
        return make_pair(d, shape, mode, r, train_parts=parts, base_dtype="fp32")
    base, _, _ = save_random_checkpoint(d, shape, 0, dtype="fp32")
    model = from_checkpoint(base, dtype=torch.float32, op="cpu")
    apply_adapters(model, BoneConfig(r=r, mode=mode, mini_r=mini_r, train_parts=list(parts)), verbose=False)
    randomize(model, 0, scale=0.05)
    adapter = d / f"adapter-{mode}-{shape}.pth"
    save_adapter(model, adapter)
    return base, adapter


@pytest.fixture(scope="module", params=list(CASES))
def world(request, tmp_path_factory):
    """The fp32 base, adapter, merged model (fp32) and their GGUFs, for one case."""
    d = tmp_path_factory.mktemp(request.param)
    base, adapter = make_adapter(d, *CASES[request.param])
    merged = d / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    files = {"base": base, "adapter": adapter, "merged": merged, "dir": d, "case": request.param}
    for name in ("base", "merged"):
        files[f"{name}.gguf"] = d / f"{name}.gguf"
        assert run_export("--model", files[name], "--format", "gguf", "--output", files[f"{name}.gguf"],
                          "--dtype", "fp32", "--quiet") is None
    files["lora.gguf"] = d / "lora.gguf"
    assert run_export("--adapter", adapter, "--format", "gguf", "--output", files["lora.gguf"], "--quiet") is None
    return files


def gguf_arrays(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}


@pytest.mark.numerical
def test_the_file_is_what_llama_cpp_reads_and_b_a_is_the_merges_update(world):
    fields, arrays = gguf_arrays(world["lora.gguf"])
    fam = "rwkv7" if world["case"].endswith("x070") else "rwkv6"
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == fam
    assert fields["adapter.type"] == "lora"
    sd, base = load_state_dict(world["adapter"]), load_state_dict(world["base"])
    meta = sd.pop("__bone_meta__")
    mode = meta["mode"]
    alpha = fields["adapter.lora.alpha"]
    assert alpha == (meta["lora_alpha"] if mode == "lora" else CASES[world["case"]][2])
    names = {k.rsplit(".", 1)[0] for k in sd}
    assert len(arrays) == 2 * len(names)
    for name in names:
        w = base[name + ".weight"].double()
        stem = (f"blk.{name.split('.')[1]}." + {"att": "time_mix_", "ffn": "channel_mix_"}[name.split(".")[2]]
                + name.split(".")[3] + ".weight")
        a, b = torch.from_numpy(arrays[stem + ".lora_a"]).double(), torch.from_numpy(arrays[stem + ".lora_b"]).double()
        r = b.shape[1]
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
        if mode == "lora":
            adapter, scaling = (sd[name + ".lora_A"].double(), sd[name + ".lora_B"].double()), meta["lora_alpha"] / r
        else:
            adapter, scaling = sd[name + ".bone"].double(), 1.0
            assert set(a.unique().tolist()) == {0.0, 1.0}      # the tiled identity
        want = merged_exact(w, adapter, mode, scaling) - w
        got = (alpha / r) * (b @ a)
        # Both sides in float64. `want` rounds once at |W + dW| (the add) and the subtraction of W is
        # then exact; a sum of r products (B A, ours and the file's, in whatever order the BLAS takes)
        # is off by at most r eps sum|b||a|; the scalings add a rounding each. So each element is within
        # (r + 4) eps (|W| + |s| |B| |A|): a bound from the arithmetic, not from one BLAS code path.
        bound = (r + 4) * torch.finfo(torch.float64).eps * (w.abs() + (alpha / r) * (b.abs() @ a.abs()))
        assert ((got - want).abs() <= bound).all(), name


def llama_run(path, lora=None, n_tokens=0):
    """(logits at every prompt position, greedy continuation) of llama.cpp on PROMPT (test_export's run)."""
    return export_run(path, n_tokens, lora)[1:]


def test_base_plus_adapter_is_the_merged_model_in_llama_cpp(world):
    merged, merged_text = llama_run(world["merged.gguf"], n_tokens=16)
    served, served_text = llama_run(world["base.gguf"], world["lora.gguf"], n_tokens=16)
    base, _ = llama_run(world["base.gguf"])
    print(f"{world['case']}: base + adapter vs merged {off(served, merged, last=False):.2e} of the range, "
          f"base alone {off(base, merged, last=False):.2e}")
    assert off(served, merged, last=False) <= FP32_TOL
    assert served_text == merged_text
    assert off(base, merged, last=False) > 1e-2          # the adapter has an effect


def rewrite(src, dst, change):
    """A copy of the adapter GGUF src with change(name, array) -> (name, array) applied to each tensor."""
    import gguf
    fields, arrays = gguf_arrays(src)
    w = gguf.GGUFWriter(str(dst), arch=fields["general.architecture"])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, fields["adapter.lora.alpha"])
    for name, array in arrays.items():
        w.add_tensor(*change(name, array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BROKEN = {
    "a and b swapped": lambda n, t: (n[:-1] + ("b" if n.endswith("a") else "a"), t),
    "a untransposed": lambda n, t: (n, np.ascontiguousarray(t.T) if n.endswith("_a") else t),
    "b laid out untransposed": lambda n, t: (n, np.ascontiguousarray(t.T).reshape(t.shape) if n.endswith("_b") else t),
}


# In a child process: llama-cpp-python 0.3.36 goes on with an adapter llama.cpp failed to load and crashes.
CHILD = """
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], lora_path=sys.argv[2], logits_all=True, n_ctx=128, verbose=True)
ids = llm.tokenize(sys.argv[4].encode(), add_bos=False, special=False)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[:len(ids)]))
"""


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_broken_adapter_is_caught(world, tmp_path, how):
    """llama.cpp refuses the wrong shapes; a file of the right shapes and wrong layout loads, and differs."""
    if world["case"] not in ("bone-x060", "lora-x070"):
        pytest.skip("one case of each mode family is enough")
    merged, _ = llama_run(world["merged.gguf"])
    broken, logits = tmp_path / "broken.gguf", tmp_path / "logits.npy"
    rewrite(world["lora.gguf"], broken, BROKEN[how])
    done = subprocess.run([sys.executable, "-c", CHILD, str(world["base.gguf"]), str(broken), str(logits), PROMPT],
                          capture_output=True, text=True)
    if how == "b laid out untransposed":
        assert done.returncode == 0, done.stderr[-2000:]
        print(f"{world['case']} with B laid out untransposed: {off(np.load(logits), merged, last=False):.2e}")
        assert off(np.load(logits), merged, last=False) > 10 * FP32_TOL
    else:
        assert "has incorrect shape" in done.stderr and not logits.exists()


@pytest.mark.parametrize("dtype,adapter_dtype", [("fp16", "same"), ("fp16", "fp16"), ("q8_0", "same"), ("q8_0", "fp16")])
def test_a_rounded_base_plus_adapter_is_within_its_rounding_of_the_merged_model(world, tmp_path, dtype, adapter_dtype):
    if world["case"] not in ("bone-x060", "lora-x070", "mini-x060"):
        pytest.skip("fp32 covers every case; the rounded bases take one per family and mode")
    base = tmp_path / f"base-{dtype}.gguf"
    assert run_export("--model", world["base"], "--format", "gguf", "--output", base, "--dtype", dtype, "--quiet") is None
    lora = world["lora.gguf"]
    if adapter_dtype != "same":
        lora = tmp_path / "lora-a16.gguf"
        assert run_export("--adapter", world["adapter"], "--format", "gguf", "--output", lora, "--dtype", adapter_dtype,
                          "--quiet") is None
        assert os.path.getsize(lora) < os.path.getsize(world["lora.gguf"])
    merged, _ = llama_run(world["merged.gguf"])
    served, _ = llama_run(base, lora)
    print(f"{world['case']} {dtype} base + {adapter_dtype} adapter vs merged fp32: {off(served, merged):.2e}")
    assert off(served, merged) <= ROUNDED_TOL[dtype]


def test_checked_against_the_base_gives_the_same_file_and_another_base_is_refused(world, tmp_path):
    out = tmp_path / "checked.gguf"
    assert run_export("--adapter", world["adapter"], "--model", world["base"], "--format", "gguf", "--output", out,
                      "--quiet") is None
    assert out.read_bytes() == world["lora.gguf"].read_bytes()
    other, _, _ = save_random_checkpoint(str(tmp_path), "world7" if world["case"].endswith("x060") else "world", 3)
    before = snapshot(tmp_path)
    message = run_export("--adapter", world["adapter"], "--model", other, "--format", "gguf", "--output",
                         tmp_path / "o.gguf")
    assert isinstance(message, str) and "\n" not in message and "cannot be loaded here" in message, message
    assert snapshot(tmp_path) == before


def with_state(d):
    """A lora adapter file that also holds a trained state (as state tuning saves it)."""
    _, adapter = make_pair(d, "world", "lora", 8, train_parts=(), base_dtype="fp32")
    sd = torch.load(adapter, weights_only=True)
    sd["blocks.0.att.time_state"] = torch.zeros(2, 32, 32)
    path = d / "with-state.pth"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("what,argv,pattern", [
    ("bat", ["--format", "gguf"], r"is a bat adapter, whose update W B \+ B depends on the base weight and has no small "
                                  r"exact rank.*merge it instead"),
    ("parts", ["--format", "gguf"], r"holds trained time, ln parameters besides its adapters.*merge it instead"),
    ("state", ["--format", "gguf"], r"holds a trained state \(blocks\.0\.att\.time_state\).*merge it instead"),
    ("bone", ["--format", "safetensors"], r"An adapter is written as a llama\.cpp LoRA \(--format gguf\)"),
    ("bone", ["--format", "gguf", "--dtype", "q8_0"], r"--dtype q8_0 cannot be written for an adapter"),
])
def test_what_a_lora_cannot_hold_is_refused_and_nothing_written(tmp_path, what, argv, pattern):
    d = tmp_path / "in"
    d.mkdir()
    if what == "state":
        adapter = with_state(d)
    else:
        _, adapter = make_pair(d, "world", what if what in ("bat", "bone") else "bone", 16,
                               train_parts=("time", "ln") if what == "parts" else (), base_dtype="fp32")
    out = tmp_path / "out"
    out.mkdir()
    before, before_in = snapshot(out), snapshot(d)
    message = run_export("--adapter", adapter, "--output", out / "a.gguf", *argv)
    assert isinstance(message, str) and re.search(pattern, message) and "\n" not in message, message
    assert snapshot(out) == before and snapshot(d) == before_in


def test_neither_model_nor_adapter_is_refused(tmp_path):
    message = run_export("--format", "gguf", "--output", tmp_path / "a.gguf")
    assert "Give --model" in message and os.listdir(tmp_path) == []


def test_several_ranks_write_alpha_0_and_a_file_without_sizes_needs_the_base(tmp_path):
    """llama.cpp has one alpha per file: with rank_pattern's several ranks, alpha 0 (read as alpha / r = 1
    for every module). An older adapter file records no sizes: --model gives them."""
    base, _, _ = save_random_checkpoint(tmp_path, "world", 0, dtype="fp32")
    model = from_checkpoint(base, dtype=torch.float32, op="cpu")
    apply_adapters(model, BoneConfig(r=16, rank_pattern={"ffn.value": 32}), verbose=False)
    randomize(model, 0)
    adapter = tmp_path / "a.pth"
    save_adapter(model, adapter)
    assert run_export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "a.gguf", "--quiet") is None
    fields, arrays = gguf_arrays(tmp_path / "a.gguf")
    assert fields["adapter.lora.alpha"] == 0.0
    assert arrays["blk.1.channel_mix_value.weight.lora_b"].shape == (64, 32)
    sd = torch.load(adapter, weights_only=True)
    sd["__bone_meta__"]["fingerprint"] = None
    torch.save(sd, adapter)
    before = snapshot(tmp_path)
    message = run_export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "b.gguf")
    assert "does not record its base model's sizes" in message and "\n" not in message, message
    assert snapshot(tmp_path) == before
    assert run_export("--adapter", adapter, "--model", base, "--format", "gguf", "--output", tmp_path / "b.gguf",
                      "--quiet") is None
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
