"""The chunked LM-head log-probs (vlmforge.model.lm_head) equal the full-logits path: values and
gradients into the hidden states, the head weight (also when it is the tied embedding) and its
bias, for chunk sizes that do and do not divide the tokens; no [tokens, vocab] tensor is ever made;
bf16 autocast stays close; the model's target_logprobs output and FSDP2 (2 gloo ranks) agree; the
fused kernels refuse clearly without a GPU or their package.

Run as a script by torchrun for the FSDP2 case: ``test_chunked_loss.py --worker OUT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from vlmforge.errors import UserError  # noqa: E402
from vlmforge.model import lm_head  # noqa: E402
from vlmforge.model.lm_head import token_logprobs  # noqa: E402

T, D, V = 45, 16, 211


def _head(tied: bool, bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=bias)
    if tied:
        head.weight = emb.weight
    return emb, head


def _run(emb, head, hidden0, targets, upstream, chunk, ids):
    for p in {*emb.parameters(), *head.parameters()}:
        p.grad = None
    hidden = hidden0.clone().requires_grad_(True)
    logp = token_logprobs(hidden, head, targets, chunk)
    # the embedding is used too, so a tied weight's gradient has both contributions
    ((logp * upstream).sum() + emb(ids).square().sum() * 0.1).backward()
    grads = {"logp": logp.detach(), "hidden": hidden.grad, "weight": head.weight.grad.clone()}
    if head.bias is not None:
        grads["bias"] = head.bias.grad.clone()
    if head.weight is not emb.weight:
        grads["embedding"] = emb.weight.grad.clone()
    return grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 9, 15, 45, 64])  # 9, 15, 45 divide T = 45; 1 and 64 are the extremes
def test_chunked_equals_full_fp32(tied, bias, chunk):
    emb, head = _head(tied, bias)
    g = torch.Generator().manual_seed(1)
    hidden0 = torch.randn(T, D, generator=g) * 2
    targets = torch.randint(0, V, (T,), generator=g)
    upstream = torch.rand(T, generator=g) * 3 - 1  # uneven and of both signs, like MPO's weights
    ids = torch.randint(0, V, (6,), generator=g)
    full = _run(emb, head, hidden0, targets, upstream, 0, ids)
    chunked = _run(emb, head, hidden0, targets, upstream, chunk, ids)
    assert chunked["logp"].dtype == torch.float32
    assert full.keys() == chunked.keys()
    for name in full:
        assert _rel(full[name], chunked[name]) <= 1e-5, name


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocab_tensor_in_forward_or_backward():
    emb, head = _head(tied=True, bias=True)
    tokens, chunk = 64, 16
    hidden = torch.randn(tokens, D, requires_grad=True)
    targets = torch.randint(0, V, (tokens,))
    for c, bound in ((chunk, max(chunk * V, V * D)), (0, tokens * V)):
        mode = _LargestOutput()
        with mode:
            token_logprobs(hidden, head, targets, c).sum().backward()
        assert mode.largest == bound, (c, mode.largest)  # chunked: a chunk's logits or the weight gradient


def test_bf16_autocast_close_to_full():
    emb, head = _head(tied=True, bias=False)
    g = torch.Generator().manual_seed(2)
    hidden0 = torch.randn(T, D, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    upstream = torch.rand(T, generator=g)
    out = {}
    for chunk in (0, 8):
        head.weight.grad = None
        hidden = hidden0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = token_logprobs(hidden, head, targets, chunk)
        (logp * upstream).sum().backward()
        assert logp.dtype == torch.float32 and hidden.grad.dtype == torch.float32
        assert head.weight.grad.dtype == torch.float32
        out[chunk] = (logp.detach(), hidden.grad, head.weight.grad.clone())
    ref32 = token_logprobs(hidden0, head, targets, 0).detach()
    for a, b in zip(out[0], out[8]):
        assert _rel(a, b) <= 2e-2
    assert _rel(ref32, out[8][0]) <= 2e-2  # bf16 logits, fp32 log-softmax


def test_bf16_weights_close_to_full():
    """All bf16, no autocast (FSDP2's bf16 unsharded parameters): gradients in bf16, close to full."""
    emb, head = _head(tied=False, bias=True)
    head.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    hidden0 = torch.randn(T, D, generator=g).bfloat16()
    targets = torch.randint(0, V, (T,), generator=g)
    upstream = torch.rand(T, generator=g)
    out = {}
    for chunk in (0, 8):
        head.zero_grad(set_to_none=True)
        hidden = hidden0.clone().requires_grad_(True)
        logp = token_logprobs(hidden, head, targets, chunk)
        (logp * upstream).sum().backward()
        assert logp.dtype == torch.float32
        assert hidden.grad.dtype == head.weight.grad.dtype == head.bias.grad.dtype == torch.bfloat16
        out[chunk] = (logp.detach(), hidden.grad.float(), head.weight.grad.float(), head.bias.grad.float())
    for a, b in zip(out[0], out[8]):
        assert _rel(a, b) <= 2e-2


def test_model_target_logprobs_chunked_equals_full():
    """VisionLanguageModel(output="target_logprobs") with model.loss_chunk_tokens: same values and
    gradients (tiny Qwen2 with tied embeddings, images included)."""
    from fixtures_model import packed_batch
    from fixtures_train import build_tiny_vlm, tiny_recipe

    cfg = tiny_recipe()
    model = build_tiny_vlm(cfg).train()
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    batch, _ = packed_batch(model)
    flat = batch["input_ids"].numel()
    g = torch.Generator().manual_seed(3)
    pred_index = torch.randperm(flat - 1, generator=g)[:37]
    target_ids = batch["input_ids"].flatten()[pred_index + 1]
    upstream = torch.rand(37, generator=g)
    results = []
    for chunk in (0, 10):
        model.zero_grad(set_to_none=True)
        model.loss_chunk_tokens = chunk
        logp = model(**batch, output="target_logprobs", pred_index=pred_index, target_ids=target_ids)
        (logp * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), grads))
    (a, ga), (b, gb) = results
    assert _rel(a, b) <= 1e-5
    assert ga.keys() == gb.keys() and any("embed_tokens" in n for n in ga)
    for n in ga:
        assert _rel(ga[n], gb[n]) <= 1e-5, n


