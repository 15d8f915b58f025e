"""export.py and merge.py --format, for both families: the fp32 GGUF of a merged World-vocabulary
model in llama.cpp gives the `rwkv` package's logits, tokens and greedy continuation; fp16, bf16
and q8_0 GGUFs are llama.cpp on their own rounded weights; safetensors holds the .pth's exact
tensors; .st follows web-rwkv's converter; refusals and killed runs leave nothing behind."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import export
from src.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from src.export import names
from src.rwkv_package import run_rwkv_package
from tests.runtimes import require
from tests.test_merge import make_pair, run_merge, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Alice has 3 apples. Bob gives Alice 2 more.\n\n你好 🙂"
TEXT_TOKENS = 65530     # ids past the World tokenizer's have no text: greedy skips them, as generate.py does
# llama.cpp rounds the activations of a matmul to the weights' type too, so these are a few units of
# each type's rounding (fp16 2^-11, bf16 2^-8, q8_0 1/254 of a block's largest value), of the logits' range.
FP32_TOL = 1e-5
ROUNDED_TOL = {"fp16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}


# The low-rank matrices (data-dependent lerps, decay, in-context rate, value mix, gate), which the
# random test weights leave nearly silent, made loud enough that a mistake in their layout shows.
LOW_RANK = re.compile(r"\.att\.(time_maa_w[12]|time_decay_w[12]|[wavg][12])$")
LOUDER = 8.0


@pytest.fixture(scope="module", params=["world", "world7"])
def merged(request, tmp_path_factory):
    """A merged Bone model (fp32, World vocabulary, 2 layers) of each family, its low-rank matrices
    LOUDER times larger."""
    d = tmp_path_factory.mktemp(request.param)
    base, adapter = make_pair(d, request.param, "bone", 16, base_dtype="fp32")
    out = d / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", out, "--dtype", "fp32", "--quiet") is None
    sd = load_state_dict(out)
    save_checkpoint({k: v * LOUDER if LOW_RANK.search(k) else v for k, v in sd.items()}, out, "fp32")
    return out


def run_export(*argv):
    try:
        export.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def family(path):
    return load_checkpoint(path)[1].family


def llama(path, lora=None):
    """llama.cpp on the GGUF at path, with the LoRA adapter GGUF `lora` applied when given."""
    llama_cpp = require("llama_cpp", "pip install -r requirements-test.txt (README, Set up)")
    return llama_cpp.Llama(str(path), lora_path=None if lora is None else str(lora), logits_all=True, n_ctx=128,
                           verbose=False)


def llama_run(path, n_tokens=0, lora=None):
    """(prompt ids as llama.cpp tokenizes PROMPT, logits of every prompt position, greedy continuation)."""
    llm = llama(path, lora)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    new = []
    for _ in range(n_tokens):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1][:TEXT_TOKENS])))
        llm.eval([new[-1]])
    return ids, logits, new


def off(logits, reference, last=True):
    """Largest difference at the last position (or at any), as a fraction of the reference's range there."""
    if last:
        logits, reference = logits[-1], reference[-1]
    return float(np.abs(logits - reference).max() / (reference.max() - reference.min()))


@pytest.mark.numerical
def test_fp32_gguf_in_llama_cpp_is_the_rwkv_package(merged, tmp_path):
    from src.tokenizer import WorldTokenizer
    out = tmp_path / "m.gguf"
    assert run_export("--model", merged, "--format", "gguf", "--output", out, "--dtype", "fp32", "--quiet") is None
    ids, logits, new = llama_run(out, 16)
    assert ids == list(WorldTokenizer().encode(PROMPT))
    ref = run_rwkv_package(merged, family(merged), ids, n_tokens=16)
    assert off(logits, ref["logits"].numpy()) <= 1e-3
    # fp32 in both: the same arithmetic up to the order of sums, at every position
    assert off(logits, ref["logits"].numpy(), last=False) <= FP32_TOL
    assert new == ref["continuation"]


