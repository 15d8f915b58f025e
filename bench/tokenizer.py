"""Tokens per second of src.tokenizer.WorldTokenizer against the `rwkv` package's TRIE_TOKENIZER
on the same text; both must give the same ids. The last line is the overall speed ratio.

    python bench/tokenizer.py [--mb 2] [--repeat 3] [FILE ...]

Default text: Python's standard library sources (English and code) and, where vim is
installed, its tutor in ~30 languages (CJK, Cyrillic, Greek, ...). Each run starts with an
empty memo, so repeated runs do not flatter our tokenizer."""
import argparse
import glob
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.tokenizer import WorldTokenizer  # noqa: E402


def read_files(paths, limit):
    """Concatenated text of `paths` up to about `limit` bytes."""
    parts, size = [], 0
    for path in paths:
        if size >= limit:
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        size += len(parts[-1].encode())
    return "".join(parts)


def best_time(fn, text, repeat, before=lambda: None):
    times = []
    for _ in range(repeat):
        before()
        t = time.perf_counter()
        ids = fn(text)
        times.append(time.perf_counter() - t)
    return ids, min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="text files to use instead of the default samples")
    p.add_argument("--mb", type=float, default=2.0, help="megabytes of text per sample")
    p.add_argument("--repeat", type=int, default=3, help="runs per tokenizer; the best counts")
    args = p.parse_args(argv)
    limit = int(args.mb * 1e6)
    if args.files:
        samples = {"files": read_files(args.files, limit)}
    else:
        stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        samples = {"stdlib .py (English + code)": read_files(stdlib, limit)}
        tutors = sorted(glob.glob("/usr/share/vim/vim*/tutor/tutor.*utf-8"))
        if tutors:
            samples["vim tutors (~30 languages)"] = read_files(tutors, limit)
        else:
            print("(vim tutors not found: no multilingual sample)")

    t = time.perf_counter()
    ours = WorldTokenizer()
    print(f"WorldTokenizer built in {time.perf_counter() - t:.2f} s")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    t = time.perf_counter()
    trie = TRIE_TOKENIZER(ours.vocab_file)
    print(f"TRIE_TOKENIZER built in {time.perf_counter() - t:.2f} s")

    total = {"ours": 0.0, "trie": 0.0, "tokens": 0}
    for name, text in samples.items():
        ref, t_trie = best_time(trie.encode, text, args.repeat)
        ids, t_ours = best_time(ours.encode, text, args.repeat, ours.memo.clear)
        if ids != ref:
            raise SystemExit(f"{name}: the ids differ from TRIE_TOKENIZER's")
        total["ours"] += t_ours
        total["trie"] += t_trie
        total["tokens"] += len(ids)
        print(f"{name}: {len(text.encode()) / 1e6:.2f} MB, {len(ids):,} tokens, same ids | "
              f"ours {len(ids) / t_ours / 1e6:.2f} M tokens/s | TRIE_TOKENIZER {len(ref) / t_trie / 1e6:.2f} "
              f"M tokens/s | {t_trie / t_ours:.2f}x")
    print(f"all samples: ours {total['tokens'] / total['ours'] / 1e6:.2f} M tokens/s, TRIE_TOKENIZER "
          f"{total['tokens'] / total['trie'] / 1e6:.2f} M tokens/s, ratio {total['trie'] / total['ours']:.2f}x")


if __name__ == "__main__":
    main()