def test_fused_kernels_refuse_without_gpu_or_package(monkeypatch):
    hidden = torch.randn(4, D)
    _, head = _head(tied=False, bias=False)
    for kind in ("liger", "cce"):
        with pytest.raises(UserError, match=f"train.fused_loss={kind} .*this run is on cpu"):
            token_logprobs(hidden, head, torch.zeros(4, dtype=torch.long), 0, fused=kind)
    monkeypatch.setattr(lm_head.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the liger-kernel package: pip install liger-kernel"):
        lm_head.require_fused("liger", torch.device("cuda"))
    with pytest.raises(UserError, match="needs the cut-cross-entropy package"):
        lm_head.require_fused("cce", torch.device("cuda"))


class _SumScaledCE(torch.autograd.Function):
    """A fused kernel that gets reduction='none' wrong: its backward spreads the mean upstream
    gradient over every token (what scaling a precomputed sum's gradient does)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            ce = torch.nn.functional.cross_entropy(h.float() @ w.float().t(), targets, reduction="none")
            gh, gw = torch.autograd.grad(ce.sum(), (h, w))
        ctx.save_for_backward(gh, gw)
        return ce.detach()

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        return gh * grad_out.mean(), gw * grad_out.mean(), None


def test_fused_kernel_is_checked_against_the_chunked_path(monkeypatch):
    """The once-per-process check passes a correct kernel and refuses one whose per-token gradients are wrong."""
    _, head = _head(tied=False, bias=False)
    hidden = torch.randn(T, D)
    targets = torch.randint(0, V, (T,))
    monkeypatch.setattr(lm_head, "require_fused", lambda kind, device: None)

    def correct(kind, h, w, b, t):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).float(), t, reduction="none")

    monkeypatch.setattr(lm_head, "_FUSED_VERIFIED", set())
    monkeypatch.setattr(lm_head, "_fused_ce", correct)
    got = token_logprobs(hidden, head, targets, 0, fused="cce")
    assert _rel(token_logprobs(hidden, head, targets, 0), got) <= 2e-2  # the check ran its bf16 autocast only
    assert ("cce", "cpu") in lm_head._FUSED_VERIFIED
    monkeypatch.setattr(lm_head, "_FUSED_VERIFIED", set())
    monkeypatch.setattr(lm_head, "_fused_ce", lambda kind, h, w, b, t: _SumScaledCE.apply(h, w, t))
    with pytest.raises(UserError, match=r"train.fused_loss=liger: liger-kernel .* hidden gradient .* from the chunked path"):
        token_logprobs(hidden, head, targets, 0, fused="liger")


# ---------------------------------------------------------------- FSDP2, 2 gloo ranks


def _fsdp_inputs(model):
    from fixtures_model import packed_batch

    batch, _ = packed_batch(model)
    g = torch.Generator().manual_seed(4)
    pred_index = torch.randperm(batch["input_ids"].numel() - 1, generator=g)[:40]
    target_ids = batch["input_ids"].flatten()[pred_index + 1]
    return batch, pred_index, target_ids, torch.rand(40, generator=g)


def _fsdp_worker(out: str) -> None:
    from fixtures_train import build_tiny_vlm, tiny_recipe
    from safetensors.torch import save_file

    from vlmforge import dist as vdist
    from vlmforge.train.parallel import shard_model

    info = vdist.init_distributed("cpu")
    torch.set_num_threads(1)
    model = build_tiny_vlm(tiny_recipe()).train()
    batch, pred_index, target_ids, upstream = _fsdp_inputs(model)
    shard_model(model, torch.float32)
    model.loss_chunk_tokens = 8
    logp = model(**batch, output="target_logprobs", pred_index=pred_index, target_ids=target_ids)
    (logp * upstream).sum().backward()  # every rank the same batch: FSDP's mean gradient = one rank's
    grads = {n: p.grad.full_tensor().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    if info.rank == 0:
        save_file({"logp": logp.detach().contiguous(), **grads}, out)
    vdist.cleanup()


@pytest.mark.slow
def test_chunked_loss_under_fsdp2_equals_one_process_full(tmp_path):
    from fixtures_train import build_tiny_vlm, tiny_recipe
    from safetensors.torch import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
        if torchrun is None:
            pytest.skip("torchrun not installed")
    out = tmp_path / "fsdp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", __file__, "--worker", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = load_file(out)
    model = build_tiny_vlm(tiny_recipe()).train()
    batch, pred_index, target_ids, upstream = _fsdp_inputs(model)
    logp = model(**batch, output="target_logprobs", pred_index=pred_index, target_ids=target_ids)  # full logits
    (logp * upstream).sum().backward()
    assert _rel(logp.detach(), sharded["logp"]) <= 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(sharded) - {"logp"}
    for n, gr in grads.items():
        assert _rel(gr, sharded[n]) <= 1e-5, n


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _fsdp_worker(sys.argv[2])
