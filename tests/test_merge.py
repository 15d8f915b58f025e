"""merge.py: the merged file loads in the `rwkv` runtime and gives the adapter model's logits;
the survival report matches a direct computation; every bad input is refused with one sentence
and leaves the files as they were; the streamed .pth is what torch.save writes."""
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

import merge
from src.bone import BoneConfig, apply_adapters, load_adapter, save_adapter
from src.checkpoint import DTYPES, atomic_save, load_state_dict, stream_checkpoint
from src.family import from_checkpoint
from src.model import RWKV6
from tests.tiny import ALL, SHAPES, package_logits, randomize, rwkv_runtime, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pair(tmp_path, shape="small", mode="bone", r=32, train_parts=("time", "ln"), base_dtype="bf16", seed=0):
    """A base checkpoint and a 'trained' adapter for it: random adapter tensors and perturbed
    train-part tensors. Returns (base path, adapter path)."""
    base, _, _ = save_random_checkpoint(tmp_path, shape, seed, dtype=base_dtype)
    model = from_checkpoint(base, dtype=torch.float32, op="cpu")
    apply_adapters(model, BoneConfig(r=r, mode=mode, train_parts=list(train_parts), lora_alpha=2 * r), verbose=False)
    randomize(model, seed, scale=0.05)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.endswith((".bone", ".lora_A", ".lora_B")):
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))
    adapter = tmp_path / f"adapter-{mode}-{shape}.pth"
    save_adapter(model, adapter)
    return base, str(adapter)


def adapter_model(base, adapter):
    return load_adapter(from_checkpoint(base, dtype=torch.float32, op="cpu"), adapter).eval()


def run_merge(*argv):
    """merge.main in this process; returns (exit message or None)."""
    try:
        merge.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def runtime_logits(path, ids):
    with torch.no_grad():
        return rwkv_runtime(str(path)).forward(ids, None, full_output=True)[0]


