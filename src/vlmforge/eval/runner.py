"""Run tasks through a model (or any generate function), score, and write results.

Python API (what ``vlmforge eval`` runs, and through it ``vlmforge demo``)::

    from vlmforge.eval import evaluate
    results = evaluate(model, tokenizer, "synth-mcq,synth-vqa,synth-pope", synth_dir="runs/world",
                       limit=100, out_dir="runs/eval")
    results["synth-vqa"]["metrics"]["vqa_accuracy"], results["synth-vqa"]["chance"]

``generate_fn(prompts, images) -> list[str]`` replaces the model (tests, other backends):
``prompts`` is a batch of chat-message lists with ``<image>`` markers, ``images`` the matching
lists of PIL images.

Each task runs once per shot count k; k > 0 runs once per seed (different demonstrations) and
reports the mean and the sample standard deviation over seeds. Greedy decoding, unless Best-of-N
(``best_of_n=BestOfN(n=8)``, :mod:`vlmforge.eval.bestofn`) adds N-1 sampled candidates to each
generated reply, selects one (by a critic's step scores or by majority) and reports the BoN-k
curves; the task's metrics are then those of the selected candidates.

Requests run in batches sorted by prompt length (less padding); under torchrun the batches are
split over ranks and the outputs merged in input order (:mod:`vlmforge.eval.ranks`), so any number
of ranks gives the one-rank results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from vlmforge import dist
from vlmforge.config import save_resolved
from vlmforge.config.recipe import Recipe
from vlmforge.eval import bestofn, ranks
from vlmforge.eval.bestofn import BestOfN, SampleFn, StepScorer
from vlmforge.eval.fewshot import DemoPool, build_messages
from vlmforge.eval.items import TaskError
from vlmforge.eval.kind import Scored, count_unresolved
from vlmforge.eval.specs import parse_task_specs
from vlmforge.eval.tasks import Task, load_task
from vlmforge.files import atomic_write_text, write_json, write_manifest
from vlmforge.imagedecode import ImageTooLargeError, header_size
from vlmforge.model.decoding import generate, prompt_ids
from vlmforge.model.likelihood import continuation_logprobs

GenerateFn = Callable[[list[list[dict]], list[list[Any]]], list[str]]
# (prompts, images, candidate answers per prompt) -> one log-likelihood per candidate
RankFn = Callable[[list[list[dict]], list[list[Any]], list[list[str]]], list[list[float]]]
MC_PROTOCOLS = ("generate", "likelihood")


class ImageLoadError(ValueError):
    """An item's image does not load; ``reason`` is the dropped-count key."""

    def __init__(self, message: str, reason: str = "image decode error"):
        super().__init__(message)
        self.reason = reason


def model_generate_fn(model, tokenizer, max_new_tokens: int = 16) -> GenerateFn:
    """Greedy generation with a vlmforge model (``vlmforge.model.decoding.generate``)."""
    return functools.partial(generate, model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)


def model_rank_fn(model, tokenizer) -> RankFn:
    """Candidate answers scored by summed log-likelihood (``vlmforge.model.likelihood``)."""
    return functools.partial(continuation_logprobs, model, tokenizer)


def _load_images(refs, item_id: str) -> list:
    try:
        return [ref.load() for ref in refs]
    except ImageTooLargeError as e:  # over the pixel cap: its own reason, the cap in the message
        raise ImageLoadError(f"item {item_id!r}: image_too_large: {e}", ImageTooLargeError.reason) from None
    except Exception as e:  # PIL raises several types for bad bytes
        raise ImageLoadError(f"item {item_id!r}: cannot decode image: {e}") from None


def ref_size(ref) -> tuple[int, int]:
    """(width, height) of an image reference from its header (no pixels decoded); ImageDecodeError
    (ImageTooLargeError over the pixel cap) or OSError as :func:`vlmforge.imagedecode.header_size`."""
    return header_size(ref.value if ref.kind == "path" else ref.read_bytes())


