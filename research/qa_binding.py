"""Can the demo's language model learn the world's questions when it sees perfectly? (demo diagnosis)

The image is replaced by 9 symbolic visual tokens, one per cell of the 3x3 grid: learned
embeddings of the cell's shape, colour and size (or "none") plus a cell embedding, i.e. a
vision tower and projector that make no mistakes. The LM preset then trains on the world's short
questions (LLaVA prompts and chat template, loss on the answer), from random weights, on fresh
batches. Two runs side by side, same steps:

    colour only:  "What color is the circle?" / "... the shape in the top left corner?"
    full mix:     colour, shape, count, position, existence questions and 4-way multiple choice

Greedy answers on 400 held-out questions are scored by exact match, per category and per object
count (`color/n2` ...). `--only CATS` trains one mix; `--qk-init-std STD` compares the preset's
Q/K init with STD side by side; `--compare-optimizers` compares vlmforge's AdamW and Muon
(`train.optimizer`) side by side; `--optimizer muon` trains the mixes with Muon.

    python research/qa_binding.py --tokenizer demo_out/tokenizer [--steps 1000] [--max-objects 4]
    python research/qa_binding.py --tokenizer demo_out/tokenizer --only color --steps 500 --lr 1e-3 --qk-init-std 0.08
    python research/qa_binding.py --tokenizer demo_out/tokenizer --only existence --steps 800 --lr 1e-3 --compare-optimizers

Measured results: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
SIZES = ["small", "large"]


class SymbolicWorld:
    def __init__(self, tok, max_objects: int, categories: list[str]):
        from vlmforge.config import load_recipe
        from vlmforge.synth.world import SceneSampler

        self.world = SceneSampler.from_config(load_recipe(None, [f"synth.max_objects={max_objects}"]).synth)
        self.tok, self.categories = tok, categories

    def sample(self, rng: np.random.Generator) -> dict:
        from vlmforge.synth.questions import ask, format_mcq_prompt, mcq
        from vlmforge.synth.world import CELLS

        w = self.world
        scene = w.sample(rng)
        cat = self.categories[int(rng.integers(len(self.categories)))]
        if cat == "mcq":
            qa = ask(["color", "shape", "count", "position"][int(rng.integers(4))], scene, rng, w)
            options, letter = mcq(qa, rng)
            text, answer, cat = format_mcq_prompt(qa.question, options, LETTER), letter, f"mcq-{qa.category}"
        else:
            qa = ask(cat, scene, rng, w)
            text, answer = f"{qa.question}\n{SHORT}", qa.short
        prompt = self.tok.apply_chat_template([{"role": "user", "content": "<image>\n" + text}],
                                              tokenize=False, add_generation_prompt=True)
        cells = np.zeros((9, 3), np.int64)
        for o in scene.objects:
            cells[CELLS.index(o.cell)] = [1 + w.shapes.index(o.shape), 1 + w.colors.index(o.color), 1 + SIZES.index(o.size)]
        return {"prompt": prompt, "answer": answer, "cells": cells, "category": cat, "objects": len(scene.objects)}


class SymbolicVLM(nn.Module):
    """The LM preset with each <image> replaced by 9 perfect cell tokens."""

    def __init__(self, tok, preset: str, world):
        super().__init__()
        from vlmforge.config import load_recipe
        from vlmforge.model.build import build_llm

        self.llm = build_llm(load_recipe(None, [f"model.llm.preset={preset}"]).model, vocab_size=len(tok))
        d = self.llm.config.hidden_size
        # named "projector" so that train.optim groups it like the VLM's (all embedding tables: AdamW)
        self.projector = nn.Module()
        self.projector.attrs = nn.ModuleList([nn.Embedding(len(world.shapes) + 1, d), nn.Embedding(len(world.colors) + 1, d),
                                              nn.Embedding(len(SIZES) + 1, d)])
        self.projector.cell = nn.Embedding(9, d)
        with torch.no_grad():
            self.projector.cell.weight.mul_(0.02)
        self.image_id = tok.convert_tokens_to_ids("<image>")

    def embed(self, ids: list[int], cells: np.ndarray) -> torch.Tensor:
        k = ids.index(self.image_id)
        text = self.llm.get_input_embeddings()(torch.tensor(ids))
        c = torch.from_numpy(cells)
        vis = sum(e(c[:, j]) for j, e in enumerate(self.projector.attrs)) + self.projector.cell.weight
        return torch.cat([text[:k], vis, text[k + 1 :]])


def batch_loss(model, tok, samples) -> torch.Tensor:
    rows, labels = [], []
    for s in samples:
        p = tok(s["prompt"], add_special_tokens=False).input_ids
        a = tok(s["answer"] + "<|im_end|>", add_special_tokens=False).input_ids
        rows.append(model.embed(p + a, s["cells"]))
        labels.append(torch.tensor([-100] * (len(p) + 8) + a))  # +8: one <image> became 9 tokens
    n = max(len(r) for r in rows)
    emb = torch.stack([nn.functional.pad(r, (0, 0, 0, n - len(r))) for r in rows])
    lab = torch.stack([nn.functional.pad(lb, (0, n - len(lb)), value=-100) for lb in labels])
    mask = torch.arange(n)[None] < torch.tensor([len(r) for r in rows])[:, None]
    return model.llm(inputs_embeds=emb, attention_mask=mask.long(), labels=lab).loss


@torch.no_grad()
def evaluate(model, tok, samples, max_new: int = 6) -> dict[str, float]:
    model.eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    hits: dict[str, list[bool]] = {}
    for s in samples:
        emb = model.embed(tok(s["prompt"], add_special_tokens=False).input_ids, s["cells"])[None]
        out = []
        for _ in range(max_new):
            t = int(model.llm(inputs_embeds=emb).logits[0, -1].argmax())
            if t == end:
                break
            out.append(t)
            emb = torch.cat([emb, model.llm.get_input_embeddings()(torch.tensor([[t]]))], 1)
        ok = tok.decode(out).strip().lower() == s["answer"].lower()
        hits.setdefault(s["category"], []).append(ok)
        hits.setdefault(f"{s['category']}/n{s['objects']}", []).append(ok)  # by number of objects
    model.train()
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def run(tok, args, categories: list[str], qk_init_std: float | None = None,
        optimizer: str | None = None) -> dict[str, float]:
    """Train a fresh model on ``categories`` with vlmforge's optimizer (``train.optimizer``)."""
    from vlmforge.config.train import TrainConfig
    from vlmforge.model.build import init_query_key_
    from vlmforge.train.optim import build_optimizer, torch_optimizers

    torch.manual_seed(args.seed)
    world = SymbolicWorld(tok, args.max_objects, categories)
    model = SymbolicVLM(tok, args.preset, world.world)
    if qk_init_std is not None:
        init_query_key_(model.llm, qk_init_std)
    tcfg = TrainConfig(optimizer=optimizer or args.optimizer, lr=args.lr, muon_lr=args.muon_lr, weight_decay=0.01)
    opt = build_optimizer(model, tcfg)
    warm = 50
    scheds = [torch.optim.lr_scheduler.LambdaLR(
        o, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)))
        for o in torch_optimizers(opt)]
    rng = np.random.default_rng(0)
    erng = np.random.default_rng(123)
    held_out = [world.sample(erng) for _ in range(args.eval_questions)]
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = batch_loss(model, tok, [world.sample(rng) for _ in range(args.batch)])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for sched in scheds:
            sched.step()
        if step % args.every == 0 or step == args.steps:
            print(f"  [{'+'.join(categories)}, {tcfg.optimizer}] step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return evaluate(model, tok, held_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder trained on the world (demo_out/tokenizer)")
    ap.add_argument("--preset", default="small-qwen2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--eval-questions", type=int, default=400)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--only", default=None, metavar="CATS",
                    help="train one mix instead of the two defaults, e.g. --only color or --only existence")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation seed (the data stream is fixed)")
    ap.add_argument("--qk-init-std", type=float, default=None, metavar="STD",
                    help="train the mix twice side by side: preset init vs W_Q, W_K drawn with this std "
                         "(model.llm.qk_init_std)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="train.optimizer for every run")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="train.muon_lr")
    ap.add_argument("--compare-optimizers", action="store_true",
                    help="train the mix (--only, default the full mix) with AdamW and with Muon, side by side")
    args = ap.parse_args()
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    header = (f"\nexact-match accuracy after {args.steps} steps of {args.batch} (perfect visual tokens, "
              f"1-{args.max_objects} objects; /nK = questions about images with K objects):")
    if args.compare_optimizers:
        cats = (args.only or "color,shape,count,position,existence,mcq").split(",")
        arms = {name: run(tok, args, cats, args.qk_init_std, name) for name in ("adamw", "muon")}
        print(header)
        for name, res in arms.items():
            print(f"  {name:6s} " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if "/n" not in k))
        for k in (k for k in arms["adamw"] if "/n" not in k):
            print(f"  {k}: muon / adamw: {arms['muon'][k] / max(arms['adamw'][k], 1e-9):.2f}")
        return
    if args.qk_init_std is not None:
        cats = (args.only or "color").split(",")
        base, wide = run(tok, args, cats), run(tok, args, cats, args.qk_init_std)
        print(header)
        print(f"  {'+'.join(cats)}, preset init:        " + ", ".join(f"{k} {v:.2f}" for k, v in base.items()))
        print(f"  {'+'.join(cats)}, qk init std {args.qk_init_std:<6g}: " + ", ".join(f"{k} {v:.2f}" for k, v in wide.items()))
        for c in (c for c in cats if c in base):
            print(f"  {c}: qk init std {args.qk_init_std:g} / preset init: {wide[c] / max(base[c], 1e-9):.2f}")
        return
    if args.only:
        cats = args.only.split(",")
        res = run(tok, args, cats)
        print(header)
        print(f"  {'+'.join(cats)}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
        return
    colour = run(tok, args, ["color"])
    full = run(tok, args, ["color", "shape", "count", "position", "existence", "mcq"])
    print(header)
    print("  colour only: " + ", ".join(f"{k} {v:.2f}" for k, v in colour.items()))
    print("  full mix:    " + ", ".join(f"{k} {v:.2f}" for k, v in full.items() if "/" not in k))
    print(f"  colour, full mix / colour only: {full['color'] / max(colour['color'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
