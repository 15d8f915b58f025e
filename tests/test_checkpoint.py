"""Loading, validating and writing official-layout checkpoints."""
import os
import pickle

import pytest
import torch

from src.checkpoint import atomic_save, load_checkpoint, make_checkpoint, save_checkpoint
from src.config import CheckpointError, RWKV6Config
from src.model import RWKV6
from tests.tiny import SHAPES, random_state_dict, rwkv_runtime, save_random_checkpoint


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_size_is_read_off_the_file(tmp_path, name):
    path, cfg, _ = save_random_checkpoint(str(tmp_path), name)
    model = RWKV6.from_checkpoint(path)
    assert model.config == cfg
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(cfg.shapes().items())


def test_large_model_lora_sizes_are_read_off_the_file(tmp_path):
    """7B/14B files use wider time-mix and decay LoRAs (64 and 128); nothing is assumed."""
    cfg = RWKV6Config(vocab_size=100, n_embd=64, n_layer=1, dim_att=64, dim_ffn=224, head_size=16,
                      mix_lora=64, decay_lora=128)
    save_checkpoint(random_state_dict(cfg), tmp_path / "wide.pth", "bf16")
    assert RWKV6.from_checkpoint(tmp_path / "wide.pth").config == cfg


def test_state_dict_round_trip_is_exact(tmp_path):
    path, cfg, sd = save_random_checkpoint(str(tmp_path), "small")
    model = RWKV6.from_checkpoint(path)
    save_checkpoint(model.state_dict(), tmp_path / "again.pth", "fp32")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert list(again) == list(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_make_checkpoint_writes_a_bf16_file_the_runtime_runs(tmp_path):
    path = str(tmp_path / "fresh.pth")
    cfg = make_checkpoint(path, vocab_size=128, n_embd=64, n_layer=2, head_size=32)
    sd = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert RWKV6.from_checkpoint(path).config == cfg
    logits, _ = rwkv_runtime(path).forward([1, 2, 3], None)
    assert torch.isfinite(logits).all()


def write(tmp_path, sd, name="bad.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def refusal(path):
    with pytest.raises(CheckpointError) as e:
        RWKV6.from_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message, "one sentence, not a dump"
    return message


@pytest.fixture
def good():
    return random_state_dict(SHAPES["small"])


def test_missing_key(tmp_path, good):
    del good["blocks.1.att.gate.weight"]
    assert "lacks blocks.1.att.gate.weight" in refusal(write(tmp_path, good))


def test_missing_ln0(tmp_path, good):
    del good["blocks.0.ln0.weight"]
    assert "blocks.0.ln0.weight" in refusal(write(tmp_path, good))


def test_wrong_shape(tmp_path, good):
    good["blocks.1.ffn.value.weight"] = good["blocks.1.ffn.value.weight"][:, :100]
    message = refusal(write(tmp_path, good))
    assert "blocks.1.ffn.value.weight" in message and "[64, 100]" in message


def test_extra_key(tmp_path, good):
    good["blocks.1.att.key.bone"] = torch.zeros(64, 64)
    assert "unexpected keys blocks.1.att.key.bone" in refusal(write(tmp_path, good))


def test_rwkv5_file(tmp_path):
    sd = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_mix_k": torch.zeros(1, 1, 8),
          "blocks.0.att.ln_x.weight": torch.zeros(8), "blocks.0.att.time_faaaa": torch.zeros(2, 4)}
    assert "RWKV-5" in refusal(write(tmp_path, sd))


def test_rwkv7_file(tmp_path):
    sd = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.x_r": torch.zeros(1, 1, 8),
          "blocks.0.att.w0": torch.zeros(1, 1, 8), "blocks.0.att.r_k": torch.zeros(2, 4)}
    assert "RWKV-7" in refusal(write(tmp_path, sd))


def test_not_a_dict(tmp_path):
    assert "not a dict of tensors" in refusal(write(tmp_path, [torch.zeros(3)]))


def test_missing_file(tmp_path):
    assert "does not exist" in refusal(tmp_path / "nowhere.pth")


def test_garbage_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    assert "junk.pth is not a PyTorch checkpoint (.pth) file: give an RWKV model file." in refusal(tmp_path / "junk.pth")


class Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_file_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": Payload()}, f)
    assert "could not be read" in refusal(path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "keep.pth"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"a": lambda: None}, path)   # cannot be pickled: fails mid-write
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["keep.pth"], "no temporary file left behind"


def test_load_checkpoint_returns_config(tmp_path):
    path, cfg, _ = save_random_checkpoint(str(tmp_path), "deep")
    sd, read = load_checkpoint(path)
    assert read == cfg and read.n_layer == 3 and read.dim_ffn == 200
