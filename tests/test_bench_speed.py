"""bench/speed.py runs (a tiny model, one training step per family, a few generated tokens against the `rwkv`
package) and prints its ratios; the figures themselves are bench results, not something a test can hold a
machine to."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_prints_every_ratio():
    p = subprocess.run([sys.executable, "bench/speed.py", "--tiny", "--threads", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for family in ("RWKV-6", "RWKV-7"):
        assert re.search(rf"^{family} training at \d+\.\d\dx of the matmul rate", p.stdout, re.M), p.stdout
    assert re.search(r"^RWKV-7 / RWKV-6 training tokens/s: \d+\.\d\dx", p.stdout, re.M), p.stdout
    for family in ("RWKV-6", "RWKV-7"):
        assert re.search(rf"^{family} generation per token: \d+\.\d\dx of the rwkv package", p.stdout, re.M), p.stdout
        assert re.search(rf"^{family} prefill faster than token-by-token: \d+\.\dx \(\d+\.\dx the rwkv package's",
                         p.stdout, re.M), p.stdout
    assert "nan" not in p.stdout, p.stdout
