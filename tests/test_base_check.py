"""The base an adapter was trained on is caught (src/bone/base_hash.py): merge.py, generate.py and
train.py --bone_load refuse another base, and say so when it is this adapter already merged, with
one sentence before any work; --allow_other_base lets it through with a note; a file that records
no fingerprint still loads, with a note. And an RWKV-7 adapter file names its family in its format
field, while RWKV-7 files that say rwkv6-adapter still load."""
import copy
import re

import pytest
import torch

import generate
import train
from src.bone import BoneConfig, apply_adapters, check_base, load_adapter, read_adapter, save_adapter
from src.checkpoint import atomic_save, load_checkpoint, load_state_dict, save_checkpoint
from src.family import from_checkpoint
from tests.test_generate import world  # noqa: F401 (a fixture: World base, adapter, their fp32 merge)
from tests.test_merge import make_pair, refused, run_merge
from tests.test_no_surprises import args
from tests.test_no_surprises import refused as refused_cli
from tests.test_train import setup  # noqa: F401 (a fixture: a small fp32 base, seed 0, and data)
from tests.tiny import save_random_checkpoint

MERGED = (r"looks like .*adapter-\w+-\w+\.pth already merged into its base \(its weights are the recorded base's plus "
          r"this adapter's update\): give the original base model, or pass --allow_other_base")
OTHER = (r"is not the base model .*adapter-\w+-\w+\.pth was trained on \(its weights differ from the fingerprint the "
         r"adapter records\): give that base, or pass --allow_other_base")
NO_FINGERPRINT = r"records no base fingerprint: cannot check that .* is the base it was trained on"


def merged_pair(tmp_path, shape="small", mode="bone", dtype="auto"):
    base, adapter = make_pair(tmp_path, shape, mode, 8 if mode == "lora" else 32)
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", dtype, "--quiet") is None
    return base, adapter, str(merged)


def without_fingerprint(adapter, path, **meta):
    """The adapter as written before base_weights existed (with `meta` changed)."""
    sd = dict(load_state_dict(adapter, mmap=False))
    sd["__bone_meta__"] = {k: v for k, v in {**sd["__bone_meta__"], **meta}.items() if k != "base_weights"}
    atomic_save(sd, path)
    return str(path)


@pytest.mark.parametrize("shape, mode, dtype", [("small", "bone", "auto"), ("small", "bat", "fp32"),
                                                ("small", "lora", "fp16"), ("small7", "bone", "bf16")])
def test_merge_refuses_the_adapter_already_merged(tmp_path, shape, mode, dtype):
    _, adapter, merged = merged_pair(tmp_path, shape, mode, dtype)
    refused(tmp_path, ["--base_model", merged, "--adapter", adapter, "--output", tmp_path / "twice.pth"], MERGED)


def test_merge_refuses_another_base_of_the_same_shape_unless_allowed(tmp_path, capsys):
    _, adapter = make_pair(tmp_path, "small", "bone", 32)
    other, _, _ = save_random_checkpoint(str(tmp_path), "small", seed=5, dtype="bf16")
    refused(tmp_path, ["--base_model", other, "--adapter", adapter, "--output", tmp_path / "o.pth"], OTHER)
    capsys.readouterr()
    assert run_merge("--base_model", other, "--adapter", adapter, "--output", tmp_path / "o.pth", "--quiet",
                     "--allow_other_base") is None
    err = capsys.readouterr().err
    assert "merge: note: " in err and "is not the base model" in err and "applying the adapter to it anyway" in err, err


def test_generate_refuses_the_merged_file_with_its_adapter_unless_allowed(world, tmp_path, capsys):  # noqa: F811
    base, adapter, merged = world
    argv = ["--model", merged, "--adapter", adapter, "--prompt", "Hi", "--max_tokens", "2", "--temperature", "0"]
    message = refused_cli(argv, MERGED, tmp_path, main=generate.main)
    assert message.startswith("generate.py: ")
    generate.main(argv + ["--allow_other_base"])
    assert "already merged into its base" in capsys.readouterr().err
    generate.main(["--model", base, "--adapter", adapter, "--prompt", "Hi", "--max_tokens", "2", "--temperature", "0"])
    assert capsys.readouterr().err == ""        # the right base: not a word