def model_prompt_length(model, tokenizer) -> Callable[[list[dict], list], int]:
    """The prompt's length in model tokens (chat template, images expanded to visual tokens: a
    tiling model's image costs its tiles, read from the image's size)."""
    tiles = model.image_layout(tokenizer).tiling is not None

    def length(messages: list[dict], refs: list) -> int:
        try:
            return len(prompt_ids(model, tokenizer, messages, [ref_size(r) for r in refs] if tiles else len(refs)))
        except (ValueError, OSError):  # a marker/image mismatch, an unreadable or too large image
            return 0  # (ImageDecodeError is a ValueError): loading the item drops and counts it
    return length


@dataclasses.dataclass(frozen=True)
class BonRun:
    """Best-of-N during one pass: the settings, the sampler, the critic (None: none) and the run's seed."""

    settings: BestOfN
    sample_fn: SampleFn
    step_scorer: StepScorer | None = None
    run_seed: int = 0


def _run_batch(task: Task, batch: list, generate_fn: GenerateFn, rank_fn: RankFn | None,
               bon: BonRun | None = None) -> dict[int, dict]:
    """``{request index: output}`` for one batch of (index, request): ``{"text": reply}``,
    ``{"logprobs": [...]}`` (likelihood protocol), ``{"texts": [N candidates], "step_scores"?: [...]}``
    (Best-of-N) or ``{"dropped": reason, "error": message}``."""
    out: dict[int, dict] = {}
    ready, images = [], []
    for index, req in batch:
        try:
            images.append(_load_images(req[3], req[0].id))
        except ImageLoadError as e:
            out[index] = {"dropped": e.reason, "error": str(e)}
            continue
        ready.append((index, req))
    if not ready:
        return out
    prompts = [req[2] for _, req in ready]
    if rank_fn is None:
        replies = generate_fn(prompts, images)
        if len(replies) != len(ready):
            raise RuntimeError(f"generate returned {len(replies)} outputs for {len(ready)} prompts")
        if bon is None:
            out.update({index: {"text": text} for (index, _), text in zip(ready, replies)})
        else:
            out.update(_candidates(ready, prompts, images, replies, bon))
    else:
        ranked = rank_fn(prompts, images, [list(req[0].options.values()) for _, req in ready])
        if len(ranked) != len(ready):
            raise RuntimeError(f"rank_fn returned {len(ranked)} outputs for {len(ready)} prompts")
        out.update({index: {"logprobs": [float(x) for x in lps]} for (index, _), lps in zip(ready, ranked)})
    return out


def _candidates(ready: list, prompts: list, images: list, greedy: list[str], bon: BonRun) -> dict[int, dict]:
    """Best-of-N outputs of a batch: the greedy replies plus the sampled ones, and the critic's step scores."""
    texts = bestofn.candidate_texts(greedy, prompts, images, [req[0].id for _, req in ready], bon.settings,
                                    bon.sample_fn, bon.run_seed)
    out = {index: {"texts": t} for (index, _), t in zip(ready, texts)}
    if bon.step_scorer is not None:
        # The query's own images are the last ones (k-shot demonstrations come first).
        query_images = [ims[len(ims) - len(req[0].images):] for (_, req), ims in zip(ready, images)]
        scores = bestofn.candidate_step_scores(bon.step_scorer, prompts, query_images, texts)
        for (index, _), s in zip(ready, scores):
            out[index]["step_scores"] = s
    return out


