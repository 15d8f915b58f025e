"""Register, spill and code-size figures of the CUDA kernels, from nvcc alone (no GPU needed).

`report(...)` compiles cuda/wkv6_cuda.cu (or `source=WKV7_SOURCE`, cuda/wkv7_cuda.cu) to a
cubin with `-Xptxas -v`, reads each kernel's registers, spill bytes and shared memory from
ptxas's report and its code size from the cubin's `.text.<kernel>` section (`readelf -S`).
tests/test_wkv6_cuda_build.py and tests/test_wkv7_cuda_build.py assert on them;
`python -m tests.ptxas [--op wkv6|wkv7] [--arch 90] [--N 64]` prints them (docs/wkv6.md, docs/wkv7.md).
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda")
CUDA_SOURCE = os.path.join(CUDA_DIR, "wkv6_cuda.cu")
WKV7_SOURCE = os.path.join(CUDA_DIR, "wkv7_cuda.cu")
KERNELS = ("wkv6_forward_kernel", "wkv6_backward_columns_kernel", "wkv6_backward_rows_kernel",
           "wkv7_forward_kernel", "wkv7_backward_kernel")


def cubin_command(nvcc, source, out, arch, head_size, flags=()):
    return [nvcc, "-cubin", "-std=c++20", "-O3", f"-arch=sm_{arch}", f"-D_N_={head_size}", "-Xptxas", "-v",
            *flags, "-o", str(out), str(source)]


def short_name(mangled):
    """'wkv6_forward_kernel<bf16>' from a mangled kernel name."""
    kernel = next(k for k in KERNELS if k in mangled)
    return f"{kernel}<{'bf16' if 'bfloat16' in mangled else 'fp32'}>"


def parse_ptxas(log):
    """{mangled kernel: {registers, spill_stores, spill_loads, stack, smem}} from `-Xptxas -v` output."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and current is not None:
            current.update(registers=int(m.group(1)), smem=int(m.group(2)))
    return kernels


def text_sizes(cubin, readelf="readelf"):
    """{mangled kernel: bytes of SASS} from the cubin's .text.<kernel> sections."""
    out = subprocess.run([readelf, "-SW", str(cubin)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        # [Nr] Name Type Address Off Size ...
        m = re.search(r"\]\s+\.text\.(\S+)\s+PROGBITS\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m:
            sizes[m.group(1)] = int(m.group(2), 16)
    return sizes


def report(arch=90, head_size=64, flags=(), nvcc=None, source=CUDA_SOURCE):
    """{short kernel name: figures}, or raises CalledProcessError with the compiler output."""
    nvcc = nvcc or shutil.which("nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernels.cubin")
        run = subprocess.run(cubin_command(nvcc, source, cubin, arch, head_size, flags),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if run.returncode != 0:
            raise subprocess.CalledProcessError(run.returncode, run.args, run.stdout)
        figures, sizes = parse_ptxas(run.stdout), text_sizes(cubin)
    return {short_name(name): {**f, "code_bytes": sizes[name]} for name, f in figures.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--N", type=int, nargs="+", default=[64])
    parser.add_argument("--op", choices=["wkv6", "wkv7"], default="wkv6")
    parser.add_argument("--source", help="a kernel source instead of cuda/{op}_cuda.cu")
    args = parser.parse_args()
    args.source = args.source or os.path.join(CUDA_DIR, f"{args.op}_cuda.cu")
    print("| arch | N | kernel | registers | spill stores/loads (B) | shared memory (B) | code (KB) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for n in args.N:
            for name, f in sorted(report(arch, n, source=args.source).items()):
                print(f"| sm_{arch} | {n} | {name} | {f['registers']} | {f['spill_stores']}/{f['spill_loads']} "
                      f"| {f['smem']} | {f['code_bytes'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
