"""Export a merged (or any official-layout) RWKV-6 or RWKV-7 .pth for another runtime:

    python export.py --model merged.pth --format gguf --output merged.gguf      # llama.cpp
    python export.py --model merged.pth --format safetensors --output merged.safetensors
    python export.py --model merged.pth --format st --output merged.st          # web-rwkv / Ai00
    python export.py --adapter adapter.pth --format gguf --output adapter.gguf  # a llama.cpp LoRA adapter
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from src.cli import ArgumentParser  # noqa: E402
from src.config import CheckpointError  # noqa: E402
from src.export import EXPORT_DTYPES, FORMATS, ExportError, export_model  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser("export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the RWKV-6 (x060) or RWKV-7 (x070) .pth to export, e.g. merge.py's output; "
                   "with --adapter, the base it is checked against (optional)")
    p.add_argument("--adapter", default=None, help="a bone, mini or lora adapter file to write as a llama.cpp LoRA adapter "
                   "(--format gguf), served beside the base's GGUF without merging")
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
        if args.adapter is not None:
            from src.export.lora import export_adapter
            if args.format != "gguf":
                raise ExportError(f"An adapter is written as a llama.cpp LoRA (--format gguf), not {args.format}: "
                                  "merge it (merge.py --format) for other runtimes.")
            size, line = export_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model,
                                        overwrite=args.overwrite, progress=not args.quiet)
        elif args.model is None:
            raise ExportError("Give --model (a .pth to export) or --adapter (an adapter to write as a llama.cpp LoRA).")
        else:
            size, line = export_model(args.model, args.format, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                      progress=not args.quiet)
    except (CheckpointError, ExportError) as e:
        sys.exit(f"export.py: {e}")
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s: {line}")


if __name__ == "__main__":
    main()
