"""SFT index at scale: build time, RSS of a process holding the opened index, random-access time.

    python bench/bench_sft_index.py --records 1000000 [--format jsonl|json] [--workers 2] [--dir /tmp/sftbench]

Writes N synthetic LLaVA records (75% with one image, 1-3 turns, 200-1000 bytes), indexes them
with estimated lengths (and exact lengths on the first --exact-records to measure that rate),
then, in fresh child processes (so numbers are not polluted by the build):
  - RSS (VmRSS / VmHWM from /proc) after opening the index, after reading every mm_length (what
    the loader does once) and after --access random record reads;
  - mean time of one random ``SFTIndex.record(i)`` (pread + json.loads): first pass over random
    records (their pages may come from disk when the file exceeds the free page cache), then the
    same records again (page cache warm), and pread alone;
  - the naive baseline: a list of json.loads of the first --naive-records lines, RSS per record,
    extrapolated linearly to N (loading N records that way would not fit this machine).
Prints one JSON object with all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the a red blue green yellow circle square triangle star left right top bottom small large "
    "shape colour image picture shows there is are next to above below how many what which"
).split()


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024  # MiB
    return out


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + "."


def write_records(path: Path, n: int, fmt: str, seed: int = 0, replicate: int = 1) -> float:
    """Write n records; with ``replicate`` k (jsonl only), n/k distinct records written k times
    (generating 10M distinct records in Python takes longer than indexing them)."""
    if replicate > 1:
        if fmt != "jsonl" or n % replicate:
            raise SystemExit("--replicate needs --format jsonl and records divisible by it")
        t = time.perf_counter()
        base = path.with_name(path.name + ".base")
        write_records(base, n // replicate, fmt, seed)
        with open(path, "wb") as out:
            for _ in range(replicate):
                with open(base, "rb") as f:
                    while chunk := f.read(1 << 26):
                        out.write(chunk)
        base.unlink()
        return time.perf_counter() - t
    rng = random.Random(seed)
    t = time.perf_counter()
    with open(path, "w", buffering=1 << 24) as f:
        if fmt == "json":
            f.write("[\n")
        for i in range(n):
            turns = []
            for k in range(rng.randint(1, 3)):
                q = _sentence(rng, 4, 20)
                if k == 0 and i % 4:
                    q = "<image>\n" + q
                turns.append({"from": "human", "value": q})
                turns.append({"from": "gpt", "value": _sentence(rng, 5, 60)})
            rec = {"id": i, "conversations": turns}
            if i % 4:
                rec["image"] = f"images/{i % 100000:06d}.jpg"
            line = json.dumps(rec)
            if fmt == "json":
                f.write(line + (",\n" if i + 1 < n else "\n"))
            else:
                f.write(line + "\n")
        if fmt == "json":
            f.write("]\n")
    return time.perf_counter() - t


def child_open(index_dir: str, access: int) -> None:
    """Runs in a fresh process: open the index, touch lengths, time random reads, report RSS."""
    import numpy as np

    from vlmforge.data.sft.index import open_index

    base = _status()
    t = time.perf_counter()
    ix = open_index(index_dir)
    open_s = time.perf_counter() - t
    after_open = _status()
    total = int(np.asarray(ix.mm_length, dtype=np.int64).sum())  # the loader reads all lengths once
    after_lengths = _status()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(ix), access).tolist()
    for i in idx[:1000]:  # warm up code paths
        ix.record(i)
    t = time.perf_counter()
    for i in idx:
        ix.record(i)
    per = (time.perf_counter() - t) / len(idx)  # pages may come from disk (file > free page cache)
    t = time.perf_counter()
    for i in idx:
        ix.raw(i)
    per_raw_warm = (time.perf_counter() - t) / len(idx)
    t = time.perf_counter()
    for i in idx:
        ix.record(i)
    per_warm = (time.perf_counter() - t) / len(idx)  # same records again: page cache warm
    t = time.perf_counter()
    for i in idx[:20000]:
        ix.messages(i)
    per_msgs = (time.perf_counter() - t) / min(len(idx), 20000)
    print(
        json.dumps(
            {
                "records": len(ix),
                "mm_tokens": total,
                "open_s": open_s,
                "rss_mib_interpreter": base["VmRSS"],
                "rss_mib_after_open": after_open["VmRSS"],
                "rss_mib_after_reading_all_lengths": after_lengths["VmRSS"],
                "rss_mib_after_random_reads": _status()["VmRSS"],
                "peak_rss_mib": _status()["VmHWM"],
                "random_record_us_first_pass": per * 1e6,
                "random_record_us_second_pass": per_warm * 1e6,
                "random_pread_only_us_second_pass": per_raw_warm * 1e6,
                "random_record_plus_llava_to_messages_us": per_msgs * 1e6,
                "random_reads": len(idx),
            }
        )
    )


def child_build(src: str, out: str, workers: int, lengths: str, tokenizer: str | None, limit_src: str | None) -> None:
    from vlmforge.data.sft import lengths as sft_index
    from vlmforge.data.sft.build import build_index

    if tokenizer:  # load it (and import transformers) before the clock starts
        from vlmforge.text.tokenization import load_tokenizer

        sft_index._TOKENIZERS[tokenizer] = load_tokenizer(tokenizer)
    t = time.perf_counter()
    m = build_index(
        [src], out, visual_tokens=729, lengths=lengths, tokenizer=tokenizer, workers=workers,
        check_images=False, progress=False,
    )
    print(json.dumps({"build_s": time.perf_counter() - t, "peak_rss_mib": _status()["VmHWM"], "counts": m["counts"]}))


def child_naive(src: str, n: int) -> None:
    base = _status()["VmRSS"]
    t = time.perf_counter()
    recs = []
    with open(src) as f:
        for line in f:
            recs.append(json.loads(line))
            if len(recs) >= n:
                break
    dt = time.perf_counter() - t
    rss = _status()["VmRSS"] - base
    print(json.dumps({"naive_records": len(recs), "naive_rss_mib": rss, "naive_load_s": dt}))


def _cpu_probe() -> float:
    """Seconds for sum(range(10**7)): how busy/slow this machine was (about 0.15-0.25 s when idle)."""
    t = time.perf_counter()
    sum(range(10**7))
    return time.perf_counter() - t


def _child(*args: str) -> dict:
    here = str(Path(__file__).resolve())
    out = subprocess.run([sys.executable, here, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--format", choices=("jsonl", "json"), default="jsonl")
    ap.add_argument("--dir", default="/tmp/vlmforge_sft_bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--access", type=int, default=200_000)
    ap.add_argument("--naive-records", type=int, default=200_000)
    ap.add_argument("--exact-records", type=int, default=20_000)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the exact-length rate (default: train a tiny one)")
    ap.add_argument("--replicate", type=int, default=1, help="jsonl: write records/K distinct records K times")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "open":
            child_open(rest[0], int(rest[1]))
        elif kind == "build":
            child_build(rest[0], rest[1], int(rest[2]), rest[3], rest[4] if rest[4] != "-" else None, None)
        elif kind == "naive":
            child_naive(rest[0], int(rest[1]))
        return

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"sft_{args.records}.{args.format}"
    res: dict = {"records": args.records, "format": args.format, "workers": args.workers, "cpus": os.cpu_count(),
                 "replicate": args.replicate, "cpu_speed_sum_range_1e7_s": _cpu_probe()}
    if not src.exists():
        res["generate_s"] = write_records(src, args.records, args.format, replicate=args.replicate)
    res["source_gib"] = src.stat().st_size / 2**30

    idx = d / f"index_{args.records}_{args.format}"
    res["build_estimate"] = _child("build", str(src), str(idx), str(args.workers), "estimate", "-")
    res["open"] = _child("open", str(idx), str(args.access))
    res["index_mib_on_disk"] = sum(p.stat().st_size for p in idx.glob("*.npy")) / 2**20

    # Exact lengths (tokenizer + chat template per record): rate on a prefix, extrapolated.
    tok = args.tokenizer
    if tok is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fixtures_tokenizer import shape_sentences

        from vlmforge.text.tokenization import train_tokenizer

        tok = str(d / "tok")
        if not (d / "tok" / "tokenizer.json").exists():
            train_tokenizer(shape_sentences() + [" ".join(WORDS)], tok, vocab_size=1024)
    small = d / f"prefix_{args.exact_records}.jsonl"
    if args.format == "jsonl":
        with open(src) as f, open(small, "w") as g:
            for k, line in enumerate(f):
                if k >= args.exact_records:
                    break
                g.write(line)
    else:
        write_records(small, args.exact_records, "jsonl")
    ex = _child("build", str(small), str(d / "index_exact"), "1", "exact", tok)
    res["build_exact_prefix"] = ex
    res["exact_records_per_s_per_process"] = ex["counts"]["records"] / ex["build_s"]
    if args.format == "jsonl":
        nv = _child("naive", str(src), str(min(args.naive_records, args.records)))
        nv["naive_rss_mib_extrapolated_to_N"] = nv["naive_rss_mib"] * args.records / nv["naive_records"]
        res["naive_json_list"] = nv
    print(json.dumps(res, indent=2))
    if not args.keep:
        for p in [src, small]:
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