def run_task_once(
    task: Task,
    generate_fn: GenerateFn,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    strict: bool = True,
    progress: bool = True,
    rank_fn: RankFn | None = None,
    *,
    prompt_length: Callable[[list[dict], list], int] | None = None,
    distributed: bool | None = None,
    best_of_n: BonRun | None = None,
) -> tuple[list[Scored], list[dict], dict[str, int]]:
    """One pass over a task: (scored records, prediction rows, dropped-item counts).

    With ``rank_fn`` (the likelihood protocol, multiple choice at 0 shots) the query is asked as an
    open question (no option list, short-answer suffix) and the option text the model finds most
    likely is its answer; otherwise ``generate_fn``'s text is parsed by the task's scorer.

    Requests run in batches sorted by ``prompt_length(messages, image_refs)``, longest first (None: in
    input order); under torchrun each rank runs every world_size-th batch and the outputs are merged
    (``eval.ranks``), then scored in input order, so records and rows are those of one rank.
    ``distributed``: None = split when a process group is initialised; False = this process runs
    every batch alone (no collectives, e.g. rank 0 evaluating while the others wait).
    ``best_of_n`` (generate protocol only): every item gets N candidates; its record is the selected
    one's (a ``bestofn.Chosen``, holding all of them) and its row lists them."""
    if rank_fn is not None:
        best_of_n = None
    pool = DemoPool(task.support_items if task.support_items is not None else task.items) if shots > 0 else None
    requests = []
    for item in task.items:
        demos = pool.sample(item, shots, seed) if pool else []
        messages, refs = build_messages(task.kind, task.scorer, item, demos, likelihood=rank_fn is not None)
        requests.append((item, demos, messages, refs))

    lengths = [prompt_length(req[2], req[3]) if prompt_length else 0 for req in requests]
    split = dist.world_size() > 1 if distributed is None else bool(distributed)
    batches = ranks.length_sorted_batches(lengths, batch_size)
    mine = ranks.rank_batches(batches) if split else batches
    label = task.name + (f" {shots}-shot seed {seed}" if shots else "")
    outputs: dict[int, dict] = {}
    for batch in tqdm(mine, desc=f"eval {label}", unit="batch", disable=not progress or (split and not dist.is_main())):
        found = _run_batch(task, [(i, requests[i]) for i in batch], generate_fn, rank_fn, best_of_n)
        outputs.update(found)
        if strict and any("dropped" in o for o in found.values()):
            break  # this rank stops at its first bad image; the merge below reports it on every rank
    if split:
        outputs = ranks.merge_outputs(outputs)

    records: list[Scored] = []
    rows: list[dict] = []
    dropped: dict[str, int] = {}
    for index, (item, demos, messages, refs) in enumerate(requests):
        got = outputs.get(index)
        if got is None:  # not run: another request failed first in strict mode
            continue
        if "dropped" in got:
            if strict:
                raise TaskError(f"task {task.name!r} ({item.meta.get('source')}): {got['error']}")
            dropped[got["dropped"]] = dropped.get(got["dropped"], 0) + 1
            continue
        lps = got.get("logprobs")
        if "texts" in got:
            bon = best_of_n.settings
            cands = bestofn.scored_candidates(task.scorer, item, got["texts"], got.get("step_scores"), bon.aggregate)
            rec = bestofn.choose(item, cands, bon.rule(best_of_n.step_scorer is not None))
            text = rec.prediction
        elif lps is None:
            text = got["text"]
            rec = task.scorer.score_prediction(text, item)
        else:  # the most likely option's letter is the answer, known exactly: no text parsing
            letter = max(zip(lps, item.options), key=lambda pair: pair[0])[1]
            text = item.options[letter]
            rec = Scored(item=item, prediction=text, extracted=letter, score=float(task.scorer.score(letter, item)))
        records.append(rec)
        row = {
            "task": task.name, "shots": shots, "seed": seed if shots else None, "id": item.id,
            "prompt": messages[-1]["content"], "demos": [d.id for d in demos], "n_images": len(refs),
            "prediction": text, "extracted": rec.extracted,
            "answer": item.answers if item.answers is not None else item.answer,
            "score": rec.score, "correct": rec.score == 1.0,
        }
        if lps is not None:
            row["option_logprobs"] = dict(zip(item.options, lps))
        if isinstance(rec, bestofn.Chosen):
            row["candidates"] = [c.row() for c in rec.candidates]
            row["selected"] = rec.selected
        rows.append(row)
    return records, rows, dropped


def _mean_std(per_seed: list[dict[str, float]]) -> tuple[dict, dict]:
    keys = [k for k in per_seed[0] if all(isinstance(m.get(k), (int, float)) for m in per_seed)]
    mean = {k: statistics.fmean(m[k] for m in per_seed) for k in keys}
    std = {k: (statistics.stdev([m[k] for m in per_seed]) if len(per_seed) > 1 else 0.0) for k in keys}
    return mean, std


