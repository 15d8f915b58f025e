"""bench/preference.py --tiny: three train.py runs (DPO, SimPO, ORPO), the table of held-out preference
accuracy beside the base's, the plot; each printed accuracy recomputed here from the plain logits.
The accuracy the full run reaches is a bench figure (docs/training.md), not asserted here."""
import json
import math
import os
import re
import subprocess
import sys

import torch

from src import bone, family
from src.data import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"(\d+\.\d{3})"


def plain_accuracy(model, path, n, ctx_len):
    """The first n pairs' accuracy from the whole logits: chosen's summed log-prob > rejected's."""
    ds = make_dataset(path, "preference", ctx_len, 65536, seed=0)
    idx, targets, mask = (torch.stack(t).flatten(0, 1) for t in zip(*(ds[i] for i in range(n))))
    with torch.no_grad():
        lp = torch.log_softmax(model(idx)[0].double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    logps = (lp * mask.double()).sum(1).view(-1, 2)
    return (logps[:, 0] > logps[:, 1]).double().mean().item()


def test_tiny_run_prints_the_table_and_writes_the_plot(tmp_path):
    p = subprocess.run([sys.executable, "bench/preference.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out = p.stdout
    assert not re.search(r"\bnan\b", out, re.I), out
    base = float(re.search(rf"^base: held-out preference accuracy {NUMBER} on (\d+) pairs$", out, re.M).group(1))
    final = {o: float(re.search(rf"^{o}: 4 steps in \d+ s, held-out preference accuracy {NUMBER}$", out, re.M).group(1))
             for o in ("dpo", "simpo", "orpo")}
    assert "| step | base | DPO | SimPO | ORPO |" in out, out
    rows = re.findall(rf"^\| (\d+) \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", out, re.M)
    assert [int(r[0]) for r in rows] == [2, 4], out
    assert all(float(r[1]) == base for r in rows)     # the base's figure beside every step's
    assert [float(x) for x in rows[-1][2:]] == list(final.values())
    assert all(0 <= float(x) <= 1 for r in rows for x in r[1:])

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["held_out_pairs"] == 8 and all(math.isfinite(s) for s in results["train_seconds"].values())
    png = (tmp_path / "preference.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # The measure, recomputed: the base, then each objective's last adapter on it.
    from bench.preference import CTX_LEN
    held_out = str(tmp_path / "held_out.jsonl")
    model = family.from_checkpoint(str(tmp_path / "base.pth"), dtype=torch.float32, op="cpu")
    assert round(plain_accuracy(model, held_out, 8, CTX_LEN), 3) == base
    for objective, accuracy in final.items():
        bone.load_adapter(model, str(tmp_path / objective / "adapter-0000004.pth"))
        assert round(plain_accuracy(model, held_out, 8, CTX_LEN), 3) == accuracy, objective