@pytest.fixture
def broken_table(monkeypatch, merged):
    """A table with one mistake that still loads in llama.cpp: x060's square time_decay_w2 (64 x 64
    here) not transposed; x070's first two lerps (r, w) swapped."""
    fam = family(merged)
    table = names.GGUF_TABLES[fam]

    def broken(n_layer):
        rows = table(n_layer)
        for i, (out, keys, transform) in enumerate(rows):
            if fam == "x060" and out.endswith("time_mix_decay_w2.weight"):
                rows[i] = (out, keys, names.same)
            if fam == "x070" and out.endswith("time_mix_lerp_fused.weight"):
                rows[i] = (out, [keys[1], keys[0], *keys[2:]], transform)
        return rows
    monkeypatch.setitem(names.GGUF_TABLES, fam, broken)


def test_a_broken_table_is_caught(merged, tmp_path, broken_table):
    out = tmp_path / "broken.gguf"
    assert run_export("--model", merged, "--format", "gguf", "--output", out, "--dtype", "fp32", "--quiet") is None
    ids, logits, _ = llama_run(out)
    assert off(logits, run_rwkv_package(merged, family(merged), ids)["logits"].numpy(), last=False) > 10 * FP32_TOL


def read_back(gguf_path, sd, config):
    """The official state dict with every tensor the GGUF holds replaced by what it holds (dequantized),
    put back in place by running the export table's transforms on element indices."""
    import gguf
    held = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in gguf.GGUFReader(str(gguf_path)).tensors}
    out = {k: v.float().clone() for k, v in sd.items()}
    for name, keys, transform in names.GGUF_TABLES[config.family](config.n_layer):
        index = transform(*(torch.arange(sd[k].numel()).reshape(sd[k].shape) + (j << 40) for j, k in enumerate(keys)))
        index, values = index.reshape(-1), held[name].reshape(-1)
        assert values.numel() == index.numel(), name
        for j, k in enumerate(keys):
            mine = (index >> 40) == j
            out[k].view(-1)[index[mine] & ((1 << 40) - 1)] = values[mine]
    return out


