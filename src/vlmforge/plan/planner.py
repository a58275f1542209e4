"""A training run's plan from its recipe: the settings the estimate needs, the MFU to assume, the report.

What the recipe does not say is an assumption, printed with the plan:

- the share of image tokens: from the packed folder's manifest (train.data_path) when it exists,
  else ``tokens_per_image / (tokens_per_image + text tokens per image)`` with
  ``TEXT_TOKENS_PER_IMAGE`` by stage (Open-Qwen2VL's 5B packed tokens from 29M pairs are about 172
  tokens a sample, 144 of them visual); the supervised share is the rest (an upper bound for SFT,
  where prompts carry no loss);
- the MFU: ``--mfu``, else a ``bench/gpu_check.sh`` result's (``--measured`` or the first of
  ``MEASURED_PATHS``; the variant with the recipe's compile and loss settings), else
  ``estimate.DEFAULT_MFU``;
- rows are full (``pack.max_len`` / ``sft.max_len`` / ``preference.max_len`` tokens).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from vlmforge.config.recipe import Recipe
from vlmforge.errors import UserError
from vlmforge.plan import estimate
from vlmforge.plan.hardware import GIB, GPU, GPUS
from vlmforge.plan.shape import ModelShape, model_shape

TEXT_TOKENS_PER_IMAGE = {"pretrain": 28, "sft": 200, "mpo": 200}
MEASURED_PATHS = ("gpu_check_out/gpu_check.json", "gpu_check.json")  # bench/gpu_check.sh's default OUT first
SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, what: str = "--tokens") -> float:
    """``5B``, ``500M``, ``1.2e9``, ``12k`` -> a number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"{what} {text!r}: expected a number such as 5B, 500M or 1.2e9")
    value = float(m.group(1)) * SUFFIXES[m.group(2).lower()]
    if not value > 0:
        raise UserError(f"{what} {text!r} must be positive")
    return value


def sequence_length(cfg: Recipe) -> int:
    stage = str(cfg.train.stage)
    if stage in ("sft", "prm"):
        return int(cfg.sft.max_len)
    if stage == "mpo":
        return int(cfg.preference.max_len)
    return int(cfg.pack.max_len)


def packed_visual_fraction(folder: str | None, tokens_per_image: int) -> float | None:
    """Image tokens / all tokens of a `vlmforge pack` output, or None when there is none to read."""
    path = Path(folder) / "manifest.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the packed data's manifest ({e})") from None
    mix = m.get("text_mix", {})
    images = m.get("counts", {}).get("image_samples")
    total = mix.get("multimodal_tokens", 0) + mix.get("text_tokens", 0)
    if not images or not total:
        return None
    return min(1.0, images * int(m.get("geometry", {}).get("visual_tokens", tokens_per_image)) / total)


def _mfu_values(node, where: str = "") -> list[tuple[float, str, dict]]:
    """Every ``mfu`` number in (0, 1] of a JSON tree: (value, where, the object holding it)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k.lower() == "mfu" and isinstance(v, (int, float)) and 0 < v <= 1:
                found.append((float(v), where or "top level", node))
            else:
                found += _mfu_values(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _mfu_values(v, f"{where}[{i}]")
    return found


def _matches(entry: dict, compiled: bool, chunked: bool) -> bool:
    loss = str(entry.get("loss", ""))
    return bool(entry.get("compile", compiled)) == compiled and (("chunked" in loss) == chunked or not loss)


def measured_mfu(path: str | None, *, compiled: bool = False, chunked: bool = False) -> tuple[float, str] | None:
    """The MFU of a ``bench/gpu_check.sh`` result (``--measured``, else the first of MEASURED_PATHS
    that exists): the variant with the recipe's train.compile and chunked loss, else the best one.
    A CPU or tiny-model run is refused (its MFU says nothing about a GPU)."""
    candidates = [Path(path)] if path else [Path(p) for p in MEASURED_PATHS]
    for p in candidates:
        if not p.is_file():
            if path:
                raise UserError(f"--measured {p}: file not found")
            continue
        try:
            report = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not JSON ({e.msg})") from None
        device = str(report.get("device", "")) if isinstance(report, dict) else ""
        if isinstance(report, dict) and (report.get("tiny") or device.upper().startswith("CPU")):
            if path:
                raise UserError(f"--measured {p}: a {'tiny-model' if report.get('tiny') else 'CPU'} run; "
                                "its MFU says nothing about a GPU (run bench/gpu_check.sh on one)")
            continue
        values = _mfu_values(report)
        if not values:
            if path:
                raise UserError(f"--measured {p}: no 'mfu' value between 0 and 1 in it")
            continue
        same = [v for v in values if _matches(v[2], compiled, chunked)]
        best, where, entry = max(same or values, key=lambda v: v[0])
        label = entry.get("variant", where)
        return best, f"measured: {p} ({label}{', ' + device if device else ''})"
    return None


def workload_from_recipe(cfg: Recipe, shape: ModelShape, gpus: int, visual_fraction: float | None,
                         attention_kernel: str | None) -> tuple[estimate.Workload, str]:
    """The run's settings, and where the image-token share came from."""
    stage = str(cfg.train.stage)
    source = "--visual-fraction"
    if visual_fraction is None:
        visual_fraction = packed_visual_fraction(cfg.train.data_path if stage == "pretrain" else None,
                                                 shape.tokens_per_image)
        source = f"{cfg.train.data_path}/manifest.json"
    if visual_fraction is None:
        text = TEXT_TOKENS_PER_IMAGE.get(stage, TEXT_TOKENS_PER_IMAGE["sft"])
        visual_fraction = shape.tokens_per_image / (shape.tokens_per_image + text)
        source = f"assumed: {text} text tokens per image ({stage})"
    if not 0 <= visual_fraction < 1:
        raise UserError(f"--visual-fraction {visual_fraction} must be in [0, 1)")
    precision = str(cfg.train.mixed_precision)
    kernel = attention_kernel or ("sdpa" if str(cfg.model.attn_backend) in ("sdpa", "eager") else "flash")
    if kernel not in estimate.ATTENTION_KERNELS:
        raise UserError(f"--attention-kernel {kernel!r} is not one of {', '.join(estimate.ATTENTION_KERNELS)}")
    w = estimate.Workload(
        # MPO counts pairs: at most two rows of preference.max_len each (the duplicated layout)
        gpus=gpus, micro_batch=int(cfg.train.micro_batch_size) * (2 if stage == "mpo" else 1), seq_len=sequence_length(cfg),
        visual_fraction=float(visual_fraction), supervised_fraction=1.0 - float(visual_fraction),
        compute_bytes=4 if precision == "fp32" else 2,  # auto: bf16 on GPUs
        optimizer=str(cfg.train.optimizer), sharded=bool(cfg.train.fsdp), attention_kernel=kernel,
    )
    return w, source


