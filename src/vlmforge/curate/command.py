"""Curate image-text shards: score, train a filtering network, filter, deduplicate, mix.

Subcommands (shards in img2dataset / DataComp webdataset layout; each writes manifest.json):

  score         one score sidecar (parquet: key, uid, score, ...) per input shard
                  --scorer clip|dfn  cosine of image/text embeddings (CLIP / SigLIP / own filter network)
                  --scorer mlm       MLLM judge, MLM-Filter's four metrics, parsed and expected-value scores
  train-filter  train a CLIP-style data-filtering network (SigLIP/CLIP architecture) on trusted pairs
  filter        keep by thresholds / top fractions of scores and DataComp uid subsets (and|or)
  dedup         drop exact (uid, image sha256, caption) and near-duplicate images (pHash or embeddings)
  mix           combine sources with target ratios

filter / dedup / mix write new shards (samples_per_shard each) and a manifest whose counts
reconcile (in = kept + dropped per reason) with the lineage of every output shard. All passes
split shards over torchrun ranks and reader workers, write atomically, and resume after a kill.

Examples:
  vlmforge curate train-filter --in world/captions --exclude-faults world/captions/faults.jsonl --out dfn
  vlmforge curate score --scorer dfn --model dfn --in world/captions --out scores/dfn
  vlmforge curate filter --in world/captions --scores dfn=scores/dfn --keep 'dfn>=calibrated' --out kept
  vlmforge curate filter --in pool --scores clip=scores/clip --keep 'clip:top=0.3' --keep uids:dfn15.npy \\
      --combine or --out kept
  vlmforge curate dedup --in kept --out dedup
  vlmforge curate mix --source ccs=ccs_dir:0.5 --source dc=dedup:0.5 --out mixed
"""

from __future__ import annotations

import argparse

HELP = "score, filter (CLIP / own DFN / MLLM judge / uid subsets), dedup and mix caption shards"


def _common(p: argparse.ArgumentParser, inputs: bool = True) -> None:
    from vlmforge.clitools import add_recipe_args

    if inputs:
        p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="SHARDS",
                       help="input shards: folder(s), glob(s), brace pattern(s) or tar file(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-workers", type=int, default=None, help="reader workers per rank (curate.num_workers)")
    add_recipe_args(p)


def _reshard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples-per-shard", type=int, default=None, help="samples per output shard (curate.samples_per_shard)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="curate_command", metavar="SUBCOMMAND")

    p = sub.add_parser("score", help="write a score sidecar per shard")
    _common(p)
    p.add_argument("--scorer", choices=["clip", "dfn", "mlm"], default=None, help="curate.score.scorer")
    p.add_argument("--model", default=None, help="CLIP/SigLIP/filter folder or hub id; mlm: a vlmforge checkpoint")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")

    p = sub.add_parser("train-filter", help="train a CLIP-style filtering network on trusted pairs")
    _common(p)
    p.add_argument("--exclude-faults", default=None, metavar="FAULTS_JSONL",
                   help="skip the samples listed in a fault file (e.g. the synthetic world's faults.jsonl)")
    p.add_argument("--init", default=None, help="start from this CLIP/SigLIP folder (curate.train_filter.init)")
    p.add_argument("--overwrite", action="store_true",
                   help="write over a filter network already in --out (the other subcommands resume instead)")
    p.add_argument("--arch", choices=["siglip", "clip"], default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default=None)

    p = sub.add_parser("filter", help="keep samples by scores / uid subsets, write new shards")
    _common(p)
    _reshard_args(p)
    p.add_argument("--scores", action="append", default=[], metavar="NAME=DIR",
                   help="a score folder written by `curate score`, referred to as NAME in criteria")
    p.add_argument("--keep", action="append", default=[], metavar="CRITERION",
                   help="NAME[.COL]>=X | NAME[.COL]>=calibrated | NAME[.COL]:top=F | uids:PATH (repeatable)")
    p.add_argument("--combine", choices=["and", "or"], default=None, help="how criteria combine (default and)")
    p.add_argument("--ground-truth", default=None, metavar="FAULTS_JSONL",
                   help="report mismatch precision/recall against this fault file in the manifest")

    p = sub.add_parser("dedup", help="drop exact and near-duplicate samples, write new shards")
    _common(p)
    _reshard_args(p)
    p.add_argument("--exact", default=None, help="comma list of uid,image,caption,pair (curate.dedup.exact)")
    p.add_argument("--near", choices=["phash", "embedding", "none"], default=None, help="curate.dedup.near.method")
    p.add_argument("--embeddings", default=None, metavar="SCORE_DIR",
                   help="near=embedding: a score folder written with --set curate.score.save_embeddings=true")
    p.add_argument("--min-cosine", type=float, default=None, help="near=embedding: curate.dedup.near.embedding_min_cosine")
    p.add_argument("--phash-distance", type=int, default=None, help="max Hamming distance of 64-bit pHashes")
    p.add_argument("--ground-truth", default=None, metavar="FAULTS_JSONL")

    p = sub.add_parser("mix", help="combine sources with target ratios, write new shards")
    _common(p, inputs=False)
    _reshard_args(p)
    p.add_argument("--source", action="append", required=True, metavar="NAME=SHARDS:WEIGHT",
                   help="a source and its weight (repeatable); weights are normalised")
    p.add_argument("--total", type=int, default=None, help="samples in the mix (default: as many as ratios allow)")