def test_bone_load_onto_another_base_is_refused_unless_allowed(setup, tmp_path, capsys):  # noqa: F811
    # setup's base is small seed 0 in fp32; this adapter's base is small seed 0 rounded to bf16: another base.
    _, adapter = make_pair(tmp_path, "small", "bone", 16)
    out = tmp_path / "o"
    refused_cli(args(setup, out, "--bone_load", adapter), OTHER, tmp_path)
    assert not out.exists()
    a = train.parse_args(args(setup, out, "--bone_load", adapter, "--allow_other_base"))
    train.check_bone_load(a)        # what check_args runs; the rest of a run is test_train's
    assert "train.py: note: " in capsys.readouterr().err
    # The older JSON form's bone_load is checked the same way.
    refused_cli(args(setup, out, "--bone_config", f'{{"bone_mode": "bone", "bone_r": 16, "bone_load": "{adapter}"}}'),
                OTHER, tmp_path)


def test_bone_load_onto_its_own_base_says_nothing(setup, tmp_path, capsys):  # noqa: F811
    _, model = setup
    m = from_checkpoint(model, op="cpu")
    apply_adapters(m, BoneConfig(r=16), verbose=False)
    save_adapter(m, tmp_path / "a.pth")
    train.check_bone_load(train.parse_args(args(setup, tmp_path / "o", "--bone_load", str(tmp_path / "a.pth"))))
    assert capsys.readouterr().err == ""


def test_a_file_without_the_fingerprint_loads_with_a_note(tmp_path, capsys):
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    old = without_fingerprint(adapter, tmp_path / "old.pth")
    assert run_merge("--base_model", base, "--adapter", old, "--output", tmp_path / "m.pth", "--quiet") is None
    err = capsys.readouterr().err
    assert "merge: note: " in err and "old.pth" in err, err
    assert re.search(NO_FINGERPRINT, err), err
    # The older repository's files (no metadata at all) too.
    sd = {k: v for k, v in load_state_dict(adapter, mmap=False).items() if k != "__bone_meta__"}
    atomic_save({"model." + k: v for k, v in sd.items()}, tmp_path / "legacy.pth")
    assert run_merge("--base_model", base, "--adapter", tmp_path / "legacy.pth", "--output", tmp_path / "m2.pth",
                     "--quiet") is None
    assert "legacy.pth records no base fingerprint" in capsys.readouterr().err


def test_the_same_weights_in_another_dtype_are_the_same_base(tmp_path, capsys):
    """The fingerprint is of the values (as fp32), not of the bytes: the bf16 base the adapter was
    trained on (held as fp32 in training) saved again as fp32 is still its base."""
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd, config = load_checkpoint(base, mmap=False)
    save_checkpoint(sd, tmp_path / "base32.pth", "fp32")
    assert check_base(adapter, load_checkpoint(tmp_path / "base32.pth")[0], config, "base32.pth") is None
    assert run_merge("--base_model", tmp_path / "base32.pth", "--adapter", adapter, "--output", tmp_path / "m.pth",
                     "--quiet") is None
    assert "note" not in capsys.readouterr().err


def test_the_fingerprint_is_of_the_base_before_quantization(tmp_path):
    pytest.importorskip("bitsandbytes")
    from src.quant import quantize_model
    base, _, _ = save_random_checkpoint(str(tmp_path), "small", 0, dtype="bf16")
    model = from_checkpoint(base, op="cpu")
    apply_adapters(model, BoneConfig(r=16), verbose=False)
    quantize_model(model, "nf4")
    save_adapter(model, tmp_path / "a.pth")
    sd, config = load_checkpoint(base)
    assert check_base(str(tmp_path / "a.pth"), sd, config, base) is None


def test_rwkv7_files_name_their_family_and_older_ones_still_load(tmp_path, capsys):
    base, adapter = make_pair(tmp_path, "small7", "bone", 16)
    assert read_adapter(adapter)[1]["format"] == "rwkv7-adapter"
    assert read_adapter(make_pair(tmp_path, "small", "bone", 16)[1])[1]["format"] == "rwkv6-adapter"
    # An RWKV-7 file written before the format named the family: rwkv6-adapter, no base fingerprint.
    old = without_fingerprint(adapter, tmp_path / "old7.pth", format="rwkv6-adapter")
    model = load_adapter(from_checkpoint(base, dtype=torch.float32, op="cpu"), old)
    assert torch.equal(model.blocks[0].att.key.bone, load_state_dict(adapter)["blocks.0.att.key.bone"])
    assert run_merge("--base_model", base, "--adapter", old, "--output", tmp_path / "m.pth", "--quiet") is None
    assert "old7.pth records no base fingerprint" in capsys.readouterr().err
    # A file whose format names RWKV-7 but whose fingerprint is RWKV-6's is damaged.
    x060 = make_pair(tmp_path, "small", "bone", 16)[1]
    sd = dict(load_state_dict(x060, mmap=False))
    sd["__bone_meta__"] = {**sd["__bone_meta__"], "format": "rwkv7-adapter"}
    atomic_save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"format 'rwkv7-adapter' names RWKV-7 but whose fingerprint is of an x060 "
                                         r"model: the file is damaged"):
        read_adapter(tmp_path / "odd.pth")