def make_plan(cfg: Recipe, *, gpus: int, gpu: str, tokens: float, mfu: float | None = None,
              measured: str | None = None, gpu_hours: float | None = None, visual_fraction: float | None = None,
              attention_kernel: str | None = None, shape: ModelShape | None = None) -> dict:
    """Everything ``vlmforge plan`` prints, as a dict (bytes, FLOPs, hours)."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if gpus < 1:
        raise UserError(f"--gpus {gpus} must be at least 1")
    device: GPU = GPUS[gpu]
    shape = shape or model_shape(cfg)
    w, fraction_source = workload_from_recipe(cfg, shape, gpus, visual_fraction, attention_kernel)
    chunk = int(cfg.train.loss_chunk_tokens)
    memory = estimate.memory_plan(shape, w, bool(cfg.train.activation_checkpointing), chunk)
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise UserError(f"--mfu {mfu} must be in (0, 1]")
        mfu_source = "--mfu"
    else:
        found = measured_mfu(measured, compiled=bool(cfg.train.compile), chunked=chunk > 0)
        mfu, mfu_source = found if found else (estimate.DEFAULT_MFU, "assumed (no gpu_check result found)")
    attention = str(cfg.model.attention)
    per_token = estimate.flops_per_token(shape, w, attention)
    span = estimate.span(shape, w, attention)
    time = estimate.time_plan(tokens, per_token, device, gpus, mfu)
    step_tokens = int(cfg.train.global_batch_size) * w.seq_len
    plan = {
        "recipe": cfg.name, "stage": str(cfg.train.stage), "gpu": gpu, "gpu_name": device.name,
        "gpu_memory_bytes": device.memory_bytes, "gpus": gpus, "tokens": tokens,
        "shape": asdict(shape), "workload": asdict(w), "visual_fraction_source": fraction_source,
        "checkpointing": bool(cfg.train.activation_checkpointing), "loss_chunk_tokens": chunk,
        "fused_loss": str(cfg.train.fused_loss),
        "memory": {
            "states": memory["states"],
            "activations": {"checkpointing" if k else "no_checkpointing": v for k, v in memory["activations"].items()},
            "logits": memory["logits"], "logits_chunk_tokens": memory["chunk_tokens"],
            "totals": {f"{'checkpointing' if ck else 'no_checkpointing'}/{head}": v
                       for (ck, head), v in memory["totals"].items()},
            "total": memory["total"], "fits": memory["total"] <= device.memory_bytes,
            "reserve": {"bytes": estimate.RESERVE_BYTES, "fraction": estimate.RESERVE_FRACTION},
        },
        "flops_per_token": per_token, "span": span,
        "flops_per_token_llm": shape.llm_token_flops(span),
        "flops_per_token_image": per_token - shape.llm_token_flops(span),
        "mfu": mfu, "mfu_source": mfu_source, **time,
        "step_tokens": step_tokens, "steps": math.ceil(tokens / step_tokens),
        "notes": [],
    }
    if plan["stage"] in ("sft", "prm") and str(cfg.sft.batching) == "length_group":
        plan["notes"].append("sft.batching=length_group puts one conversation in a row; rows are taken as full "
                             f"({w.seq_len} tokens), so memory and attention FLOPs are upper bounds")
    if plan["fused_loss"] != "off":
        plan["notes"].append(f"train.fused_loss={plan['fused_loss']} is not modelled: read the chunked column")
    if gpu_hours is not None:
        if not gpu_hours > 0:
            raise UserError(f"--gpu-hours {gpu_hours} must be positive")
        plan["given_gpu_hours"] = gpu_hours
        plan["implied_mfu"] = estimate.implied_mfu(tokens, per_token, device, gpu_hours)
    return plan


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _count(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: dict) -> str:
    s, w, m = p["shape"], p["workload"], p["memory"]
    shards = w["gpus"] if w["sharded"] and w["gpus"] > 1 else 1
    opt = "Muon + AdamW" if w["optimizer"] == "muon" else "AdamW"
    precision = "bf16" if w["compute_bytes"] == 2 else "fp32"
    lines = [
        f"plan: {p['recipe']} ({p['stage']}) on {p['gpus']} x {p['gpu_name']}, {_count(p['tokens'])} tokens",
        f"model: {_count(s['params_total'])} parameters ({_count(s['params_trainable'])} trainable), "
        f"{s['tokens_per_image']} visual tokens per image; micro-batch {w['micro_batch']} x {w['seq_len']} tokens, "
        f"{precision}, " + (f"FSDP2 over {shards} GPUs" if shards > 1 else "no sharding") + f", {opt}, "
        f"attention kernel {w['attention_kernel']}",
        f"data: {w['visual_fraction']:.1%} image tokens ({p['visual_fraction_source']}), "
        f"{w['supervised_fraction']:.1%} with a loss (the LM head runs on those)",
        "",
        f"{'memory per GPU':<40}{'GiB':>8}",
    ]
    terms = [
        (f"fp32 weights (1/{shards} each)", m["states"]["parameters"]),
        ("fp32 gradients", m["states"]["gradients"]),
        (f"{opt} states", m["states"]["optimizer"]),
        (f"gathered {precision} weights and gradients", m["states"]["gathered"]),
        ("activations, no checkpointing", m["activations"]["no_checkpointing"]),
        ("activations, checkpointing", m["activations"]["checkpointing"]),
        ("logits, full", m["logits"]["full"]),
        (f"logits, chunked ({m['logits_chunk_tokens']} tokens)", m["logits"]["chunked"]),
    ]
    lines += [f"  {label:<38}{_gib(value)}" for label, value in terms]
    lines += [
        f"total with the reserve ({m['reserve']['bytes'] / GIB:.1f} GiB + {m['reserve']['fraction']:.0%}), GiB:",
        f"{'':22}{'full logits':>12}{'chunked':>10}",
    ]
    chosen = ("checkpointing" if p["checkpointing"] else "no_checkpointing",
              "chunked" if p["loss_chunk_tokens"] > 0 else "full")
    for ck in ("no_checkpointing", "checkpointing"):
        cells = []
        for head in ("full", "chunked"):
            mark = "*" if (ck, head) == chosen else " "
            cells.append(f"{m['totals'][f'{ck}/{head}'] / GIB:9.2f}{mark}")
        lines.append(f"  {ck.replace('_', ' '):<20}{cells[0]:>12}{cells[1]:>10}")
    lines.append(f"  * this recipe (train.activation_checkpointing={str(p['checkpointing']).lower()}, "
                 f"train.loss_chunk_tokens={p['loss_chunk_tokens']})")
    verdict = "fits" if m["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {p['gpu_name']} ({p['gpu_memory_bytes'] / GIB:.1f} GiB): "
                 f"{m['total'] / GIB:.2f} GiB per GPU")
    lines += [
        "",
        f"time at MFU {p['mfu']:.3f} ({p['mfu_source']}):",
        f"  model FLOPs per token {_count(p['flops_per_token'])} (LLM {_count(p['flops_per_token_llm'])} with "
        f"attention over {p['span']:.0f} tokens, images {_count(p['flops_per_token_image'])})",
        f"  {p['flops']:.3g} FLOPs in all; {p['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU",
        f"  {p['gpu_hours']:,.1f} GPU-hours, {p['wall_hours']:,.2f} h on {p['gpus']} GPUs; "
        f"{p['steps']:,} optimizer steps of {p['step_tokens']:,} tokens (full rows)",
    ]
    lines += [f"note: {n}" for n in p["notes"]]
    if "implied_mfu" in p:
        lines.append(f"  {p['given_gpu_hours']:g} GPU-hours for these tokens imply MFU {p['implied_mfu']:.3f} "
                     f"(model FLOPs / ({p['given_gpu_hours']:g} h x 3600 x {p['gpu_name']} peak)")
    return "\n".join(lines)
