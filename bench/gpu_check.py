"""One-command GPU check (run by bench/gpu_check.sh): does vlmforge work at real size on this GPU,
and how fast is it.

1. flash-attn varlen vs sdpa with the document mask: the same logits on packed rows (skipped, with
   a note, when flash_attn or CUDA is missing).
2. Open-Qwen2VL at its real shapes (SigLIP-so400m-patch14-384 frozen + avgpool 12x12 + Qwen2.5-1.5B,
   the configs shipped in vlmforge/assets/configs; random weights, nothing downloaded) trained on
   packed rows of 4096 tokens (image + caption samples, causal attention, the published recipe's
   activation checkpointing) under FSDP2 with bf16 mixed precision (one rank), AdamW, for each
   variant: eager / compiled decoder layers x full logits / chunked loss. Per variant: tokens/s,
   model TFLOPs/s and MFU (vlmforge.train.mfu, the trainer's own count), peak GPU memory, the first
   steps' time (compiling), and the losses (finite: the bf16 FSDP2 step works).

Writes OUT/gpu_check.json and OUT/gpu_check.md. Without CUDA (or with --tiny) the same checks run
at a tiny size on CPU (tiny presets, 128-token rows, fp32, gloo) in seconds: that is what the test
runs; its figures say nothing about speed.

    python bench/gpu_check.py --out gpu_check_out
    python bench/gpu_check.py --tiny --variants eager-full,eager-chunked --out /tmp/gc
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

VARIANTS = ("eager-full", "eager-chunked", "compiled-full", "compiled-chunked")
REAL = ["model.vision.preset=siglip-so400m-patch14-384", "model.llm.preset=qwen2.5-1.5b-instruct",
        "model.projector.pool_size=12"]
TINY = ["model.vision.preset=tiny-siglip", "model.llm.preset=tiny-qwen2", "model.projector.pool_size=2"]


def recipe(tiny: bool, extra=()):
    from vlmforge.config import load_recipe

    base = ["model.vision.pretrained=null", "model.llm.pretrained=null", "model.attn_backend=auto",
            "train.progress_bar=false", "train.tensorboard=false", "train.report=false"]
    return load_recipe("open_qwen2vl/pretrain", base + (TINY if tiny else REAL) + list(extra))


def packed_rows(model, rows: int, length: int, caption: tuple[int, int], seed: int = 0, all_targets: bool = False) -> dict:
    """Rows of `length` tokens packed with image + caption samples (the last one cut at the row's
    end, the rest of the row padding), the pretraining layout; plus pred_index / target_ids of the
    caption tokens (each predicted from the position before it, within its sample), or with
    ``all_targets`` of every next token of the row (the head on every position, as a dense loss)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_input_embeddings().num_embeddings
    t = model.tokens_per_image
    ids = torch.zeros(rows, length, dtype=torch.long)
    seq = torch.full((rows, length), -1, dtype=torch.long)
    images = 0
    for r in range(rows):
        pos, sample = 0, 0
        while pos + t + caption[0] <= length:
            n_text = min(int(torch.randint(caption[0], caption[1] + 1, (1,), generator=g)), length - pos - t)
            ids[r, pos:pos + t] = model.image_token_id
            text = torch.randint(5, vocab - 2, (n_text,), generator=g)
            text[text == model.image_token_id] = 5
            ids[r, pos + t:pos + t + n_text] = text
            seq[r, pos:pos + t + n_text] = sample
            pos += t + n_text
            sample += 1
            images += 1
    nxt_same = (seq[:, 1:] == seq[:, :-1]) & (seq[:, 1:] >= 0) & (ids[:, 1:] != model.image_token_id)
    if all_targets:
        nxt_same = torch.ones_like(nxt_same)
    r_idx, c_idx = nxt_same.nonzero(as_tuple=True)
    positions = torch.zeros_like(seq)
    for r in range(rows):
        for s in seq[r].unique().tolist():
            if s >= 0:
                where = (seq[r] == s).nonzero().flatten()
                positions[r, where] = torch.arange(len(where))
    size = model.image_size
    return {
        "input_ids": ids, "seq_ids": seq, "position_ids": positions,
        "pixel_values": torch.randn(images, 3, size, size, generator=g),
        "pred_index": r_idx * length + c_idx, "target_ids": ids[:, 1:][nxt_same],
    }


