"""train.compile: place_model compiles each decoder layer (inductor on CPU, through the system C++
compiler); five AdamW steps give the eager run's losses within 1e-5, with and without activation
checkpointing, and the state-dict keys stay those of the eager model (checkpoints load either way)."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixtures_train import build_tiny_vlm, one_torch_thread, synthetic_loader, tiny_recipe

from vlmforge.train.parallel import place_model

STEPS = 5

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _targets(labels: torch.Tensor):
    """pred_index / target_ids of the supervised next tokens (the model's target_logprobs contract)."""
    rows, length = labels.shape
    supervised = labels[:, 1:] != -100
    r, c = supervised.nonzero(as_tuple=True)
    return r * length + c, labels[:, 1:][supervised]


def _losses(overrides) -> tuple[list[float], list[str]]:
    cfg = tiny_recipe(["model.vision.frozen=false", *overrides])
    model = build_tiny_vlm(cfg)
    model, _ = place_model(model, cfg.train, torch.device("cpu"), world_size=1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = iter(synthetic_loader(cfg, model))
    losses = []
    for _ in range(STEPS):
        b = next(batches)
        pred_index, target_ids = _targets(b["labels"])
        inputs = {k: b[k] for k in ("input_ids", "pixel_values", "position_ids", "seq_ids") if k in b}
        loss = -model(**inputs, output="target_logprobs", pred_index=pred_index, target_ids=target_ids).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, list(model.state_dict())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_layers_give_eager_losses():
    torch._dynamo.reset()
    eager, eager_keys = _losses([])
    compiled, compiled_keys = _losses(["train.compile=true"])
    assert compiled_keys == eager_keys and not any("_orig_mod" in k for k in compiled_keys)
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-5, (eager, compiled)
    assert eager[-1] < eager[0]  # it trains
    checkpointed, _ = _losses(["train.compile=true", "train.activation_checkpointing=true"])
    assert max(abs(a - b) for a, b in zip(eager, checkpointed)) <= 1e-5, (eager, checkpointed)
    # one compiled graph served every layer: no per-layer recompiles
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
