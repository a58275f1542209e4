"""lmms-eval requests -> vlmforge chat prompts and images, and the answers back.

This is the part of the lmms-eval plugin that needs no ``lmms_eval`` import (so it is tested without
it); the model class lmms-eval instantiates is :mod:`vlmforge.eval.lmms_plugin`. lmms-eval finds the
plugin through the entry point group ``lmms_eval.models``: pyproject.toml names :func:`lmms_manifest`,
which lmms-eval calls at start-up (so only this light module is imported then).

Requests of lmms-eval's "simple" models carry ``(context, gen_kwargs | continuation, doc_to_visual,
doc_id, task, split)``; the images come from ``doc_to_visual(doc)``. A request becomes one user turn:
an ``<image>`` marker per image (unless the context already holds exactly that many), a newline,
then the context. Answers are vlmforge's own: greedy or sampled generation
(:func:`vlmforge.model.decoding.generate`) cut at the task's ``until`` strings, and the log-likelihood
of a continuation as the assistant's answer (:func:`vlmforge.model.likelihood.answer_logprobs`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.errors import UserError

MODEL_ID = "vlmforge"
PLUGIN_CLASS = "vlmforge.eval.lmms_plugin.VlmforgeLMM"


def lmms_manifest():
    """The entry point payload: a ModelManifest naming the plugin class (``--model vlmforge``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=PLUGIN_CLASS)


def request_visuals(doc_to_visual: Callable | None, doc) -> list:
    """The request's images as RGB PIL images (nested lists flattened, None skipped)."""
    if doc_to_visual is None or doc is None:
        return []
    out: list = []

    def add(v):
        if v is None:
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        elif isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        else:
            raise UserError(f"vlmforge models take images only; this task gives a {type(v).__name__} "
                            f"({str(v)[:80]!r}): video and audio tasks are not supported")

    add(doc_to_visual(doc))
    return out


def user_messages(context: str, n_images: int) -> list[dict]:
    """One user turn: the images' ``<image>`` markers, then the context."""
    context = context or ""
    if n_images and context.count(IMAGE_TOKEN) == n_images:
        return [{"role": "user", "content": context}]
    text = context.replace(IMAGE_TOKEN, "").lstrip("\n")
    marks = "".join(f"{IMAGE_TOKEN}\n" for _ in range(n_images))
    return [{"role": "user", "content": marks + text}]


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> dict:
    """lmms-eval/transformers generation kwargs -> vlmforge's (greedy unless do_sample with temperature > 0)."""
    g = dict(gen_kwargs or {})
    until = g.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(g.get("temperature") or 0.0) if g.get("do_sample") else 0.0
    return {
        "max_new_tokens": int(g.get("max_new_tokens") or default_max_new_tokens),
        "temperature": temperature,
        "top_p": float(g.get("top_p") or 1.0) if temperature > 0 else 1.0,
        "until": tuple(u for u in until if u),
    }


def stop_at(text: str, until: Sequence[str]) -> str:
    """The text up to the first of the stop strings (lmms-eval's ``until``)."""
    cut = len(text)
    for u in until:
        i = text.find(u)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def answer_text(continuation: str) -> str:
    """A continuation as the assistant's answer: without the target delimiter (" " by default) in front."""
    return continuation.lstrip()


def _unpack(request, docs: Callable) -> tuple[str, object, list, object]:
    """(context, 2nd argument, images, doc) of a request; ``docs(task, split, doc_id)`` gives its doc."""
    args = request.args
    if len(args) == 2:  # ("", choice): the unconditional request of acc_mutual_info
        return args[0], args[1], [], None
    context, second, doc_to_visual, doc_id, task, split = args[:6]
    doc = docs(task, split, doc_id)
    return context, second, request_visuals(doc_to_visual, doc), doc


def run_generate_until(requests: Sequence, docs: Callable, generate: Callable, batch_size: int = 1,
                       default_max_new_tokens: int = 256) -> list[str]:
    """Answers in request order. ``generate(prompts, images, max_new_tokens=, temperature=, top_p=)``
    answers a batch; consecutive requests with the same settings share a batch."""
    out: list[str] = []
    batch: list[tuple[list[dict], list]] = []
    current: dict | None = None

    def flush():
        if batch:
            s = {k: v for k, v in current.items() if k != "until"}
            answers = generate([p for p, _ in batch], [ims for _, ims in batch], **s)
            out.extend(stop_at(a, current["until"]) for a in answers)
            batch.clear()

    for r in requests:
        context, gen_kwargs, images, _ = _unpack(r, docs)
        s = generation_settings(gen_kwargs if isinstance(gen_kwargs, dict) else {}, default_max_new_tokens)
        if s != current or len(batch) >= max(1, batch_size):
            flush()
            current = s
        batch.append((user_messages(context, len(images)), images))
    flush()
    return out


def run_loglikelihood(requests: Sequence, docs: Callable, score: Callable, batch_size: int = 1) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) per request, in order. ``score(prompts, images, answers)`` scores a batch."""
    items = []
    for r in requests:
        context, target, images, doc = _unpack(r, docs)
        if callable(target):  # output_type loglikelihood: doc_to_target(doc)
            target = target(doc)
        items.append((user_messages(context, len(images)), images, answer_text(str(target))))
    out: list[tuple[float, bool]] = []
    step = max(1, batch_size)
    for i in range(0, len(items), step):
        chunk = items[i : i + step]
        out.extend(score([p for p, _, _ in chunk], [ims for _, ims, _ in chunk], [a for _, _, a in chunk]))
    return out
