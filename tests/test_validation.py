"""train.py's validation loss and loggers, end to end on the CPU (DeepSpeed, gloo): val_loss at the
right steps equals the plain full-sequence loss of the saved adapter on the same windows;
--val_split's documents never reach training; --logger tensorboard writes the loss; bad flags
are one sentence."""
import csv
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train as train_script
from src import bone
from src.data import held_out, make_dataset, write_binidx
from src.model import RWKV6
from tests.test_train import setup, train  # noqa: F401  (setup is a fixture)

WINDOWS = 8     # --val_tokens 256 at --ctx_len 32


def log_rows(out):
    with open(out / "log.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def direct_val_loss(model_path, adapter, dataset):
    """The token-mean loss of base + adapter on the dataset's first WINDOWS samples: plain
    logits of the whole window, float64 cross-entropy (not the training loss code)."""
    model = bone.load_adapter(RWKV6.from_checkpoint(model_path, dtype=torch.float32, op="cpu"), adapter).eval()
    idx, targets, mask = (torch.stack(t) for t in zip(*(dataset[i] for i in range(WINDOWS))))
    with torch.no_grad():
        logits = model(idx)[0].double()
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return ((losses * mask.flatten()).sum() / mask.sum()).item()


def test_val_data_loss_at_the_right_steps_is_the_saved_adapters(setup, tmp_path):  # noqa: F811
    d, model = setup
    write_binidx(str(d / "val"), [list((np.arange(200) * 7 + s) % 50 + 1) for s in range(40, 50)])
    # Two processes: each computes the loss over half the windows; the sums are reduced.
    out = train(setup, tmp_path, "--val_data", str(d / "val"), "--val_every", "3", "--val_tokens", "256",
                "--save_every_steps", "3", steps=8, devices=2, micro_bsz=2)
    rows = log_rows(tmp_path)
    assert sorted(rows) == list(range(1, 9))
    val = {s: float(r["val_loss"]) for s, r in rows.items() if r["val_loss"]}
    assert sorted(val) == [3, 6, 8]          # every 3 steps, and at the end
    dataset = make_dataset(str(d / "val"), "binidx", 32, 260, seed=1)
    for step, loss in val.items():
        adapter = tmp_path / f"adapter-{step:07d}.pth"
        # fp32 losses of order 5, a mean over the windows computed in another grouping; the log's 1e-6
        # rounding of what it prints, and a few eps of the sums, are well inside 1e-5 relative.
        assert loss == pytest.approx(direct_val_loss(model, adapter, dataset), rel=1e-5, abs=1e-6), step
    assert val[8] < val[3]                   # the adapter learns the pattern the held-out data shares
    assert f"validation loss on {WINDOWS} windows: {val[8]:.4f} at step 8" in out


def test_val_split_holds_whole_documents_out_and_tensorboard_gets_the_loss(setup, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d, model = setup
    # Document k holds only ids 6k+1 .. 6k+6: every window says which documents it came from.
    docs = [list((np.arange(300) * 5 + k) % 6 + 6 * k + 1) for k in range(40)]
    write_binidx(str(d / "docs"), docs)
    out = train(setup, tmp_path, "--data_file", str(d / "docs"), "--val_split", "0.25", "--val_tokens", "256",
                "--logger", "tensorboard", steps=8)
    held = held_out(40, 0.25, seed=1)
    assert len(held) == 10
    doc_of = lambda ids: set(((ids.numpy() - 1) // 6).tolist())  # noqa: E731
    # What train.py trains on: the other 30 documents' tokens only ...
    assert "40 documents, all but the 10 held out for validation, 9,000 tokens" in out
    assert "40 documents, the 10 held out for validation, 3,000 tokens" in out
    train_set = make_dataset(str(d / "docs"), "binidx", 32, 260, seed=1, val_split=0.25)
    seen = set().union(*(doc_of(train_set[i][0]) | doc_of(train_set[i][1]) for i in range(2000)))
    assert seen == set(range(40)) - set(held.tolist())   # every other document is sampled, no held-out one
    # ... and what it validates on: the held-out ones, whose loss it reports for the saved adapter.
    val_set = make_dataset(str(d / "docs"), "binidx", 32, 260, seed=1, val_split=0.25, part="val")
    assert set().union(*(doc_of(val_set[i][0]) for i in range(WINDOWS))) <= set(held.tolist())
    rows = log_rows(tmp_path)
    assert [s for s, r in rows.items() if r["val_loss"]] == [8]
    assert float(rows[8]["val_loss"]) == pytest.approx(
        direct_val_loss(model, tmp_path / "adapter-0000008.pth", val_set), rel=1e-5, abs=1e-6)
    # TensorBoard: the loss of every step, at log.csv's step numbers, and the validation loss.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert tb.keys() == rows.keys()
    assert all(tb[s] == pytest.approx(float(rows[s]["loss"]), abs=1e-6) for s in tb)
    (val,) = events.Scalars("val_loss")
    assert val.step == 8 and val.value == pytest.approx(float(rows[8]["val_loss"]), abs=1e-6)


def test_bad_validation_and_logger_flags_are_one_sentence(setup, tmp_path, monkeypatch):  # noqa: F811
    d, model = setup
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cases = [(["--val_data", str(d / "data"), "--val_split", "0.1"], "--val_data and --val_split both name"),
             (["--val_split", "1.5"], "--val_split 1.5 is not a fraction"),
             (["--val_every", "5"], "--val_every needs validation data"),
             (["--val_split", "0.1", "--val_tokens", "8"], "--val_tokens 8 is less than one window"),
             (["--logger", "mlflow"], "Unknown --logger 'mlflow'")]
    if importlib.util.find_spec("wandb") is None:
        cases.append((["--logger", "wandb"], "--logger wandb needs the wandb package, which is not installed"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            train_script.main(["--load_model", model, "--data_file", str(d / "data"), "--proj_dir", str(tmp_path / "p"),
                               "--accelerator", "cpu", "--ctx_len", "32", *extra])
        assert isinstance(e.value.code, str) and message in e.value.code, (extra, e.value.code)
        assert not (tmp_path / "p").exists()       # refused before anything was written