@pytest.mark.parametrize("shape,mode,r", [
    ("small", "bone", 32), ("small", "bat", 32), ("small", "lora", 8),
    ("deep", "bone", 64),     # 96 and 200 are not multiples of 64: padded block sums
    ("deep", "bat", 8),
    ("small7", "bone", 32), ("small7", "bat", 8), ("small7", "lora", 8),   # RWKV-7: the rwkv package in x070 mode
    ("deep7", "bone", 64),    # 32 -> 128 and back: r larger than the attention input, padded
])
def test_fp32_merge_matches_the_adapter_model_in_the_rwkv_runtime(tmp_path, shape, mode, r):
    base, adapter = make_pair(tmp_path, shape, mode, r)
    out = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", out, "--dtype", "fp32", "--quiet") is None
    merged, base_sd = load_state_dict(out), load_state_dict(base)
    assert list(merged) == list(base_sd) and all(v.dtype == torch.float32 for v in merged.values())
    ids = torch.randint(0, ALL[shape].vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = adapter_model(base, adapter)(torch.tensor([ids]))[0][0]
        plain = from_checkpoint(base, dtype=torch.float32, op="cpu")(torch.tensor([ids]))[0][0]
    theirs = package_logits(out, ids)
    # fp32 on both sides, summed in other orders: test_model_parity's bound (measured there 3e-6).
    assert (theirs - ours).abs().max() <= 1e-4
    assert (plain - ours).abs().max() > 1e-2          # the adapter does change the model


def _report(text):
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s+(\S+)\s+(\d+)\s+(\S+)\s+(\S+)$", line)
        if m and m.group(1) != "kind":
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    return rows


def test_bf16_merge_is_within_bf16_tolerance_and_the_report_is_right(tmp_path, capsys):
    base, adapter = make_pair(tmp_path, "deep", "bone", 64)
    out = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", out, "--quiet") is None
    printed = _report(capsys.readouterr().out)
    merged, base_sd, ad = load_state_dict(out), load_state_dict(base), load_state_dict(adapter)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())

    # The report, computed directly: the exact merge from the bone definition dW[o, i] = bone[i mod r, o].
    sums, exact_sd = {}, {}
    for key, w in base_sd.items():
        w = w.double()
        name = key[:-len(".weight")]
        if f"{name}.bone" in ad:
            bone = ad[f"{name}.bone"].double()
            exact = w + bone[torch.arange(w.shape[1]) % bone.shape[0]].T
            kind = ".".join(name.split(".")[2:])
        elif key in ad:
            exact, kind = ad[key].double(), ("time" if ".time_" in key else "ln")
        else:
            assert torch.equal(merged[key], base_sd[key])      # untouched tensors are copied bit for bit
            exact_sd[key] = w
            continue
        exact_sd[key] = exact
        s = sums.setdefault(kind, [0, 0.0, 0.0, 0.0])
        s[0] += 1
        s[1] += w.pow(2).sum().item()
        s[2] += (exact - w).pow(2).sum().item()
        s[3] += (merged[key].double() - exact).pow(2).sum().item()
    assert set(printed) == set(sums)
    for kind, (n, w_sq, upd_sq, lost_sq) in sums.items():
        p_n, p_rel, p_lost = printed[kind]
        assert p_n == n
        assert p_rel == pytest.approx((upd_sq / w_sq) ** 0.5, rel=2e-3)
        assert p_lost == pytest.approx((lost_sq / upd_sq) ** 0.5, rel=2e-3)
        assert 0 < p_lost < 0.1       # bf16 rounds some of it away, but keeps most

    # The file holds the exact merge rounded to bf16: the runtime must give what our model gives
    # on those weights (with the runtime's one extra rounding, ln0 folded into emb in bf16) ...
    rounded = RWKV6.from_state_dict({k: exact_sd[k].to(torch.bfloat16).float() for k in base_sd}, op="cpu").eval()
    rounded.blocks[0].ln0.register_forward_hook(lambda module, args, out: out.bfloat16().float())
    ids = torch.randint(0, SHAPES["deep"].vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = rounded(torch.tensor([ids]))[0][0]
        ours = adapter_model(base, adapter)(torch.tensor([ids]))[0][0]
        plain = RWKV6.from_checkpoint(base, dtype=torch.float32, op="cpu")(torch.tensor([ids]))[0][0]
    theirs = runtime_logits(out, ids)
    assert (theirs - expected).abs().max() <= 1e-4     # as above: fp32 on the same (rounded) weights
    # ... and the rounding costs little next to what the adapter does.
    assert (theirs - ours).abs().max() < 0.1 * (plain - ours).abs().max()


def test_report_warns_when_bf16_loses_the_update(tmp_path, capsys):
    base, adapter = make_pair(tmp_path, "small", "bone", 32, base_dtype="fp32")
    sd = load_state_dict(adapter, mmap=False)
    sd = {k: (v * 1e-4 if k.endswith(".bone") else v) for k, v in sd.items()}   # updates far below bf16's step
    atomic_save(sd, adapter)
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", tmp_path / "m.pth", "--dtype", "bf16",
                     "--quiet") is None
    out = capsys.readouterr().out
    assert len(re.findall("WARNING", out)) == 1, out          # one summary line, not one per kind
    assert re.search(r"WARNING: bf16 loses more than 10% of the update of 8 kinds \(att.receptance \d+%, .*att.key "
                     r"\d+%.*\): merge with --dtype auto \(the default\) or fp32 to keep it.", out), out
    assert _report(out)["att.key"][2] > 0.5


@pytest.mark.parametrize("scale, chosen", [(1e-2, "fp16"), (1e-4, "fp32"), (1.0, "bf16")])
def test_the_default_dtype_keeps_the_update(tmp_path, capsys, scale, chosen):
    """--dtype auto: the narrowest of bf16, fp16, fp32 that keeps >= 90% of every kind's update,
    said in one line; the report then shows no kind losing more than 10%, and no warning."""
    base, adapter = make_pair(tmp_path, "small", "bone", 32, base_dtype="bf16")
    sd = load_state_dict(adapter, mmap=False)
    atomic_save({k: (v * scale if k.endswith(".bone") else v) for k, v in sd.items()}, adapter)
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", tmp_path / "m.pth", "--quiet") is None
    out = capsys.readouterr().out
    assert f"merge: wrote {chosen} (" in out and "WARNING" not in out, out
    assert all(lost <= 0.1 for *_, lost in _report(out).values()), out
    assert {v.dtype for v in load_state_dict(tmp_path / "m.pth").values()} == {DTYPES[chosen]}


def snapshot(directory):
    return {p: (os.path.getsize(os.path.join(directory, p)), os.path.getmtime(os.path.join(directory, p)),
                open(os.path.join(directory, p), "rb").read() if os.path.isfile(os.path.join(directory, p)) else None)
            for p in sorted(os.listdir(directory))}