def evaluate_task(
    task: Task,
    generate_fn: GenerateFn,
    shots: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    strict: bool = True,
    progress: bool = True,
    rank_fn: RankFn | None = None,
    *,
    prompt_length: Callable[[list[dict], list], int] | None = None,
    distributed: bool | None = None,
    best_of_n: BestOfN | None = None,
    sample_fn: SampleFn | None = None,
    step_scorer: StepScorer | None = None,
) -> tuple[dict, list[dict]]:
    """Metrics of one task at one shot count (mean/std over seeds when k > 0), and prediction rows.
    ``rank_fn``: the likelihood protocol; ``prompt_length``: the batching order (see ``run_task_once``);
    ``best_of_n`` (with ``sample_fn``, and ``step_scorer`` for a critic): Best-of-N, adding
    ``result["best_of_n"]`` (curves averaged over seeds when k > 0)."""
    bon = best_of_n if best_of_n is not None and best_of_n.on and rank_fn is None else None
    if bon is not None and sample_fn is None:
        raise ValueError("Best-of-N needs a sample_fn (or a model)")
    run_seeds = list(seeds) if shots > 0 else [0]
    if shots > 0 and not run_seeds:
        raise ValueError("k-shot evaluation needs at least one seed")
    per_seed, all_rows, unresolved, dropped, bon_curves = [], [], [], {}, []
    n_scored = 0
    for seed in run_seeds:
        run = BonRun(bon, sample_fn, step_scorer, seed) if bon is not None else None
        records, rows, drop = run_task_once(task, generate_fn, shots, seed, batch_size, strict, progress, rank_fn,
                                            prompt_length=prompt_length, distributed=distributed, best_of_n=run)
        per_seed.append(task.scorer.aggregate(records))
        if bon is not None:
            bon_curves.append(bestofn.curves(task.scorer, records, bestofn.bon_ks(bon.n),
                                             bon.rules(step_scorer is not None)))
        unresolved.append(count_unresolved(records))
        all_rows += rows
        n_scored = len(records)
        for k, v in drop.items():
            dropped[k] = dropped.get(k, 0) + v
    result = {
        "kind": task.kind,
        "path": task.path,
        "protocol": "likelihood" if rank_fn else "generate",
        "shots": shots,
        "primary": task.scorer.primary,
        "chance": task.scorer.chance(task.items),
        "counts": {
            "n": n_scored,
            "unresolved": unresolved[0] if len(unresolved) == 1 else statistics.fmean(unresolved),
            "skipped_rows": sum(task.skipped.values()),
        },
        "skipped": {**task.skipped, **dropped},
    }
    if shots > 0:
        result["metrics"], result["std"] = _mean_std(per_seed)
        result["seeds"] = run_seeds
        result["per_seed"] = per_seed
    else:
        result["metrics"] = per_seed[0]
    if bon is not None:
        result["best_of_n"] = bestofn.result_block(bon, step_scorer is not None, bestofn.mean_curves(bon_curves))
    return result, all_rows


def result_key(task_name: str, shots: int, protocol: str = "generate") -> str:
    """``name`` for the 0-shot (or only) run, ``name@{k}shot`` for the others; ``@likelihood``
    appended for multiple choice ranked by likelihood."""
    key = task_name if shots == 0 else f"{task_name}@{shots}shot"
    return key if protocol == "generate" else f"{key}@{protocol}"