def _config(args):
    from vlmforge.clitools import recipe_from_args
    from vlmforge.config.loader import set_value

    cfg = recipe_from_args(args)
    if getattr(args, "num_workers", None) is not None:
        set_value(cfg, "curate.num_workers", args.num_workers, "--num-workers")
        set_value(cfg, "curate.score.num_workers", args.num_workers, "--num-workers")
    if getattr(args, "samples_per_shard", None) is not None:
        set_value(cfg, "curate.samples_per_shard", args.samples_per_shard, "--samples-per-shard")
    return cfg


def run(args: argparse.Namespace) -> int:
    from vlmforge import dist
    from vlmforge.dist import init_distributed
    from vlmforge.errors import UserError
    from vlmforge.files import prepare_out_dir

    if not getattr(args, "curate_command", None):
        raise UserError("choose a subcommand: score, train-filter, filter, dedup, mix (see --help)")
    cfg = _config(args)
    init_distributed()
    if dist.is_main():  # score / filter / dedup / mix resume in a folder of theirs; train-filter starts over
        prepare_out_dir(args.out, overwrite=getattr(args, "overwrite", False),
                        resumable=args.curate_command != "train-filter")
    return {"score": _score, "train-filter": _train_filter, "filter": _filter, "dedup": _dedup, "mix": _mix}[
        args.curate_command
    ](args, cfg)


def _save_config(cfg, out) -> None:
    from vlmforge import dist
    from vlmforge.config import save_resolved

    if dist.is_main():
        save_resolved(cfg, out)


def _summary(manifest: dict, out: str) -> None:
    if not manifest:
        return
    c = manifest.get("counts", {})
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    if manifest.get("dropped"):
        print("  dropped: " + ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()))
    gt = manifest.get("ground_truth")
    if gt:
        print("  ground truth: " + ", ".join(f"{k} {v}" for k, v in gt.items() if not isinstance(v, (dict, list))))


def _score(args, cfg) -> int:
    from vlmforge.curate.reshard import shards_of
    from vlmforge.curate.score import score_shards
    from vlmforge.curate.scorers import load_scorer

    s = cfg.curate.score
    for name in ("scorer", "model", "batch_size", "device"):
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    scorer = load_scorer(s.scorer, s)
    _save_config(cfg, args.out)
    manifest = score_shards(shards_of(args.inputs), args.out, scorer, batch_size=s.batch_size,
                            num_workers=s.num_workers, config=cfg,
                            settings={"mlm_metrics": list(s.mlm_metrics), "mlm_score": s.mlm_score}
                            if s.scorer == "mlm" else {})
    _summary(manifest, args.out)
    return 0


def _train_filter(args, cfg) -> int:
    from vlmforge import dist
    from vlmforge.config.loader import set_value
    from vlmforge.curate.reshard import shards_of
    from vlmforge.curate.train_filter import train_filter
    from vlmforge.curate.truth import load_truth

    tf = cfg.curate.train_filter
    for name in ("init", "arch", "epochs"):
        if getattr(args, name, None) is not None:
            set_value(cfg, f"curate.train_filter.{name}", getattr(args, name), f"--{name}")
    exclude = set(load_truth(args.exclude_faults)) if args.exclude_faults else set()
    if not dist.is_main():  # a small model on a trusted set: one process trains
        dist.barrier()
        return 0
    cal = train_filter(shards_of(args.inputs), args.out, tf, exclude=exclude,
                       device=args.device or cfg.curate.score.device, config=cfg)
    dist.barrier()
    print(f"wrote filter network {args.out}: keep threshold {cal['threshold']:.4f} "
          f"(keeps {cal['keep_frac_of_trusted']:.0%} of held-out trusted pairs; "
          f"rejects {cal['shuffled_pairs_rejected']:.1%} of shuffled ones)")
    return 0


