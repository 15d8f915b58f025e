"""Export a merged (or any official-layout) RWKV-6 or RWKV-7 .pth for another runtime:

    python export.py --model merged.pth --format gguf --output merged.gguf      # llama.cpp
    python export.py --model merged.pth --format safetensors --output merged.safetensors
    python export.py --model merged.pth --format st --output merged.st          # web-rwkv / Ai00
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from src.config import CheckpointError  # noqa: E402
from src.export import EXPORT_DTYPES, FORMATS, ExportError, export_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the RWKV-6 (x060) or RWKV-7 (x070) .pth to export, e.g. merge.py's output")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--output", required=True, help="the file to write (never the input itself)")
    p.add_argument("--dtype", default="same", help=f"one of {', '.join(EXPORT_DTYPES)}: same (default) keeps the "
                   ".pth's dtype; q8_0 is GGUF only; st is always fp16")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (once the new file is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        size, line = export_model(args.model, args.format, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                  progress=not args.quiet)
    except (CheckpointError, ExportError) as e:
        sys.exit(f"export.py: {e}")
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s: {line}")


if __name__ == "__main__":
    main()