def to_device(batch: dict, device, dtype=None) -> dict:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flash_check(args, device) -> dict:
    from vlmforge.model.attention import flash_available
    from vlmforge.model.build import build_vlm

    if device.type != "cuda":
        return {"status": "skipped", "note": "no CUDA device: flash-attn varlen runs on GPUs only"}
    if not flash_available(device):
        return {"status": "skipped", "note": "flash_attn is not installed (pip install -e '.[gpu]')"}
    cfg = recipe(args.tiny, ["model.attn_backend=flash_attention_2", "model.attention=document",
                             "model.positions=restart"])
    model = build_vlm(cfg.model, device=device, seed=0).to(torch.bfloat16).eval()
    if not model.use_flash:
        return {"status": "failed", "note": "model.attn_backend=flash_attention_2 did not select flash-attn"}
    batch = to_device(packed_rows(model, 2, args.seq_len, args.caption, seed=1), device, torch.bfloat16)
    inputs = {k: batch[k] for k in ("input_ids", "seq_ids", "position_ids", "pixel_values")}
    with torch.no_grad():
        flash = model(**inputs).float()
        model.use_sdpa()
        sdpa = model(**inputs).float()
    real = batch["seq_ids"] >= 0
    a, b = flash[real], sdpa[real]
    rel = float((a - b).abs().max() / b.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    ok = rel <= args.flash_tolerance
    del model
    return {"status": "ok" if ok else "failed", "max_abs_diff_over_max_abs": rel, "argmax_agreement": agree,
            "tolerance": args.flash_tolerance, "tokens_compared": int(real.sum()), "dtype": "bf16",
            "note": "document mask, packed rows; flash varlen vs sdpa with the additive mask"}


def run_variant(name: str, args, device, batches) -> dict:
    from vlmforge.model.build import build_vlm
    from vlmforge.train.mfu import StepFlops
    from vlmforge.train.optim import build_optimizer
    from vlmforge.train.parallel import place_model, shard_model

    compiled, chunked = name.startswith("compiled"), name.endswith("chunked")
    cfg = recipe(args.tiny, [f"train.compile={str(compiled).lower()}",
                             f"train.loss_chunk_tokens={args.chunk if chunked else 0}",
                             f"train.activation_checkpointing={str(not args.no_ac).lower()}"])
    model = build_vlm(cfg.model, device=device, seed=0)
    model, place = place_model(model, cfg.train, device, world_size=1)
    shard_model(model, place.compute_dtype)  # FSDP2 on this one rank: the multi-GPU code path
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    flops = StepFlops(model, cfg.train, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, metrics = [], [], []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        total = 0.0
        for b in batches:
            logp = model(**{k: b[k] for k in ("input_ids", "seq_ids", "position_ids", "pixel_values",
                                              "pred_index", "target_ids")}, output="target_logprobs")
            loss = -logp.mean() / len(batches)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(total)
        metrics.append(flops.step_metrics(batches, dt))
    timed = slice(args.warmup, None)
    step = statistics.median(times[timed])
    tokens = sum(int((b["seq_ids"] >= 0).sum()) for b in batches)
    result = {
        "variant": name, "compile": compiled, "loss": f"chunked ({args.chunk} tokens)" if chunked else "full logits",
        "step_s": step, "first_steps_s": sum(times[: args.warmup]),
        "tokens_per_s": tokens / step,
        "tflops_per_s": statistics.median(m["tflops_per_s"] for m in metrics[timed]),
        "mfu": statistics.median(m["mfu"] for m in metrics[timed]),
        "model_tflops_per_step": metrics[-1]["model_tflops"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses, "finite": all(math.isfinite(x) for x in losses),
        "peak_source": flops.peak_source, "sharded": hasattr(params[0], "full_tensor"),
        "attention": "flash-attn varlen" if model.use_flash else "sdpa",
    }
    del model, optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(report: dict) -> str:
    lines = [f"# vlmforge GPU check: {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, {report['shape']}; {report['peak']}", ""]
    fc = report["flash_check"]
    if fc["status"] == "skipped":
        lines.append(f"flash-attn varlen vs sdpa (document mask): skipped: {fc['note']}")
    else:
        lines.append(f"flash-attn varlen vs sdpa (document mask): {fc['status']}, max |diff| / max |logit| "
                     f"{fc['max_abs_diff_over_max_abs']:.2e} (tolerance {fc['tolerance']:g}), argmax agreement "
                     f"{fc['argmax_agreement']:.4f} over {fc['tokens_compared']} tokens")
    lines += ["", f"attention kernel: {report['variants'][0]['attention'] if report['variants'] else '-'}",
              "", "| variant | tokens/s | TFLOPs/s per GPU | MFU | peak memory GiB | step s | first steps s | losses finite |",
              "|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        mem = f"{v['peak_memory_gib']:.1f}" if v["peak_memory_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {v['variant']} | {v['tokens_per_s']:.0f} | {v['tflops_per_s']:.3g} | {v['mfu']:.1%} | {mem} | "
                     f"{v['step_s']:.3f} | {v['first_steps_s']:.1f} | {'yes' if v['finite'] else 'NO'} |")
    lines += ["", f"wall time {report['wall_s']:.0f} s; command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU-sized rows (automatic without CUDA)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rows", type=int, default=None, help="packed rows per step (default 2; tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 4096; tiny 128)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 6; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    ap.add_argument("--chunk", type=int, default=None, help="train.loss_chunk_tokens of the chunked variants")
    ap.add_argument("--no-ac", action="store_true", help="activation checkpointing off (the recipe has it on)")
    ap.add_argument("--targets", choices=["captions", "all"], default="captions",
                    help="the loss on caption tokens (pretraining) or on every next token (the head on all positions)")
    ap.add_argument("--flash-tolerance", type=float, default=2e-2)
    args = ap.parse_args(argv)
    t_start = time.time()
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    args.tiny = args.tiny or device.type != "cuda"
    defaults = {"rows": 2, "seq_len": 128 if args.tiny else 4096, "steps": 2 if args.tiny else 6,
                "warmup": 1 if args.tiny else 3, "chunk": 32 if args.tiny else 1024}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.caption = (5, 12) if args.tiny else (20, 60)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if not dist.is_initialized():  # FSDP2 needs a process group: one rank of our own
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"{'tiny' if args.tiny else 'Open-Qwen2VL'} models, {args.rows} x {args.seq_len} tokens per step", flush=True)

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "python": sys.version.split()[0],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
              "tiny": args.tiny, "command": " ".join(["python", "bench/gpu_check.py", *(argv or sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    report["flash_check"] = flash_check(args, device)
    print(f"flash check: {report['flash_check']}", flush=True)

    from vlmforge.model.build import build_vlm

    shape_model = build_vlm(recipe(args.tiny).model, device="meta")
    batches = [to_device(packed_rows(shape_model, 1, args.seq_len, args.caption, seed=s,
                                     all_targets=args.targets == "all"), device)
               for s in range(args.rows)]
    n_img = sum(int(b["pixel_values"].shape[0]) for b in batches)
    n_targets = sum(int(b["target_ids"].numel()) for b in batches)
    report["shape"] = (f"{args.rows} packed rows x {args.seq_len} tokens per step ({n_img} images, "
                       f"{shape_model.tokens_per_image} visual tokens each, {n_targets} {args.targets} targets), "
                       f"activation checkpointing {'off' if args.no_ac else 'on'}")
    del shape_model
    report["variants"] = []
    for name in variants:
        t0 = time.time()
        result = run_variant(name, args, device, batches)
        report["variants"].append(result)
        report["peak"] = f"MFU against {result['peak_source']}"
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'losses'})} ({time.time() - t0:.0f} s)",
              flush=True)
    report.setdefault("peak", "")
    report["wall_s"] = time.time() - t_start
    report["ok"] = report["flash_check"]["status"] != "failed" and all(v["finite"] for v in report["variants"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
