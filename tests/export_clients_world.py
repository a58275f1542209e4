"""The vlmforge side of tests/test_export_clients.py, run by it as a subprocess (so the test itself
imports transformers only): a tiny synthetic world and tokenizer, a random tiny VLM checkpoint,
its `vlmforge export` folder, and vlmforge's own greedy answers (`vlmforge eval` predictions on
the held-out benchmarks, `vlmforge generate` on a two-image prompt).

usage: export_clients_world.py OUT
Writes OUT/world, OUT/tok, OUT/ckpt, OUT/exported, OUT/eval/predictions.jsonl, OUT/two_images.json.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from vlmforge.arch.tokens import IM_END
from vlmforge.cli import main as vlmforge
from vlmforge.config import load_recipe
from vlmforge.model.build import build_vlm
from vlmforge.model.saving import save_vlm
from vlmforge.text.tokenization import load_tokenizer

SYNTH = {"num_captions": 20, "samples_per_shard": 20, "num_sft": 8, "num_mcq": 3, "num_vqa": 8,
         "num_pope_images": 2, "num_text": 200, "num_vision": 4, "num_preference": 0}
MAX_NEW_TOKENS = 24
TWO_IMAGES_PROMPT = "<image>\n<image>\nWhich picture has more shapes?"


def random_checkpoint(tok_dir: Path, out: Path) -> None:
    """A random tiny VLM at full grid (exportable). Its LM weights are drawn wide (greedy decoding
    is then not one repeated token) and the <|im_end|> output row is scaled up, so greedy answers
    end at <|im_end|> after differing numbers of tokens, as a trained model's do."""
    cfg = load_recipe("tiny/model", [f"tokenizer.path={tok_dir}", "model.projector.pool_size=null"])
    tok = load_tokenizer(tok_dir)
    model = build_vlm(cfg.model, tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.llm.get_output_embeddings().weight[tok.convert_tokens_to_ids(IM_END)] *= 3.0
    save_vlm(model, tok, cfg, out)


def run(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = vlmforge(list(argv))
    if code != 0:
        raise SystemExit(f"vlmforge {' '.join(argv)} exited {code}:\n{buf.getvalue()}")
    return buf.getvalue()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world, tok, ckpt = out / "world", out / "tok", out / "ckpt"
    run("synth", "--out", str(world), "--clean", "--quiet", *(a for k, v in SYNTH.items() for a in ("--set", f"synth.{k}={v}")))
    run("tokenizer", "train", "--corpus", str(world), "--out", str(tok))
    random_checkpoint(tok, ckpt)
    run("export", "--ckpt", str(ckpt), "--out", str(out / "exported"))
    run("eval", "--ckpt", str(ckpt), "--tasks", "synth", "--synth-dir", str(world), "--out", str(out / "eval"),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--mc-protocol", "generate")
    images = [str(world / "eval" / "images" / "vqa-00000.jpg"), str(world / "eval" / "images" / "vqa-00001.jpg")]
    answer = run("generate", "--ckpt", str(ckpt), "--image", images[0], "--image", images[1],
                 "--prompt", TWO_IMAGES_PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS))
    (out / "two_images.json").write_text(json.dumps(
        {"images": images, "prompt": TWO_IMAGES_PROMPT, "answer": answer.removesuffix("\n"), "max_new_tokens": MAX_NEW_TOKENS}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
