"""Training section (owned by vlmforge.train).

One loop serves every stage; a stage is this section (which data, which objective, the
optimisation settings) plus the model section's freeze flags (model.vision/projector/llm.frozen).
Batch sizes count rows (packs in pretraining; SFT rows as the `sft` section batches them).
Each stage reads its data from one place: pretraining from ``train.data_path``, SFT from
``sft.index`` and ``sft.image_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlmforge.config.ranges import ranged

Stage = Literal["pretrain", "sft", "mpo", "prm"]
# InternVL's per-token weights: token 1, sample 1/n, square 1/sqrt(n) (n = the sample's supervised tokens)
LossReduction = Literal["token", "sample", "square"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainConfig:
    stage: Stage = "pretrain"  # pretrain: packed captions; sft: conversations; mpo: preference pairs (see `mpo`); prm: +/- step labels
    # Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/, report.html.
    run_dir: str = "runs/${name}"

    # --- data (paths checked before training starts; SFT reads sft.index / sft.image_root) ---
    # pretrain: a folder of packed shards from `vlmforge pack`.
    data_path: Optional[str] = None

    # --- where the weights start ---
    # A vlmforge checkpoint folder (model.safetensors + config.yaml + tokenizer/) or a run folder
    # (its final/ is used). SFT names the pretraining checkpoint here. None = build from `model`.
    init_from: Optional[str] = None
    # Continue from <run_dir>/checkpoints/latest when it exists (same command after a crash resumes;
    # a rerun with other run settings is refused, see train/runfolder.py). false: start the run over
    # in run_dir (the previous run's checkpoints, metrics and final/ there are removed first).
    resume: bool = True

    # --- objective ---
    objective: Literal["next_token", "mpo"] = "next_token"  # stage mpo uses mpo
    loss_reduction: LossReduction = "token"
    # LM head + cross-entropy in chunks of this many tokens with a custom backward (no
    # [tokens, vocab] logits tensor alive); 0 = the full logits. `fused`: a maintained fused kernel
    # (liger_kernel or cut_cross_entropy extra) on GPU instead of our chunks.
    loss_chunk_tokens: int = ranged(0, ge=0)
    fused_loss: Literal["off", "liger", "cce"] = "off"

    # --- schedule ---
    global_batch_size: int = ranged(8, ge=1)  # rows per optimizer step over all ranks and accumulation steps
    micro_batch_size: int = ranged(2, ge=1)  # rows per forward pass on one rank
    # Assign each optimizer step's rows to ranks so that vision and LLM tokens are balanced
    # (vlmforge.data.balance); False = the loaders' round-robin split. Same rows per step either way.
    balance_ranks: bool = False
    epochs: float = ranged(1.0, ge=0)
    max_steps: int = ranged(0, ge=0)  # > 0 overrides `epochs`

    # --- optimizer ---
    # muon: Muon on the weight matrices inside the network, AdamW on embeddings, head, biases and
    # norms (one process, or FSDP shards, see README)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = ranged(0.02, gt=0)  # the LLM matrices' Muon lr (other components scale it like their AdamW lr)
    muon_momentum: float = ranged(0.95, ge=0, lt=1)
    lr: float = ranged(1e-4, gt=0)  # LLM learning rate (AdamW)
    projector_lr: Optional[float] = ranged(None, gt=0)  # None = lr
    vision_lr: Optional[float] = ranged(None, gt=0)  # None = lr
    weight_decay: float = ranged(0.0, ge=0)
    no_decay_bias_and_norm: bool = True
    adam_beta1: float = ranged(0.9, ge=0, lt=1)
    adam_beta2: float = ranged(0.999, ge=0, lt=1)
    adam_eps: float = ranged(1e-8, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    warmup_ratio: float = ranged(0.03, ge=0, le=1)
    warmup_steps: int = ranged(0, ge=0)  # > 0 overrides warmup_ratio
    min_lr_ratio: float = ranged(0.0, ge=0, le=1)  # decay ends at lr * min_lr_ratio
    grad_clip: float = ranged(1.0, ge=0)  # 0 = off (the norm is still logged)
    # A step whose loss or gradient norm is NaN/inf: false = stop the run there (exit 2, the last good
    # checkpoint stays latest); true = skip that step's update and count it (metrics: skipped_steps).
    skip_nonfinite_steps: bool = False

    # --- systems ---
    device: Device = "auto"
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (before sharding, as torchtitan orders it)
    fsdp: bool = True  # shard with FSDP2 when launched with several processes
    seed: Optional[int] = None  # None = the recipe's top-level seed

    # --- checkpoints and logging ---
    checkpoint_every: int = ranged(0, ge=0)  # steps; 0 = only at the end
    keep_last: int = ranged(2, ge=1)
    log_every: int = ranged(1, ge=1)
    tensorboard: bool = True
    progress_bar: bool = True
    report: bool = True  # write report.html + plots at the end

    # --- live evaluation: scaling curves (benchmarks vs samples seen, as Open-Qwen2VL plots them) ---
    # Every eval_every optimizer steps, before the first step and after the last, the eval_tasks run
    # on the live model (every rank its share of the items); the scores go to metrics.jsonl as
    # eval/<task>/<metric> and the report plots them against samples seen. 0 = off. The other eval
    # settings (synth_dir, batch_size, mc_protocols, strict) come from the eval section.
    eval_every: int = ranged(0, ge=0)
    eval_points: int = ranged(0, ge=0)  # > 0 overrides eval_every: this many evaluations spread evenly over the run
    eval_tasks: list[str] = field(default_factory=list)  # as `vlmforge eval --tasks` names them
    eval_limit: Optional[int] = ranged(None, ge=1)  # questions per task; None = eval.limit
    eval_max_new_tokens: Optional[int] = ranged(None, ge=1)  # None = eval.max_new_tokens
