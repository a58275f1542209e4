"""Read the weights of a published checkpoint folder without running any of its code.

Safetensors files (one, or the shards named by ``model.safetensors.index.json``) are read as
they are. PyTorch ``.bin`` state dicts are read only with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers and refuses anything else (a pickle that would build
arbitrary objects, i.e. run code): such a file is refused with the reason, never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmforge.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Saved by older transformers versions; recomputed at build time, never weights.
NON_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def _shards(folder: Path, index_name: str) -> list[Path]:
    try:
        index = json.loads((folder / index_name).read_text())
        names = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{folder / index_name}: not a readable weight index ({e})") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder / index_name} names shards that are not in the folder: {', '.join(missing[:3])}")
    return [folder / n for n in names]


def weight_files(folder: Path) -> list[Path]:
    """The files holding a folder's weights: safetensors first, else PyTorch .bin state dicts."""
    if (folder / SAFE_INDEX).is_file():
        return _shards(folder, SAFE_INDEX)
    safe = sorted(folder.glob("*.safetensors"))
    if safe:
        return safe
    if (folder / BIN_INDEX).is_file():
        return _shards(folder, BIN_INDEX)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"))
    hint = f" (found {', '.join(others[:3])}: not a transformers state dict name)" if others else ""
    raise UserError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin){hint}")


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict through torch.load(weights_only=True); anything else is refused."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    # weights_only refusals come as pickle.UnpicklingError, a bare Exception subclass; a damaged file as
    # RuntimeError/EOFError. Every one of them is the user's file refused, so all become one UserError.
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: refused: torch.load(weights_only=True) will not read it ({first}). "
            "It holds Python objects beyond tensors, and unpickling them could run code; convert it to "
            "safetensors where you trust the file"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path}: not a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by name, in fp32 (non-weight buffers dropped)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            try:
                part = load_file(str(f))
            except Exception as e:  # safetensors raises its own error types on a damaged header
                raise UserError(f"{f}: not a readable safetensors file ({e})") from None
        else:
            part = load_bin(f)
        out.update(part)
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items() if not k.endswith(NON_WEIGHT_SUFFIXES)}