def _filter(args, cfg) -> int:
    from vlmforge.curate import reshard
    from vlmforge.curate.filter import make_decide, parse_criterion, parse_scores_args
    from vlmforge.curate.truth import load_truth

    c = cfg.curate
    if args.keep:
        c.criteria = list(args.keep)
    if args.combine:
        c.combine = args.combine
    shards = reshard.shards_of(args.inputs)
    criteria = [parse_criterion(t) for t in c.criteria]
    scores = parse_scores_args(args.scores)
    truth = load_truth(args.ground_truth) if args.ground_truth else None
    decide = make_decide(criteria, c.combine, scores, shards, truth=truth)
    _save_config(cfg, args.out)
    job = reshard.Job(stage="curate.filter", shards=shards, out_dir=args.out, decide=decide,
                      samples_per_shard=c.samples_per_shard, decode=c.check_images, num_workers=c.num_workers,
                      settings={"criteria": list(c.criteria), "combine": c.combine, "scores": scores},
                      config=cfg)
    manifest = reshard.run(job)
    _summary(manifest, args.out)
    return 0


def _dedup(args, cfg) -> int:
    from vlmforge.config.loader import set_value
    from vlmforge.curate import reshard
    from vlmforge.curate.dedup import embeddings_from_scores, make_decide, make_extra
    from vlmforge.curate.truth import load_truth
    from vlmforge.errors import UserError

    d = cfg.curate.dedup
    if args.exact is not None:
        set_value(cfg, "curate.dedup.exact", [k.strip() for k in args.exact.split(",") if k.strip()], "--exact")
    if args.near:
        d.near.method = args.near
    if args.phash_distance is not None:
        set_value(cfg, "curate.dedup.near.phash_max_distance", args.phash_distance, "--phash-distance")
    if args.embeddings:
        d.near.embeddings = args.embeddings
    if args.min_cosine is not None:
        set_value(cfg, "curate.dedup.near.embedding_min_cosine", args.min_cosine, "--min-cosine")
    truth = load_truth(args.ground_truth) if args.ground_truth else None
    shards = reshard.shards_of(args.inputs)
    embeddings = None
    if d.near.method == "embedding":
        if not d.near.embeddings:
            raise UserError("--near embedding needs --embeddings SCORE_DIR (curate.dedup.near.embeddings)")
        embeddings = embeddings_from_scores(d.near.embeddings, shards)
    decide = make_decide(list(d.exact), d.near.method, d.near.phash_max_distance, embeddings=embeddings,
                         min_cosine=d.near.embedding_min_cosine, block=d.near.embedding_block, truth=truth)
    _save_config(cfg, args.out)
    job = reshard.Job(stage="curate.dedup", shards=shards, out_dir=args.out, decide=decide,
                      samples_per_shard=cfg.curate.samples_per_shard, extra=make_extra(d.near.method),
                      decode=True, num_workers=cfg.curate.num_workers,
                      settings={"exact": list(d.exact), "near": d.near.method,
                                "phash_max_distance": d.near.phash_max_distance,
                                "embeddings": d.near.embeddings, "min_cosine": d.near.embedding_min_cosine},
                      config=cfg)
    manifest = reshard.run(job)
    _summary(manifest, args.out)
    return 0


def _mix(args, cfg) -> int:
    from vlmforge.curate import reshard
    from vlmforge.curate.mix import make_decide, parse_source
    from vlmforge.errors import UserError

    sources = [parse_source(t) for t in args.source]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"--source names must be unique, got {names}")
    shards, owner = [], []
    for s in sources:
        found = reshard.shards_of(s.shards)
        shards += found
        owner += [s.name] * len(found)
    weights = {s.name: s.weight for s in sources}
    decide = make_decide(owner, weights, args.total)
    _save_config(cfg, args.out)
    job = reshard.Job(stage="curate.mix", shards=shards, out_dir=args.out, decide=decide, sources=owner,
                      samples_per_shard=cfg.curate.samples_per_shard, decode=cfg.curate.check_images,
                      num_workers=cfg.curate.num_workers,
                      settings={"weights": weights, "total": args.total}, config=cfg)
    manifest = reshard.run(job)
    _summary(manifest, args.out)
    return 0