def refused(tmp_path, argv, pattern):
    """Run merge.py with argv; it must exit with one sentence matching pattern and leave tmp_path as it was."""
    before = snapshot(tmp_path)
    message = run_merge(*argv)
    assert isinstance(message, str) and message.startswith("merge.py: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message and message.rstrip().endswith("."), message
    assert snapshot(tmp_path) == before
    return message


@pytest.fixture
def pair(tmp_path):
    return make_pair(tmp_path, "small", "bone", 32)


def test_missing_and_unreadable_files_are_refused(tmp_path, pair):
    base, adapter = pair
    out = tmp_path / "out.pth"
    refused(tmp_path, ["--base_model", tmp_path / "nope.pth", "--adapter", adapter, "--output", out], "nope.pth does not exist")
    refused(tmp_path, ["--base_model", base, "--adapter", tmp_path / "nope.pth", "--output", out], "nope.pth does not exist")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    refused(tmp_path, ["--base_model", tmp_path / "garbage.pth", "--adapter", adapter, "--output", out],
            r"garbage.pth is not a PyTorch checkpoint \(.pth\) file: give an RWKV model file\.")
    refused(tmp_path, ["--base_model", base, "--adapter", tmp_path / "garbage.pth", "--output", out],
            r"garbage.pth is not a PyTorch checkpoint \(.pth\) file: give an adapter file written by train.py")
    refused(tmp_path, ["--base_model", base, "--adapter", base, "--output", out], "it is not an adapter file")
    refused(tmp_path, ["--base_model", adapter, "--adapter", adapter, "--output", out],
            r"is an adapter file, not a model: give it as --adapter and the base model as --base_model\.")


def test_an_adapter_for_another_model_is_refused(tmp_path, pair):
    _, adapter = pair
    other, _, _ = save_random_checkpoint(tmp_path, "deep", 3)
    refused(tmp_path, ["--base_model", other, "--adapter", adapter, "--output", tmp_path / "o.pth"],
            r"was made for a model with .*n_embd=64.* but this model has .*n_embd=96")


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd.update({"blocks.0.att.key.extra": torch.zeros(3)}), "belongs to no adapter or train part"),
    (lambda sd: sd.update({"blocks.0.att.key.bone": torch.zeros(16, 64)}), r"has blocks.0.att.key.bone of shape \[16, 64\]"),
    (lambda sd: sd.pop("blocks.1.ffn.value.bone"), "lacks blocks.1.ffn.value.bone"),
    (lambda sd: sd.pop("blocks.0.att.time_decay"), "lacks blocks.0.att.time_decay"),
    (lambda sd: sd.update({"blocks.0.att.time_decay": torch.zeros(1, 1, 32)}), "has blocks.0.att.time_decay of shape"),
])
def test_an_inconsistent_adapter_is_refused(tmp_path, pair, edit, pattern):
    base, adapter = pair
    sd = dict(load_state_dict(adapter, mmap=False))
    edit(sd)
    atomic_save(sd, adapter)
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "o.pth"], pattern)


def test_output_paths_that_would_lose_something_are_refused(tmp_path, pair):
    base, adapter = pair
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", base], "is the base model itself")
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "." / os.path.basename(base)],
            "is the base model itself")
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", adapter], "is the adapter file itself")
    (tmp_path / "existing.pth").write_bytes(b"keep me")
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "existing.pth"],
            "already exists: pass --overwrite")
    (tmp_path / "adir").mkdir()
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "adir"], "is a directory")
    if not torch.cuda.is_available():
        refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "o.pth", "--device", "cuda"],
                "no CUDA GPU")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_refused(tmp_path, pair):
    base, adapter = pair
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", locked / "o.pth"], "Cannot write to")
    finally:
        locked.chmod(0o700)


def test_a_full_disk_is_refused_before_writing(tmp_path, pair, monkeypatch):
    import shutil
    from collections import namedtuple
    base, adapter = pair
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "o.pth"],
            r"The merged model needs 0\.\d MB but .* has 0\.0 MB free: free some space")


def test_nan_in_the_adapter_is_refused_unless_asked(tmp_path, pair):
    base, adapter = pair
    sd = dict(load_state_dict(adapter, mmap=False))
    sd["blocks.1.att.value.bone"][3, 5] = float("nan")
    atomic_save(sd, adapter)
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", tmp_path / "o.pth"],
            "blocks.1.att.value.weight holds NaN or Inf: nothing was written")
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", tmp_path / "o.pth", "--no-safe_merge",
                     "--quiet") is None
    assert torch.isnan(load_state_dict(tmp_path / "o.pth")["blocks.1.att.value.weight"]).any()


def test_an_overflowing_merge_leaves_the_old_output_alone(tmp_path, pair):
    base, adapter = pair
    out = tmp_path / "o.pth"
    out.write_bytes(b"the previous merge")
    sd = dict(load_state_dict(adapter, mmap=False))
    sd["blocks.1.ffn.key.bone"][0, 0] = 1e6            # finite in the adapter, Inf once cast to fp16
    atomic_save(sd, adapter)
    refused(tmp_path, ["--base_model", base, "--adapter", adapter, "--output", out, "--dtype", "fp16", "--overwrite",
                       "--quiet"], "Merging blocks.1.ffn.key.weight gives NaN or Inf in float16: nothing was written")
    assert out.read_bytes() == b"the previous merge"


