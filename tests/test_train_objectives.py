"""Loss reductions against hand computations; optimizer groups and the lr schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures_train import build_tiny_vlm, synthetic_loader, tiny_recipe

from vlmforge.train.objectives import NextTokenObjective, forward_fn, token_weights
from vlmforge.train.optim import OptimizerChain, build_optimizer, build_scheduler, lr_factor, param_groups
from vlmforge.train.parallel import Placement

# Row 0 packs two samples (A: positions 0-2, B: 3-6) and one pad; row 1 holds one sample (C) and pads.
LABELS = torch.tensor(
    [
        [-100, 2, 1, -100, 3, 0, 2, -100],
        [-100, 1, 1, 3, -100, -100, -100, -100],
    ]
)
SEQ_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1, -1, -1]])
# Supervised targets (labels[:, 1:]): A -> t=0,1 (n=2); B -> t=3,4,5 (n=3); C -> row 1 t=0,1,2 (n=3).
GROUPS = {"A": [(0, 0), (0, 1)], "B": [(0, 3), (0, 4), (0, 5)], "C": [(1, 0), (1, 1), (1, 2)]}


def weighted_token_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t * CE_t`` (a scalar, fp32) from full logits [B, L, V] (HF convention: position t
    predicts labels[t+1]); the reference the next-token objective is tested against (not used by training)."""
    active = weights > 0
    if not bool(active.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[:, :-1][active].float(), labels[:, 1:][active], reduction="none")
    return (ce * weights[active].to(ce.dtype)).sum()


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 4, generator=g, dtype=torch.float64)


def _ce_by_hand(logits, r, t):
    z = logits[r, t].tolist()
    target = int(LABELS[r, t + 1])
    return math.log(sum(math.exp(v) for v in z)) - z[target]


def _expected(reduction):
    logits = _logits()
    num = den = 0.0
    for members in GROUPS.values():
        n = len(members)
        w = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
        for r, t in members:
            num += w * _ce_by_hand(logits, r, t)
            den += w
    return num / den


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_reduction_matches_hand_computation(reduction):
    logits = _logits()
    w = token_weights(LABELS, SEQ_IDS, reduction)
    got = float(weighted_token_ce(logits, LABELS, w) / w.double().sum())
    assert got == pytest.approx(_expected(reduction), abs=1e-6)


def test_sample_reduction_is_mean_of_per_sample_means():
    logits = _logits()
    means = [sum(_ce_by_hand(logits, r, t) for r, t in m) / len(m) for m in GROUPS.values()]
    assert _expected("sample") == pytest.approx(sum(means) / len(means), abs=1e-12)


def test_weights_per_token():
    w = token_weights(LABELS, SEQ_IDS, "square")
    s2, s3 = 1 / math.sqrt(2), 1 / math.sqrt(3)
    assert torch.allclose(w[0], torch.tensor([s2, s2, 0, s3, s3, s3, 0]), atol=1e-7)
    assert torch.allclose(w[1], torch.tensor([s3, s3, s3, 0, 0, 0, 0]), atol=1e-7)
    assert torch.equal(token_weights(LABELS, SEQ_IDS, "token"), (LABELS[:, 1:] != -100).float())


def test_split_over_micro_batches_equals_whole():
    """sum(w*CE)/W with the global W: splitting rows over micro-batches changes nothing."""
    logits = _logits()
    w = token_weights(LABELS, SEQ_IDS, "sample")
    whole = weighted_token_ce(logits, LABELS, w) / w.sum()
    parts = [weighted_token_ce(logits[i : i + 1], LABELS[i : i + 1], token_weights(LABELS[i : i + 1], SEQ_IDS[i : i + 1], "sample")) for i in range(2)]
    assert float(sum(parts) / w.sum()) == pytest.approx(float(whole), abs=1e-12)


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_next_token_objective_equals_cross_entropy_on_full_logits(reduction):
    """The objective reads log p(target) through the model's target_logprobs output (the head on
    the supervised positions only); loss and gradients equal F.cross_entropy on the full logits."""
    cfg = tiny_recipe(["train.micro_batch_size=3"])
    model = build_tiny_vlm(cfg)
    batch = synthetic_loader(cfg, model).batch(0)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "position_ids", "seq_ids")}
    logits = model(**inputs)
    labels = batch["labels"]
    if reduction == "token":  # the plain mean over supervised tokens, as transformers computes it
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        w = token_weights(labels, batch["seq_ids"], reduction)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
        want = (ce * w).sum() / w.sum()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    obj = NextTokenObjective(reduction)
    obj.begin_step(obj.step_stats([batch]))
    run = forward_fn(model, Placement(torch.device("cpu"), 1, False, torch.float32))
    loss, parts = obj.micro_loss(run, batch, 0)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert obj.end_step({k: float(v) for k, v in parts.items()}, obj.step_stats([batch]), True)["loss"] == pytest.approx(
        want.item(), abs=1e-6)
    for n, p in model.named_parameters():
        if n in want_grads:
            assert torch.allclose(p.grad, want_grads[n], atol=1e-6), n


def test_unknown_reduction_rejected():
    with pytest.raises(ValueError, match="loss_reduction"):
        token_weights(LABELS, SEQ_IDS, "mean")


