"""The README's "Fine-tune your own checkpoint" recipe, run as written: its shell block is read
out of README.md and run from a copy of the repository's layout (the user stands in the clone),
with only the sizes shrunk (a 2-layer World-vocabulary model under the real checkpoint's name,
a few steps of 32 tokens), so that a recipe that no longer works fails here."""
import json
import os
import re
import shutil
import subprocess

import torch

from src.checkpoint import load_state_dict, make_checkpoint
from tests.test_train import ROOT, free_port

# What the test changes in the recipe: the sizes only (the commands and paths stay as written).
SHRINK = {"CTX_LEN": "32", "MICRO_BSZ": "2", "EPOCH_STEPS": "3", "EPOCH_COUNT": "2", "LR_INIT": "1e-3",
          "LR_FINAL": "1e-3", "BONE_R": "32"}


def recipe():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Fine-tune your own checkpoint", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_readme_recipe_works_as_written(tmp_path):
    script = recipe()
    model = re.search(r"MODEL=(\S+\.pth)", script).group(1)
    steps = int(re.search(r"EPOCH_STEPS=(\d+)", script).group(1)) * int(re.search(r"EPOCH_COUNT=(\d+)", script).group(1))
    assert f"adapter-{steps:07d}.pth" in script, "the merge step names the run's last adapter"
    for key, value in SHRINK.items():
        script, n = re.subn(rf"\b{key}=\S+", f"{key}={value}", script)
        assert n == 1, key
    script = script.replace(f"adapter-{steps:07d}", f"adapter-{3 * 2:07d}")
    # The user's clone: the code, no data and no out/ yet.
    clone = tmp_path / "clone"
    def left_out(directory, names):     # the clone's own out/ and data/, not src/data/
        top = {"out", "data"} if os.path.samefile(directory, ROOT) else set()
        return [n for n in names if n in top or n in (".git", "__pycache__", ".pytest_cache")]
    shutil.copytree(ROOT, clone, ignore=left_out)
    make_checkpoint(str(clone / model), vocab_size=65536, n_embd=64, n_layer=2, head_size=32, seed=0)
    with open(clone / "mydata.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"Story {i}: the cat sat on the mat and counted {i} stars. " * 3}) + "\n")
    env = dict(os.environ, ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    p = subprocess.run(["sh", "-e", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "verify: PASS" in out, out[-2000:]
    merged = load_state_dict(clone / re.search(r"--output (\S+)", script).group(1))
    base = load_state_dict(clone / model)
    assert list(merged) == list(base)         # the official layout: the base's keys in its order
    assert not torch.equal(merged["blocks.0.att.key.weight"].float(), base["blocks.0.att.key.weight"].float())
