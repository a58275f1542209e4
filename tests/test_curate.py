"""curate filter / dedup / mix / uid subsets: counts reconcile, resume after a kill, formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_curate import make_world

from vlmforge.cli import main
from vlmforge.shards import iter_raw_samples, list_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("curate") / "world")


def out_samples(folder) -> list:
    return [s for t in list_shards(folder) for s in iter_raw_samples(t)]


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def check_reconciled(m: dict, out_dir) -> None:
    c = m["counts"]
    assert c["reconciled"] is True
    assert c["in"] == c["kept"] + sum(m["dropped"].values())
    samples = out_samples(out_dir)
    assert len(samples) == c["kept"]
    assert len({(s.meta["source_shard"], s.meta["source_key"]) for s in samples}) == len(samples)  # no duplicates
    assert sum(v["count"] for v in m["lineage"].values()) == c["kept"]


# -- uid subsets (DataComp format) ---------------------------------------------------------
def test_uid_subset_hand_built_file(tmp_path, world):
    from vlmforge.curate.uids import load_uids, uids_in_subset

    chosen = [f"{i:032x}" for i in (3, 7, 11, 20)] + ["f" * 32]
    # Built by hand like DataComp: (high 64 bits, low 64 bits) records, dtype "u8,u8", sorted.
    recs = sorted((int(u[:16], 16), int(u[16:], 16)) for u in chosen)
    arr = np.array(recs, dtype=np.dtype("u8,u8"))
    np.save(tmp_path / "subset.npy", arr)
    arr.tofile(tmp_path / "subset.bin")  # raw memmap variant DataComp's resharder also reads

    for f in ("subset.npy", "subset.bin"):
        sub = load_uids(tmp_path / f)
        got = uids_in_subset([f"{i:032x}" for i in range(25)] + [None, "zz"], sub)
        assert np.flatnonzero(got).tolist() == [3, 7, 11, 20]

    np.save(tmp_path / "unsorted.npy", arr[::-1].copy())
    with pytest.raises(Exception, match="not sorted"):
        load_uids(tmp_path / "unsorted.npy")

    out = tmp_path / "kept"
    assert main(["curate", "filter", "--in", str(world["dir"]), "--out", str(out),
                 "--keep", f"uids:{tmp_path / 'subset.npy'}", "--samples-per-shard", "3"]) == 0
    m = manifest(out)
    check_reconciled(m, out)
    assert sorted(s.meta["uid"] for s in out_samples(out)) == sorted(chosen[:4])
    assert m["dropped"][f"uids:{tmp_path / 'subset.npy'}"] == m["counts"]["in"] - 4 - m["dropped"]["corrupt"]
    assert all(len(iter_list) <= 3 for iter_list in [list(iter_raw_samples(t)) for t in list_shards(out)])


# -- filter by scores ----------------------------------------------------------------------
def write_scores(world, folder: Path, fn) -> None:
    """Hand-made score sidecars: score = fn(index in world order)."""
    folder.mkdir(parents=True)
    idx = 0
    for t in list_shards(world["dir"]):
        keys, scores = [], []
        for s in iter_raw_samples(t):
            keys.append(s.key)
            scores.append(fn(idx))
            idx += 1
        pq.write_table(pa.table({"key": keys, "uid": [None] * len(keys), "score": pa.array(scores, pa.float32()),
                                 "error": pa.array([None] * len(keys), pa.string())}),
                       folder / (Path(t).stem + ".parquet"))


def test_filter_threshold_top_and_or(tmp_path, world):
    n = world["n"]
    write_scores(world, tmp_path / "a", lambda i: i / n)  # increasing
    write_scores(world, tmp_path / "b", lambda i: 1 - i / n)  # decreasing
    base = ["curate", "filter", "--in", str(world["dir"]), "--scores", f"a={tmp_path / 'a'}",
            "--scores", f"b={tmp_path / 'b'}", "--samples-per-shard", "7"]
    all_keys = [s.key for t in list_shards(world["dir"]) for s in iter_raw_samples(t)]
    corrupt = {k for k, f in world["faults"].items() if f == "non_image"}

    assert main(base + ["--out", str(tmp_path / "and"), "--keep", "a>=0.5", "--keep", "b.score>0.3"]) == 0
    m = manifest(tmp_path / "and")
    check_reconciled(m, tmp_path / "and")
    want = {k for i, k in enumerate(all_keys) if i / n >= 0.5 and 1 - i / n > 0.3} - corrupt
    assert {s.meta["source_key"] for s in out_samples(tmp_path / "and")} == want
    assert set(m["dropped"]) <= {"a>=0.5", "b.score>0.3", "corrupt"}

    assert main(base + ["--out", str(tmp_path / "or"), "--keep", "a:top=0.1", "--keep", "b:top=0.1",
                        "--combine", "or"]) == 0
    m = manifest(tmp_path / "or")
    check_reconciled(m, tmp_path / "or")
    kept = {s.meta["source_key"] for s in out_samples(tmp_path / "or")}
    valid = [k for k in all_keys if k not in corrupt]
    k10 = int(np.ceil(0.1 * len(valid)))
    order = sorted(valid, key=all_keys.index)
    assert kept == set(order[:k10]) | set(order[-k10:])
    # output keeps the input order and img2dataset keys
    assert [s.meta["source_key"] for s in out_samples(tmp_path / "or")] == [k for k in all_keys if k in kept]


def test_filter_errors_are_clear(tmp_path, world):
    assert main(["curate", "filter", "--in", str(world["dir"]), "--out", str(tmp_path / "x"),
                 "--keep", "clip>=0.2"]) == 2
    assert main(["curate", "filter", "--in", str(world["dir"]), "--out", str(tmp_path / "x"),
                 "--keep", "clip=>0.2"]) == 2


# -- dedup ---------------------------------------------------------------------------------
def test_dedup_exact_and_near(tmp_path, world):
    out = tmp_path / "dedup"
    assert main(["curate", "dedup", "--in", str(world["dir"]), "--out", str(out), "--samples-per-shard", "10",
                 "--ground-truth", str(world["dir"] / "faults.jsonl")]) == 0
    m = manifest(out)
    check_reconciled(m, out)
    gt = m["ground_truth"]
    assert gt["exact_duplicates_removed"] == gt["exact_duplicates_injected"] == 3
    assert gt["near_duplicates_removed"] == gt["near_duplicates_injected"] == 2
    assert gt["clean_removed"] == 0
    assert gt["exact_duplicate_groups_with_one_copy_left"] == "3/3"
    assert gt["near_duplicate_groups_with_one_copy_left"] == "2/2"
    assert m["dropped"] == {"corrupt": 1, "exact_duplicate_image": 3, "near_duplicate_phash": 2}
    assert m["near_duplicate_groups"] == 2
    kept_sha = [s.meta["sha256"] for s in out_samples(out)]
    assert len(set(kept_sha)) == len(kept_sha)
    assert all(len(list(iter_raw_samples(t))) == 10 for t in list_shards(out)[:-1])


def test_ground_truth_follows_samples_through_a_chain_of_stages(tmp_path, world):
    """dedup after a filter: output keys are new, but ground truth is matched by the original key."""
    n = world["n"]
    write_scores(world, tmp_path / "s", lambda i: 1.0)  # keep everything valid
    assert main(["curate", "filter", "--in", str(world["dir"]), "--scores", f"s={tmp_path / 's'}",
                 "--keep", "s>=0.5", "--samples-per-shard", "7", "--out", str(tmp_path / "kept")]) == 0
    assert n > 7 and any(s.key != s.meta["origin_key"] for s in out_samples(tmp_path / "kept"))
    out = tmp_path / "dedup"
    assert main(["curate", "dedup", "--in", str(tmp_path / "kept"), "--out", str(out),
                 "--ground-truth", str(world["dir"] / "faults.jsonl")]) == 0
    gt = manifest(out)["ground_truth"]
    assert gt["exact_duplicates_removed"] == gt["exact_duplicates_injected"] == 3
    assert gt["clean_removed"] == 0


def test_phash_band_search_matches_brute_force():
    from vlmforge.curate.dedup import phash_pairs

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=60, dtype=np.int64).view(np.uint64).copy()
    for i in range(0, 60, 6):  # plant near copies: flip 1..5 bits
        flips = rng.choice(64, size=1 + i % 5, replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    got = {(a, b) for a, b, _ in phash_pairs(h, 4)}
    brute = {(a, b) for a in range(60) for b in range(a + 1, 60) if bin(int(h[a]) ^ int(h[b])).count("1") <= 4}
    assert got == brute and len(brute) >= 8


# -- mix -----------------------------------------------------------------------------------
def test_mix_ratios(tmp_path, world):
    small = tmp_path / "small"
    make_world(small, n=12, per_shard=5, seed=1, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    out = tmp_path / "mix"
    assert main(["curate", "mix", "--source", f"big={world['dir']}:3", "--source", f"small={small}:1",
                 "--out", str(out), "--samples-per-shard", "8"]) == 0
    m = manifest(out)
    check_reconciled(m, out)
    assert m["mix"]["small"]["taken"] == 12 and m["mix"]["big"]["taken"] == 36
    src = [s.meta["source"] for s in out_samples(out)]
    assert src.count("big") == 36 and src.count("small") == 12
    for t in list_shards(out):  # interleaved: every full output shard holds the 3:1 ratio
        s = [x.meta["source"] for x in iter_raw_samples(t)]
        assert s.count("big") == 3 * s.count("small")
    assert main(["curate", "mix", "--source", f"big={world['dir']}:1", "--source", f"small={small}:1",
                 "--total", "40", "--out", str(tmp_path / "mix2")]) == 2  # small cannot give 20


# -- resume after a kill -------------------------------------------------------------------
def test_resume_after_kill_filter(tmp_path, world, monkeypatch):
    from vlmforge.curate import reshard

    args = ["curate", "dedup", "--in", str(world["dir"]), "--out", str(tmp_path / "run"), "--samples-per-shard", "6"]
    ref = ["curate", "dedup", "--in", str(world["dir"]), "--out", str(tmp_path / "ref"), "--samples-per-shard", "6"]
    assert main(ref) == 0

    real = reshard.write_output_shard
    calls = {"n": 0}

    def dying(job, j, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing the 3rd output shard: a temp tar is left behind
            from vlmforge.shards import ShardWriter

            w = ShardWriter(job.out_dir, samples_per_shard=job.samples_per_shard, start_index=j)
            w.write(w.next_key(), b"partial", "partial", {})
            raise KeyboardInterrupt("simulated kill")
        return real(job, j, rows)

    monkeypatch.setattr(reshard, "write_output_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert len(list_shards(tmp_path / "run")) == 2
    assert any(".tmp" in p.name for p in (tmp_path / "run").iterdir())

    written = []
    monkeypatch.setattr(reshard, "write_output_shard", lambda job, j, rows: written.append(j) or real(job, j, rows))
    assert main(args) == 0
    assert 0 not in written and 1 not in written  # finished shards skipped
    assert not any(".tmp" in p.name for p in (tmp_path / "run").rglob("*"))
    m, r = manifest(tmp_path / "run"), manifest(tmp_path / "ref")
    check_reconciled(m, tmp_path / "run")
    assert m["counts"] == r["counts"] and m["dropped"] == r["dropped"] and m["lineage"] == r["lineage"]
    a = [(s.key, s.meta["source_key"], s.image_bytes) for s in out_samples(tmp_path / "run")]
    b = [(s.key, s.meta["source_key"], s.image_bytes) for s in out_samples(tmp_path / "ref")]
    assert a == b

    # a different run in the same folder is refused
    assert main(["curate", "dedup", "--in", str(world["dir"]), "--out", str(tmp_path / "run"),
                 "--samples-per-shard", "5"]) == 2


def test_corrupt_tar_is_counted(tmp_path, world):
    bad = tmp_path / "bad"
    bad.mkdir()
    src = list_shards(world["dir"])
    for t in src:
        os.symlink(t, bad / Path(t).name)
    data = Path(src[0]).read_bytes()
    (bad / "99999.tar").write_bytes(data[: len(data) // 2])  # truncated shard
    out = tmp_path / "out"
    assert main(["curate", "dedup", "--in", str(bad), "--out", str(out), "--exact", "uid", "--near", "none"]) == 0
    m = manifest(out)
    check_reconciled(m, out)
    assert m["dropped"]["corrupt"] >= 2  # the non-image sample + the cut member
    assert any("damaged tar" in (e["error"] or "") for e in m["corrupt_examples"])


# -- torchrun: two ranks give the one-rank result ------------------------------------------
def test_two_ranks_match_one_rank(tmp_path, world):
    import shutil
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        if shutil.which("torchrun") is None:
            pytest.skip("torchrun not installed")
        torchrun = Path(shutil.which("torchrun"))
    args = ["curate", "dedup", "--in", str(world["dir"]), "--samples-per-shard", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vlmforge", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    m1, m2 = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    check_reconciled(m2, tmp_path / "two")
    assert m1["counts"] == m2["counts"] and m1["dropped"] == m2["dropped"] and m1["lineage"] == m2["lineage"]
    a = [(s.key, s.meta["source_key"]) for s in out_samples(tmp_path / "one")]
    b = [(s.key, s.meta["source_key"]) for s in out_samples(tmp_path / "two")]
    assert a == b