def test_schedule_warmup_then_cosine_and_linear():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(0.125)  # last step still learns
    assert lr_factor(9, 10, 2, "constant") == 1.0
    assert lr_factor(9, 10, 2, "cosine", min_ratio=0.1) > 0.1


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Linear(2, 2)
        self.projector = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        self.llm = torch.nn.Linear(3, 3)


def test_param_groups_lrs_decay_and_frozen():
    from types import SimpleNamespace

    m = _Tiny()
    m.vision.requires_grad_(False)
    cfg = SimpleNamespace(lr=2e-5, projector_lr=1e-3, vision_lr=None, weight_decay=0.1, no_decay_bias_and_norm=True,
                          lr_schedule="cosine", warmup_ratio=0.5, warmup_steps=0, min_lr_ratio=0.0)
    groups = {g["name"]: g for g in param_groups(m, cfg)}
    assert set(groups) == {"projector", "projector_no_decay", "llm", "llm_no_decay"}  # vision frozen: absent
    assert groups["projector"]["lr"] == 1e-3 and groups["llm"]["lr"] == 2e-5
    assert groups["llm_no_decay"]["weight_decay"] == 0.0 and groups["llm"]["weight_decay"] == 0.1
    no_decay = {id(p) for p in groups["projector_no_decay"]["params"]}
    assert no_decay == {id(m.projector[0].bias), id(m.projector[1].weight), id(m.projector[1].bias)}
    opt = torch.optim.AdamW(param_groups(m, cfg))
    sched = build_scheduler(opt, cfg, total_steps=4)
    assert [g["lr"] for g in opt.param_groups][0] == pytest.approx(1e-3 * 0.5)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups][0] == pytest.approx(1e-3)


class _TinyLM(torch.nn.Module):
    """Embedding, one hidden matrix, a norm and a tied head, under the VLM's component names."""

    def __init__(self):
        super().__init__()
        self.projector = torch.nn.Linear(4, 8)
        self.llm = torch.nn.ModuleDict({"embed": torch.nn.Embedding(16, 8), "mix": torch.nn.Linear(8, 8),
                                        "norm": torch.nn.LayerNorm(8)})


def _muon_cfg(**kw):
    from types import SimpleNamespace

    base = dict(optimizer="muon", lr=1e-3, projector_lr=5e-4, vision_lr=None, muon_lr=0.02, muon_momentum=0.95,
                weight_decay=0.0, no_decay_bias_and_norm=True, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                lr_schedule="cosine", warmup_ratio=0.0, warmup_steps=0, min_lr_ratio=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_muon_takes_the_matrices_adamw_the_rest():
    m = _TinyLM()
    opt = build_optimizer(m, _muon_cfg())
    assert isinstance(opt, OptimizerChain)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {id(m.projector.weight), id(m.llm["mix"].weight)}  # the embedding table stays with AdamW
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == {id(p) for p in m.parameters()}
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["llm_muon"] == 0.02 and lrs["projector_muon"] == pytest.approx(0.01)  # projector at half the lr
    assert lrs["llm_no_decay"] == 1e-3

    # the matrix's first update is Muon's: the momentum orthogonalised, so all its singular values
    # are about equal (Newton-Schulz lands them in ~[0.5, 1.5]), while the gradient's spread widely
    w = m.llm["mix"].weight
    before = w.detach().clone()
    grad = torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])) @ torch.linalg.qr(torch.randn(8, 8))[0]
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = grad
    sched = build_scheduler(opt, _muon_cfg(), total_steps=10)
    opt.step()
    sched.step()
    sv = torch.linalg.svdvals(before - w.detach())
    assert sv.max() / sv.min() < 4  # the gradient's ratio is 160
    assert len(sched.get_last_lr()) == len(opt.param_groups)
    assert torch.equal(m.llm["embed"].weight.grad, torch.zeros(16, 8))


def test_unknown_optimizer_rejected():
    from vlmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="adamw or muon"):
        build_optimizer(_TinyLM(), _muon_cfg(optimizer="sgd"))


def test_muon_matches_torch_muon():
    """Ours runs Newton-Schulz in fp32 off the GPU, torch's in bf16: the same update to bf16
    precision, over several steps of momentum and weight decay (a tall, a wide and a square matrix)."""
    from vlmforge.train.muon import Muon

    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in [(24, 8), (8, 24), (16, 16)]]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9)
    a, b = torch.optim.Muon(ref, **kw), Muon(ours, **kw)
    start = [p.detach().clone() for p in ref]
    for _ in range(3):
        for p, q in zip(ref, ours):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ref, ours, start):
        moved = (p - p0).abs().max()
        assert moved > 0.01
        assert (p - q).abs().max() < 0.02 * moved  # bf16 keeps ~3 significant digits


def test_muon_batches_same_shape_matrices_as_one_by_one():
    """Same-shape matrices go through one batched Newton-Schulz iteration: the same updates as
    orthogonalising each on its own (fp32 rounding apart), tall, wide and square alike."""
    from vlmforge.train.muon import orthogonalise, orthogonalise_all

    torch.manual_seed(0)
    mats = [torch.randn(*s) for s in [(24, 8), (16, 16), (24, 8), (8, 24), (16, 16), (24, 8), (8, 24)]]
    coeffs = (3.4445, -4.7750, 2.0315)
    batched = orthogonalise_all(mats, coeffs, 5, 1e-7)
    for m, got in zip(mats, batched):
        want = orthogonalise(m, coeffs, 5, 1e-7)
        assert got.shape == m.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