def evaluate(
    model=None,
    tokenizer=None,
    tasks: str | Sequence = (),
    *,
    generate_fn: GenerateFn | None = None,
    rank_fn: RankFn | None = None,
    mc_protocols: Sequence[str] = ("generate",),
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    shots: Sequence[int] = (0,),
    seeds: Sequence[int] = (0, 1, 2),
    strict: bool = True,
    synth_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    config: Recipe | None = None,
    info: dict | None = None,
    progress: bool = True,
    prompt_length: Callable[[list[dict], list], int] | None = None,
    distributed: bool | None = None,
    best_of_n: BestOfN | None = None,
    sample_fn: SampleFn | None = None,
    step_scorer: StepScorer | None = None,
) -> dict[str, dict]:
    """Evaluate on tasks; return ``{task_key: {metrics, chance, counts, primary, ...}}``.

    ``tasks``: a ``--tasks`` string, or a list of spec strings / TaskSpecs / loaded Tasks.
    ``mc_protocols``: for kinds that support likelihood ranking (multiple choice), ``generate`` (parse the letter from
    the generated reply) and/or ``likelihood`` (rank the option texts by the model's likelihood,
    SEED-Bench style, 0-shot only; results under ``name@likelihood``). Other tasks always generate.
    ``out_dir``: when given, write ``results.json``, ``predictions.jsonl`` (and ``config.yaml``
    when ``config`` is a recipe) and ``manifest.json``.

    Under torchrun (a process group is initialised) every rank calls this with the same arguments:
    each runs its share of the batches, all get the same results, rank 0 writes the outputs. Each
    rank runs its own forward passes (a different number per rank), so the model must not be
    FSDP-sharded; ``distributed=False`` makes the calling process evaluate everything alone.
    Batches are sorted by prompt length: in model tokens with a model, else by ``prompt_length``
    when given, else they follow the input order.

    ``best_of_n`` (``BestOfN``; None or n = 1: off): every generated reply gets N-1 sampled siblings
    (``sample_fn(prompts, images, seeds)``, default: the model at the settings' temperature and
    top-p), scored per step by ``step_scorer`` (a critic, ``bestofn.critic_scorer``; None: no critic)
    and one selected; results gain ``best_of_n`` (the BoN-k curves), prediction rows ``candidates``
    and ``selected``. Likelihood-protocol tasks are unaffected.
    """
    bad = [p for p in mc_protocols if p not in MC_PROTOCOLS]
    if bad or not mc_protocols:
        raise TaskError(f"multiple-choice protocols must be among {list(MC_PROTOCOLS)}, got {list(mc_protocols)}")
    if generate_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("evaluate needs a model and tokenizer, or a generate_fn")
        generate_fn = model_generate_fn(model, tokenizer, max_new_tokens)
    if "likelihood" in mc_protocols and rank_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("the likelihood protocol needs a model and tokenizer, or a rank_fn")
        rank_fn = model_rank_fn(model, tokenizer)
    if prompt_length is None and model is not None and tokenizer is not None:
        prompt_length = model_prompt_length(model, tokenizer)
    bon = best_of_n if best_of_n is not None and best_of_n.on else None
    if best_of_n is not None:
        try:
            bestofn.check_settings(best_of_n, step_scorer is not None)
        except ValueError as e:
            raise TaskError(str(e)) from None
    if bon is not None and sample_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("Best-of-N needs a model and tokenizer, or a sample_fn")
        sample_fn = bestofn.model_sample_fn(model, tokenizer, max_new_tokens, bon.temperature, bon.top_p)
    loaded = []
    for entry in [tasks] if isinstance(tasks, str) else list(tasks):
        if isinstance(entry, Task):
            loaded.append(entry)
        else:
            loaded += [load_task(s, limit=limit, strict=strict) for s in parse_task_specs(entry if isinstance(entry, str) else [entry], synth_dir)]
    if not loaded:
        raise TaskError("no tasks given")
    shots = sorted({int(k) for k in shots}) or [0]
    if any(k < 0 for k in shots):
        raise TaskError("shots must be >= 0")
    if max(shots) > 0:
        if not list(seeds):
            raise TaskError("k-shot evaluation needs at least one seed")
        for task in loaded:  # fail now rather than after hours of generation
            pool = DemoPool(task.support_items if task.support_items is not None else task.items)
            try:
                pool.check(task.items, max(shots))
            except ValueError as e:
                raise TaskError(f"task {task.name!r}: {e}") from None

    started = time.time()
    results: dict[str, dict] = {}
    predictions: list[dict] = []
    for task in loaded:
        by_likelihood = "likelihood" in mc_protocols and task.scorer.supports_likelihood
        for k in shots:
            if "generate" in mc_protocols or not task.scorer.supports_likelihood:
                res, rows = evaluate_task(task, generate_fn, k, seeds, batch_size, strict, progress,
                                          prompt_length=prompt_length, distributed=distributed, best_of_n=bon,
                                          sample_fn=sample_fn, step_scorer=step_scorer)
                results[result_key(task.name, k)] = res
                predictions += rows
        if by_likelihood:
            # The options are not in the prompt, so CircularEval's rotations would all rank alike:
            # score each question once (its circular accuracy is then its plain accuracy).
            once = dataclasses.replace(task, items=[it for it in task.items if it.meta.get("rotation", 0) == 0])
            res, rows = evaluate_task(once, generate_fn, 0, seeds, batch_size, strict, progress, rank_fn,
                                      prompt_length=prompt_length, distributed=distributed)
            results[result_key(task.name, 0, "likelihood")] = res
            predictions += [dict(r, protocol="likelihood") for r in rows]

    split = dist.world_size() > 1 if distributed is None else bool(distributed)
    if out_dir is not None and (dist.is_main() or not split):
        settings = {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                    "shots": shots, "seeds": list(seeds), "strict": strict, "mc_protocols": list(mc_protocols),
                    "world_size": dist.world_size() if split else 1}
        if bon is not None:
            settings["best_of_n"] = bestofn.settings_dict(bon, step_scorer is not None)
        write_outputs(out_dir, results, predictions, settings, config, info or {}, time.time() - started)
    if split:
        dist.barrier()
    return results


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(out_dir, results: dict, predictions: list[dict], settings: dict, config: Recipe | None, info: dict, seconds: float) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {**info, "settings": settings, "seconds": round(seconds, 2), "tasks": results})
    atomic_write_text(
        out / "predictions.jsonl",
        "".join(json.dumps({k: _jsonable(v) for k, v in row.items()}, default=str) + "\n" for row in predictions),
    )
    if config is not None:
        save_resolved(config, out)
    write_manifest(
        out, "eval",
        inputs={name: r["path"] for name, r in results.items()},
        config=config if config is not None else settings,
        counts={name: r["counts"] for name, r in results.items()},
        dropped={name: r["skipped"] for name, r in results.items() if r["skipped"]},
        **info,
    )