def test_overwrite_and_the_older_repository_s_flag_and_files(tmp_path, pair):
    base, adapter = pair
    out, old_out = tmp_path / "o.pth", tmp_path / "old.pth"
    out.write_bytes(b"old")
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", out, "--overwrite", "--quiet") is None
    assert list(load_state_dict(out)) == list(load_state_dict(base))
    # An adapter file as the older repository wrote it: no metadata, every key under "model.".
    sd = dict(load_state_dict(adapter, mmap=False))
    sd.pop("__bone_meta__")
    legacy = tmp_path / "legacy.pth"
    atomic_save({"model." + k: v for k, v in sd.items()}, legacy)
    assert run_merge("--base_model", base, "--lora_checkpoint", legacy, "--output", old_out, "--quiet") is None
    new, old = load_state_dict(out), load_state_dict(old_out)
    assert all(torch.equal(new[k], old[k]) for k in new)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_the_command_line_says_one_sentence_and_no_traceback(tmp_path, pair):
    base, adapter = pair
    p = subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), "--base_model", base, "--adapter", adapter,
                        "--output", base], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "is the base model itself" in p.stderr


def test_merge_bone_sh_and_verify(tmp_path, pair):
    base, adapter = pair
    out = tmp_path / "sub" / "merged.pth"
    out.parent.mkdir()      # merge.py makes no directory (tests/test_first_hour.py)
    env = dict(os.environ, BASE=str(base), ADAPTER=str(adapter), OUTPUT=str(out))
    p = subprocess.run(["sh", os.path.join(ROOT, "scripts", "merge_bone.sh"), "--dtype", "fp32", "--verify"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    m = re.search(r"max \|logit difference\| .*?: (\S+) \(the adapter itself moves the logits by up to (\S+)\)", p.stdout)
    assert m and float(m.group(1)) <= 1e-4 and float(m.group(2)) > 1e-2, p.stdout
    assert "continues the prompt (greedy)" in p.stdout
    assert "merging: 100%" in p.stderr


def test_stream_checkpoint_writes_what_torch_save_writes(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(4, 3, 4).half()[1:3]}
    atomic_save({k: v.clone() for k, v in sd.items()}, tmp_path / "ref.pth")
    stream_checkpoint(tmp_path / "ours.pth", {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, lambda k: sd[k])
    ref, ours = zipfile.ZipFile(tmp_path / "ref.pth"), zipfile.ZipFile(tmp_path / "ours.pth")
    assert ref.namelist() == ours.namelist()
    assert {n for n in ref.namelist() if ref.read(n) != ours.read(n)} <= {"archive/.data/serialization_id"}
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "ours.pth", weights_only=True, mmap=mmap)
        assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_stream_checkpoint_leaves_nothing_when_it_fails(tmp_path):
    (tmp_path / "o.pth").write_bytes(b"old")

    def produce(key):
        if key == "b":
            raise RuntimeError("disk on fire")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match="disk on fire"):
        stream_checkpoint(tmp_path / "o.pth", {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}, produce)
    assert os.listdir(tmp_path) == ["o.pth"] and (tmp_path / "o.pth").read_bytes() == b"old"


def test_verify_verdict_fails_a_lossy_merge(tmp_path, capsys):
    """--verify: PASS for the default (auto) merge of a small update, FAIL and exit 1 when bf16 is
    forced and rounds most of that update away; the default prompt is the neutral one."""
    base, adapter = make_pair(tmp_path, "small", "bone", 32, train_parts=(), base_dtype="bf16")
    sd = load_state_dict(adapter, mmap=False)
    atomic_save({k: (v * 1e-4 if k.endswith(".bone") else v) for k, v in sd.items()}, adapter)
    common = ["--base_model", base, "--adapter", adapter, "--quiet", "--verify"]
    assert run_merge(*common, "--output", tmp_path / "auto.pth") is None
    out = capsys.readouterr().out
    assert "verify: PASS: the merged file reproduces base + adapter" in out, out
    assert run_merge(*common, "--output", tmp_path / "bf16.pth", "--dtype", "bf16") == 1
    out = capsys.readouterr().out
    assert "verify: FAIL: the merged file does NOT reproduce base + adapter" in out, out
    assert "merge again with --dtype fp32" in out