def rounding_bound(t, dtype):
    """Largest error rounding t ([..., n] as the GGUF lays it out) to dtype can make, elementwise."""
    if dtype == "q8_0":     # blocks of 32 along a row: scale d = max|x| / 127 (itself fp16), values to the nearest step
        d = t.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        fp16_d = d * 2 ** -11 + 2 ** -25        # the fp16 rounding of d, relative or (subnormal d) absolute
        return (0.5 * d + 127 * fp16_d).expand(-1, 32).reshape(t.shape)
    return t.abs() * {"fp16": 2 ** -11, "bf16": 2 ** -8}[dtype] + 6e-8


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "q8_0"])
def test_rounded_gguf_is_llama_cpp_on_its_own_rounded_weights(merged, tmp_path, dtype):
    import gguf
    out = tmp_path / f"m-{dtype}.gguf"
    assert run_export("--model", merged, "--format", "gguf", "--output", out, "--dtype", dtype, "--quiet") is None
    sd, cfg = load_checkpoint(merged)
    # Each tensor holds its .pth values within the rounding of the type it was written as.
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    qtype = {"fp16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    assert qtype in types.values()
    back = read_back(out, sd, cfg)
    for name, keys, transform in names.GGUF_TABLES[cfg.family](cfg.n_layer):
        want = transform(*(sd[k].float() for k in keys))
        got = transform(*(back[k] for k in keys))
        if types[name] == gguf.GGMLQuantizationType.F32:
            assert torch.equal(got, want), name
        else:
            kind = {gguf.GGMLQuantizationType.F16: "fp16", gguf.GGMLQuantizationType.BF16: "bf16"}.get(types[name], dtype)
            assert ((got - want).abs() <= rounding_bound(want, kind)).all(), name
    rounded = tmp_path / "rounded.pth"
    save_checkpoint(back, rounded, "fp32")
    ids, logits, _ = llama_run(out)
    assert off(logits, run_rwkv_package(rounded, cfg.family, ids)["logits"].numpy()) <= ROUNDED_TOL[dtype]


@pytest.mark.parametrize("dtype", ["same", "bf16"])
def test_safetensors_holds_the_exact_tensors(merged, tmp_path, dtype):
    from safetensors.torch import load_file
    out = tmp_path / "m.safetensors"
    assert run_export("--model", merged, "--format", "safetensors", "--output", out, "--dtype", dtype, "--quiet") is None
    got, sd = load_file(str(out)), load_state_dict(merged)
    assert list(got) == list(sd)
    for k, v in sd.items():
        want = v if dtype == "same" else v.to(torch.bfloat16)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


# web-rwkv's converters (assets/scripts/convert_safetensors.py; Ai00's for RWKV-7), spelled out here.
ST_TRANSPOSED = {"x060": {"att.time_mix_w1", "att.time_mix_w2", "att.time_decay_w1", "att.time_decay_w2"},
                 "x070": {f"att.{m}{i}" for m in "wavg" for i in "12"}}


def test_st_is_web_rwkv_s_layout(merged, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "m.st"
    assert run_export("--model", merged, "--format", "st", "--output", out, "--quiet") is None
    got, sd = load_file(str(out)), load_state_dict(merged)
    fam = family(merged)
    assert len(got) == len(sd)
    transposed = 0
    for k, v in sd.items():
        key = k.replace("time_faaaa", "time_first").replace("time_maa", "time_mix").lower()
        want = v.half()
        if ".".join(key.split(".")[-2:]) in ST_TRANSPOSED[fam]:
            want, transposed = want.transpose(-2, -1), transposed + 1
        assert got[key].dtype == torch.float16 and torch.equal(got[key], want), k
    assert transposed == len(ST_TRANSPOSED[fam]) * load_checkpoint(merged)[1].n_layer


def gguf_tensors(path):
    import gguf
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_merge_format_gguf_and_the_script(tmp_path):
    """merge.py --format gguf and FORMAT=gguf sh scripts/merge_bone.sh write what merge.py + export.py
    write, and leave no merged .pth behind."""
    base, adapter = make_pair(tmp_path, "world7", "bone", 16, base_dtype="fp32")
    pth, direct, exported = tmp_path / "merged.pth", tmp_path / "direct.gguf", tmp_path / "exported.gguf"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", pth, "--dtype", "fp32", "--quiet") is None
    assert run_export("--model", pth, "--format", "gguf", "--output", exported, "--quiet") is None
    before = snapshot(tmp_path)
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", direct, "--dtype", "fp32",
                     "--format", "gguf", "--quiet") is None
    assert set(snapshot(tmp_path)) - set(before) == {"direct.gguf", "direct.gguf.report.txt"}
    want = gguf_tensors(exported)
    got = gguf_tensors(direct)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    env = {**os.environ, "BASE": str(base), "ADAPTER": str(adapter), "OUTPUT": str(tmp_path / "script.gguf"),
           "FORMAT": "gguf", "DTYPE": "fp32"}
    done = subprocess.run(["sh", os.path.join(ROOT, "scripts", "merge_bone.sh"), "--quiet"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rwkv7" in done.stdout
    script = gguf_tensors(tmp_path / "script.gguf")
    assert all(np.array_equal(script[k], want[k]) for k in want)
    assert set(snapshot(tmp_path)) - set(before) == {"direct.gguf", "script.gguf", "direct.gguf.report.txt",
                                                     "script.gguf.report.txt"}


SLOW_EXPORT = """
import sys, time, gguf
sys.path.insert(0, {root!r})
write = gguf.GGUFWriter.write_tensor_data
def slow(self, *a, **k):
    write(self, *a, **k)
    self.fout[0].flush()
    time.sleep(30)
gguf.GGUFWriter.write_tensor_data = slow
import export
export.main(sys.argv[1:])
"""


def test_a_killed_export_leaves_the_old_file_and_the_next_run_cleans_up(merged, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the old export")
    argv = ["--model", str(merged), "--format", "gguf", "--output", str(out), "--overwrite", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT.format(root=ROOT), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(p.name.startswith(".tmp-") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the export never started writing"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"the old export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    done = subprocess.run([sys.executable, "export.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "removed 1 temporaries" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert gguf_tensors(out)


@pytest.mark.parametrize("argv,pattern", [
    (["--format", "onnx"], "--format must be one of"),
    (["--format", "gguf", "--dtype", "int4"], "--dtype must be one of"),
    (["--format", "safetensors", "--dtype", "q8_0"], "q8_0 is a GGUF quantization"),
    (["--format", "st", "--dtype", "fp32"], "web-rwkv reads fp16 only"),
])
def test_refusals_leave_the_directory_as_it_was(merged, tmp_path, argv, pattern):
    before = snapshot(tmp_path)
    message = run_export("--model", merged, "--output", tmp_path / "o.gguf", *argv)
    assert isinstance(message, str) and re.search(pattern, message) and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_existing_output_the_input_itself_junk_and_no_room_are_refused(merged, tmp_path, monkeypatch):
    import shutil
    (tmp_path / "o.gguf").write_bytes(b"keep")
    (tmp_path / "junk.pth").write_bytes(b"not a model")
    before = snapshot(tmp_path)
    assert "already exists" in run_export("--model", merged, "--format", "gguf", "--output", tmp_path / "o.gguf")
    assert "is the input model itself" in run_export("--model", merged, "--format", "safetensors", "--output", merged)
    assert "junk.pth is not a PyTorch checkpoint (.pth) file" in run_export("--model", tmp_path / "junk.pth", "--format",
                                                                          "gguf", "--output", tmp_path / "x.gguf")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    message = run_export("--model", merged, "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert re.search(r"needs [\d.]+ MB but .* has 0.0 MB free", message) and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_bench_export_measures_every_format(tmp_path):
    done = subprocess.run([sys.executable, "bench/export.py", "--n_layer", "1", "--n_embd", "64", "--repeat", "1",
                           "--family", "x070", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^export\.py (\S+ \S+) +([\d.]+)s +([\d.]+) GB .* ([\d.]+)x +([\d.]+)x +(-?[\d.]+)x$",
                      done.stdout, re.M)
    assert [r[0] for r in rows] == ["gguf same", "gguf q8_0", "safetensors same", "st fp16"], done.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    lora = re.search(r"^adapter gguf lora r=64: ([\d.]+)s, peak [\d.]+ GB, ([\d.]+) MB; ([\d.]+)x the time and "
                     r"([\d.]+)x the size of the merged GGUF", done.stdout, re.M)
    assert lora and float(lora[1]) > 0 and 0 < float(lora[4]) < 1, done.stdout
    assert sorted(os.listdir(tmp_path / "export-x070-L1-C64")) == ["adapter-bone-r64.pth", "model.pth"]


@pytest.mark.parametrize("fmt,dtype,pattern", [
    ("gguf", "fp16", r"blk\.0\.time_mix_key\.weight \(from blocks\.0\.att\.key\.weight\) holds NaN or Inf once written as F16"),
    ("safetensors", "fp16", r"blocks\.0\.att\.key\.weight holds NaN or Inf once cast to float16"),
    ("st", "same", r"blocks\.0\.att\.key\.weight holds NaN or Inf once cast to float16"),
])
def test_a_value_past_the_chosen_type_is_refused(tmp_path, fmt, dtype, pattern):
    from tests.tiny import save_random_checkpoint
    path, _, sd = save_random_checkpoint(str(tmp_path), "world", seed=2)
    sd["blocks.0.att.key.weight"][5, 7] = 1e6       # fine in fp32, past fp16's 65504
    save_checkpoint(sd, path, "fp32")
    before = snapshot(tmp_path)
    message = run_export("--model", path, "--format", fmt, "--output", tmp_path / "o.out", "--dtype", dtype, "--quiet")
    assert isinstance(message, str) and re.search(pattern, message) and "\n" not in message, message
    assert snapshot(tmp_path) == before