def headline(results: dict[str, dict]) -> dict[str, dict]:
    """Per task: the headline metric, its score (and std over seeds), and the chance level, for reports."""
    out = {}
    for name, r in results.items():
        metric = r["primary"]
        out[name] = {
            "metric": metric,
            "score": r["metrics"].get(metric),
            "std": r.get("std", {}).get(metric),
            "chance": r["chance"].get(metric),
            "n": r["counts"]["n"],
            "unresolved": r["counts"]["unresolved"],
        }
    return out


def summary_table(results: dict[str, dict]) -> str:
    """A plain-text table: task, headline metric (± std over seeds), chance, n, unresolved; under a
    Best-of-N task one row per curve (the selected rule starred), the metric at k = 1, 2, 4, ..., N."""
    lines = [f"{'task':<28} {'metric':<18} {'score':>14} {'chance':>7} {'n':>6} {'unres.':>7}"]
    for name, r in results.items():
        metric = r["primary"]
        value = r["metrics"].get(metric, float("nan"))
        score = f"{value:.4f}" + (f"±{r['std'][metric]:.3f}" if "std" in r and metric in r["std"] else "")
        chance = r["chance"].get(metric)
        lines.append(
            f"{name:<28} {metric:<18} {score:>14} {chance if chance is None else f'{chance:.3f}':>7} "
            f"{r['counts']['n']:>6} {r['counts']['unresolved']:>7}"
        )
        if "best_of_n" in r:
            lines += _bon_rows(r["best_of_n"])
    return "\n".join(lines)


def _bon_rows(bon: dict) -> list[str]:
    head = f"  best-of-{bon['n']}" + (f" ({bon['aggregate']})" if bon["select"] == "prm" else "")
    lines = [f"{head:<28} {'k':<18} " + " ".join(f"{k:>6}" for k in bon["ks"])]
    for name, values in bon["curves"].items():
        label = f"  {name}{' *' if name == bon['select'] else ''}"
        lines.append(f"{label:<28} {'':<18} " + " ".join(f"{v:.4f}" for v in values))
    return lines
