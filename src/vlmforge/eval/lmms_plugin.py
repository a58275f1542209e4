"""lmms-eval model plugin: ``lmms-eval --model vlmforge --model_args ckpt=PATH --tasks ...``.

Imported by lmms-eval only (it needs the optional extra ``pip install 'vlmforge[lmms]'``); the
request handling lives in :mod:`vlmforge.eval.lmms_adapter`. Model args (``--model_args k=v,...``):

- ``ckpt``: a vlmforge checkpoint folder (``vlmforge import`` makes one from a LLaVA-family model)
- ``device``: auto (cuda if available) | cpu | cuda | cuda:N
- ``batch_size``: requests per forward (also lmms-eval's ``--batch_size``)
- ``max_new_tokens``: when the task's generation_kwargs give none (default 256)
- ``end_of_turn``: loglikelihood also counts the closing ``<|im_end|>`` (vlmforge's own MCQ scoring
  does; lmms-eval's contract is the continuation alone, the default)
- ``seed``: for sampled generation (tasks with do_sample and temperature > 0)

One process (rank 0 of 1): run several lmms-eval processes by task, not ``accelerate launch``.
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

try:  # lmms-eval >= 0.7 passes every response through unwrap_generation_output
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
except ImportError:  # older lmms-eval: responses are used as returned
    GenerationResult = unwrap_generation_output = None

from vlmforge.dist import resolve_device
from vlmforge.errors import UserError
from vlmforge.eval.lmms_adapter import run_generate_until, run_loglikelihood
from vlmforge.model import decoding, likelihood
from vlmforge.model.saving import load_vlm


def _tuples_mangled() -> bool:
    return unwrap_generation_output is not None and unwrap_generation_output((0.0, True))[0] != (0.0, True)


class VlmforgeLMM(lmms):
    is_simple = True

    def __init__(self, ckpt: str | None = None, device: str | None = "auto", batch_size: int | str = 1,
                 max_new_tokens: int = 256, end_of_turn: bool = False, seed: int = 0,
                 max_batch_size: int | None = None, **unused) -> None:
        super().__init__()
        if not ckpt:
            raise UserError("the vlmforge lmms-eval model needs --model_args ckpt=PATH (a vlmforge checkpoint folder)")
        if unused:
            raise UserError(f"unknown vlmforge model_args {sorted(unused)}; known: ckpt, device, batch_size, "
                            "max_new_tokens, end_of_turn, seed")
        self._device = resolve_device(str(device) if device is not None else None)
        self.model, self.tokenizer, _ = load_vlm(str(ckpt), device=self._device)
        self.batch_size = 1 if str(batch_size) == "auto" else max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.end_of_turn = str(end_of_turn).lower() in ("true", "1", "yes")
        self.seed = int(seed)

    @property
    def device(self) -> torch.device:
        return self._device

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _generate(self, prompts, images, **settings) -> list[str]:
        return decoding.generate(self.model, self.tokenizer, prompts, images, seed=self.seed, **settings)

    def _score(self, prompts, images, answers) -> list[tuple[float, bool]]:
        return likelihood.answer_logprobs(self.model, self.tokenizer, prompts, images, answers,
                                          end_of_turn=self.end_of_turn)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return run_generate_until(requests, self._doc, self._generate, self.batch_size, self.max_new_tokens)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = run_loglikelihood(requests, self._doc, self._score, self.batch_size)
        if _tuples_mangled():
            # lmms-eval 0.7.3's evaluator turns a (logprob, is_greedy) response into its str() (so
            # multiple_choice fails to unpack it); a GenerationResult's text passes through unchanged.
            return [GenerationResult(text=r) for r in out]
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlmforge's lmms-eval model answers single-round tasks (generate_until, loglikelihood)")