@pytest.mark.parametrize("change, outcome", [
    (lambda b: None, OTHER),
    (lambda b: b.update(probe={"blocks.9.att.key": [[0, 0, [1.0]]]}), OTHER),
    (lambda b: b["probe"]["blocks.0.att.key"][0].__setitem__(0, 10 ** 6), OTHER),
    (lambda b: b["probe"]["blocks.0.att.key"][0].__setitem__(2, [1e300] * 32), OTHER),
    (lambda b: b.update(scheme="rows1024-fp64-sha512"), None),     # a later scheme: not checked, a note
])
def test_a_damaged_fingerprint_is_one_sentence_or_a_note(tmp_path, change, outcome):
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd = dict(load_state_dict(adapter, mmap=False))
    meta = copy.deepcopy(sd["__bone_meta__"])
    meta["base_weights"]["sha256"] = "0" * 64      # not this base: the probe decides what is said
    change(meta["base_weights"])
    atomic_save({**sd, "__bone_meta__": meta}, tmp_path / "bad.pth")
    base_sd, config = load_checkpoint(base)
    if outcome is None:
        assert "records no base fingerprint" in check_base(str(tmp_path / "bad.pth"), base_sd, config, base)
        return
    with pytest.raises(ValueError, match=outcome.replace(r"adapter-\w+-\w+\.pth", "bad.pth")):
        check_base(str(tmp_path / "bad.pth"), base_sd, config, base)


def test_export_refuses_an_adapter_for_another_base_unless_allowed(tmp_path, capsys):
    """export.py --adapter A --model BASE checks BASE as merge.py does (bone.check_base): another base of the
    same shape (another seed) and the adapter already merged are one sentence each, merge.py's, with nothing
    written; --allow_other_base writes it with merge.py's note; the right base says nothing. The same for a
    trained state written alone (--format state)."""
    import export
    from tests.test_export import run_export
    from tests.test_merge import snapshot
    base, adapter = make_pair(tmp_path, "small", "lora", 8, train_parts=(), base_dtype="fp32")
    other, _, _ = save_random_checkpoint(str(tmp_path), "small", seed=5, dtype="fp32")
    merged = tmp_path / "merged.pth"
    assert run_merge("--base_model", base, "--adapter", adapter, "--output", merged, "--dtype", "fp32", "--quiet") is None
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    for model, pattern in ((other, OTHER), (merged, MERGED)):
        before = snapshot(tmp_path), snapshot(out)
        message = run_export("--adapter", adapter, "--model", model, "--format", "gguf", "--output", out / "a.gguf")
        assert isinstance(message, str) and message.startswith("export.py: ") and re.search(pattern, message), message
        assert "\n" not in message and message.endswith("."), message
        assert (snapshot(tmp_path), snapshot(out)) == before
    assert run_export("--adapter", adapter, "--model", other, "--format", "gguf", "--output", out / "a.gguf",
                      "--allow_other_base", "--quiet") is None
    err = capsys.readouterr().err
    assert re.search(r"export: note: .* is not the base model .* applying the adapter to it anyway, as "
                     r"--allow_other_base asks\.", err), err
    assert run_export("--adapter", adapter, "--model", base, "--format", "gguf", "--output", out / "b.gguf",
                      "--quiet") is None
    assert capsys.readouterr().err == "" and (out / "a.gguf").read_bytes() == (out / "b.gguf").read_bytes()
    # A state tune: its state alone, against another base.
    model = from_checkpoint(base, dtype=torch.float32, op="cpu")
    apply_adapters(model, BoneConfig(target_modules=[], train_parts=["state"]), verbose=False)
    save_adapter(model, tmp_path / "adapter-state-small.pth")
    with pytest.raises(SystemExit) as e:
        export.main(["--adapter", str(tmp_path / "adapter-state-small.pth"), "--model", other, "--format", "state",
                     "--output", str(out / "s.pth")])
    assert re.search(OTHER, e.value.code) and not (out / "s.pth").exists(), e.value.code
