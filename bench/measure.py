"""What the file benchmarks (merge.py, export.py) measure: one child process's wall time and peak
resident set, against a plain torch.load + torch.save of the same file and an idle `import torch`."""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = "import sys, torch; torch.save(torch.load(sys.argv[1], weights_only=True), sys.argv[2])"
IDLE = "import torch"


def run(argv, **kwargs):
    """(wall seconds, peak RSS bytes) of one child process (ru_maxrss from wait4: it counts the
    pages of a memory-mapped file the child touches as well as its own allocations)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, **kwargs)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(argv[:3])}... failed with exit code {code}")
    return wall, usage.ru_maxrss * 1024


def gb(b):
    return f"{b / 1e9:.2f} GB"
