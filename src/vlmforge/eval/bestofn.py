"""Best-of-N evaluation (InternVL / VisualPRM): N replies per question, one selected, and the BoN-k curves.

Candidate 0 is the greedy reply the runner gives without Best-of-N (same batch, same call); candidates
1..N-1 are sampled (temperature / top-p), candidate j of an item drawn with its own seed from
(sample seed, run seed, item id, j), so the candidates do not depend on the batch or the rank an item
lands in. A process reward model (the critic, another vlmforge checkpoint) scores every step of
every candidate as P('+') (``vlmforge.critic.score``); steps are the reply cut on blank lines
(``vlmforge.critic.steps.split_steps``, at most 12).

Selection rules, over a list of candidates:

- ``prm``: the highest aggregate of the step scores (``aggregate``: mean, min, last, product);
- ``orm``: the highest score of the last step (an outcome reward);
- ``majority``: self-consistency, the most frequent extracted answer among candidates whose answer
  could be read (ties to the answer seen first), its first candidate; none readable: candidate 0;
- ``first``: candidate 0 (greedy).

Ties in ``prm`` / ``orm`` go to the lower index. The curves apply each rule to the first k
candidates of every item, for k = 1, 2, 4, ... and N, and compute the task's primary metric over
the selected predictions with the kind's own ``aggregate`` (so POPE's F1 and MMBench's circular
accuracy are computed as the kind computes them); ``pass`` is the oracle: per item the best-scoring
of its first k candidates (pass@k for accuracy-like metrics).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vlmforge.critic.score import AGGREGATES, StepRequest, aggregate, step_scores
from vlmforge.critic.steps import MAX_STEPS, critic_question, join_steps, split_steps
from vlmforge.eval.answers import normalize_answer
from vlmforge.eval.kind import Kind, Scored
from vlmforge.model.decoding import generate

SELECT_RULES = ("prm", "orm", "majority", "first")
CRITIC_RULES = ("prm", "orm")  # need step scores
PASS = "pass"  # the oracle curve's name

# (prompts, images, one seed per prompt) -> one sampled reply per prompt
SampleFn = Callable[[list[list[dict]], list[list[Any]], list[int]], list[str]]
# critic requests -> per request, P('+') of each of its steps
StepScorer = Callable[[list[StepRequest]], list[list[float]]]


@dataclass(frozen=True)
class BestOfN:
    """Best-of-N settings. ``select`` None: ``prm`` with a critic, else ``majority``; ``seed``: the
    sample seed (candidate seeds also mix in the run's seed, the item id and the candidate index)."""

    n: int = 8
    select: str | None = None
    aggregate: str = "mean"
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

    @property
    def on(self) -> bool:
        return self.n > 1

    def rule(self, has_critic: bool) -> str:
        return self.select or ("prm" if has_critic else "majority")

    def rules(self, has_critic: bool) -> list[str]:
        """The rules a run can apply (its curves): the critic's only with a critic."""
        return ["first", "majority"] + (["orm", "prm"] if has_critic else [])


def check_settings(bon: BestOfN, has_critic: bool) -> None:
    """ValueError with a one-line reason when the settings cannot run."""
    if bon.n < 1:
        raise ValueError(f"--best-of-n must be >= 1, got {bon.n}")
    if bon.select is not None and bon.select not in SELECT_RULES:
        raise ValueError(f"--select must be one of {', '.join(SELECT_RULES)}, got {bon.select!r}")
    if bon.aggregate not in AGGREGATES:
        raise ValueError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {bon.aggregate!r}")
    if bon.rule(has_critic) in CRITIC_RULES and not has_critic:
        raise ValueError(f"--select {bon.rule(has_critic)} needs a process reward model: give --critic CKPT")
    if not bon.on:
        return
    if not bon.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for sampled candidates, got {bon.temperature}")
    if not 0 < bon.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {bon.top_p}")


def bon_ks(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, then ``n``."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def candidate_seed(seed: int, run_seed: int, item_id: str, index: int) -> int:
    """The sampling seed of candidate ``index`` of item ``item_id`` (63 bits, from a hash: no
    dependence on the batch, the rank or the other items)."""
    digest = hashlib.sha256(f"{seed}\0{run_seed}\0{item_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def model_sample_fn(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> SampleFn:
    """Sampled replies from a vlmforge model, one generator per prompt (``model.decoding.generate``)."""
    def sample(prompts, images, seeds):
        return generate(model, tokenizer, prompts, images, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=list(seeds))
    return sample


def critic_scorer(model, tokenizer, batch_size: int = 8) -> StepScorer:
    """Step scores from a critic checkpoint (``vlmforge.critic.score.step_scores``)."""
    def score(requests):
        return step_scores(model, tokenizer, requests, batch_size=batch_size)
    return score


def candidate_texts(greedy: Sequence[str], prompts: list[list[dict]], images: list[list], item_ids: Sequence[str],
                    bon: BestOfN, sample_fn: SampleFn, run_seed: int = 0) -> list[list[str]]:
    """Per prompt its N candidate replies: ``greedy[i]`` first, then N-1 samples, each with its own
    seed. All N-1 samples of the batch go to ``sample_fn`` in one call (candidate index outer,
    prompt inner), so a prompt's samples share one prefill (``decoding.generate``)."""
    out = [[g] for g in greedy]
    if bon.n <= 1 or not prompts:
        return out
    picks = range(1, bon.n)
    seeds = [candidate_seed(bon.seed, run_seed, item_id, j) for j in picks for item_id in item_ids]
    replies = sample_fn([p for _ in picks for p in prompts], [ims for _ in picks for ims in images], seeds)
    if len(replies) != len(seeds):
        raise RuntimeError(f"sampling returned {len(replies)} replies for {len(seeds)} prompts")
    for k, reply in enumerate(replies):
        out[k % len(prompts)].append(reply)
    return out


def candidate_step_scores(step_scorer: StepScorer, prompts: list[list[dict]], query_images: list[list],
                          texts: list[list[str]], max_steps: int = MAX_STEPS) -> list[list[list[float]]]:
    """Per prompt, per candidate: the critic's score of each step (``[]`` for a reply without steps).
    The critic sees the query's user turn without image markers and the query's images; a prompt's
    repeated replies are scored once."""
    out: list[list[list[float]]] = [[[] for _ in ts] for ts in texts]
    requests, where, seen = [], [], {}
    for p, (messages, ims, ts) in enumerate(zip(prompts, query_images, texts)):
        question = critic_question(messages)
        for j, text in enumerate(ts):
            steps = split_steps(text, max_steps)
            if not steps:
                continue
            key = (p, join_steps(steps))
            if key not in seen:
                seen[key] = len(requests)
                requests.append(StepRequest(question=question, images=list(ims), steps=steps))
            where.append((p, j, seen[key]))
    if not requests:
        return out
    scores = step_scorer(requests)
    if len(scores) != len(requests):
        raise RuntimeError(f"the critic returned {len(scores)} score lists for {len(requests)} solutions")
    for req, s in zip(requests, scores):
        if len(s) != len(req.steps):
            raise RuntimeError(f"the critic returned {len(s)} scores for a solution of {len(req.steps)} steps")
    for p, j, r in where:
        out[p][j] = [float(x) for x in scores[r]]
    return out


@dataclass
class Candidate:
    """One reply, scored by the task's scorer and (with a critic) by the process reward model."""

    text: str
    extracted: Any
    score: float
    step_scores: list[float] | None = None  # None: no critic
    prm: float | None = None  # aggregate of the step scores
    orm: float | None = None  # the last step's score

    def row(self) -> dict:
        """Its entry in a predictions.jsonl row (``step_scores`` only with a critic)."""
        out = {"text": self.text, "extracted": self.extracted, "score": self.score}
        if self.step_scores is not None:
            out["step_scores"] = self.step_scores
        out.update(prm=self.prm, orm=self.orm)
        return out


@dataclass
class Chosen(Scored):
    """The selected candidate as the task's scored record, with every candidate kept for the curves."""

    candidates: list[Candidate] = field(default_factory=list)
    selected: int = 0


def scored_candidates(kind: Kind, item, texts: Sequence[str], scores: Sequence[Sequence[float]] | None,
                      rule: str = "mean") -> list[Candidate]:
    """Candidates scored by ``kind`` (and, with step ``scores``, their PRM score by ``rule`` and ORM score)."""
    out = []
    for j, text in enumerate(texts):
        rec = kind.score_prediction(text, item)
        cand = Candidate(text=text, extracted=rec.extracted, score=rec.score)
        if scores is not None:
            steps = [float(x) for x in scores[j]]
            cand.step_scores, cand.prm, cand.orm = steps, aggregate(steps, rule), aggregate(steps, "last")
        out.append(cand)
    return out


def vote_key(extracted: Any) -> Any:
    """What majority voting compares: text answers after the VQA normalisation (a bare letter, which
    that empties, lower-cased), other answers (numbers) as they are."""
    if isinstance(extracted, str):
        return normalize_answer(extracted) or extracted.strip().lower()
    try:
        hash(extracted)
    except TypeError:
        return json.dumps(extracted, sort_keys=True, default=str)
    return extracted


def majority_index(candidates: Sequence[Candidate]) -> int:
    """Self-consistency: the first candidate of the most frequent readable answer (ties: the answer seen
    first); no readable answer: 0."""
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, c in enumerate(candidates):
        if c.extracted is None:
            continue
        key = vote_key(c.extracted)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return 0
    return first[max(counts, key=lambda k: (counts[k], -first[k]))]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def select_index(candidates: Sequence[Candidate], rule: str) -> int:
    """The index ``rule`` selects among ``candidates`` (see the module docstring)."""
    if not candidates:
        raise ValueError("no candidates to select from")
    if rule == "first":
        return 0
    if rule == "majority":
        return majority_index(candidates)
    if rule in CRITIC_RULES:
        values = [getattr(c, rule) for c in candidates]
        if any(v is None for v in values):
            raise ValueError(f"select {rule!r} needs critic scores")
        return _argmax(values)
    raise ValueError(f"unknown selection rule {rule!r} (known: {', '.join(SELECT_RULES)})")


def oracle_index(candidates: Sequence[Candidate]) -> int:
    """The best-scoring candidate (ties: the first): what a perfect selector would pick."""
    return _argmax([c.score for c in candidates])


def choose(item, candidates: list[Candidate], rule: str) -> Chosen:
    """The record of the candidate ``rule`` selects, holding all of them."""
    i = select_index(candidates, rule)
    c = candidates[i]
    return Chosen(item=item, prediction=c.text, extracted=c.extracted, score=c.score, candidates=candidates, selected=i)


def _as_record(rec: Chosen, index: int) -> Scored:
    c = rec.candidates[index]
    return Scored(item=rec.item, prediction=c.text, extracted=c.extracted, score=c.score)


def primary_metric(kind: Kind, records: list[Scored]) -> float:
    return float(kind.aggregate(records).get(kind.primary, 0.0))


def curves(kind: Kind, records: Sequence[Chosen], ks: Sequence[int], rules: Sequence[str]) -> dict[str, list[float]]:
    """``{rule: [primary metric when each item selects among its first k candidates, per k], "pass": [...]}``."""
    out: dict[str, list[float]] = {}
    pickers: list[tuple[str, Callable[[Sequence[Candidate]], int]]] = [
        (rule, lambda cands, rule=rule: select_index(cands, rule)) for rule in rules
    ] + [(PASS, oracle_index)]
    for name, pick in pickers:
        out[name] = [primary_metric(kind, [_as_record(r, pick(r.candidates[:k])) for r in records]) for k in ks]
    return out


def mean_curves(per_seed: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Element-wise mean of the curves of several runs (k-shot seeds)."""
    if len(per_seed) == 1:
        return per_seed[0]
    return {name: [sum(c[name][i] for c in per_seed) / len(per_seed) for i in range(len(values))]
            for name, values in per_seed[0].items()}


def result_block(bon: BestOfN, has_critic: bool, curve_values: dict[str, list[float]]) -> dict:
    """``results.json[task]["best_of_n"]``."""
    return {"n": bon.n, "ks": bon_ks(bon.n), "select": bon.rule(has_critic), "aggregate": bon.aggregate,
            "temperature": bon.temperature, "top_p": bon.top_p, "sample_seed": bon.seed, "critic": has_critic,
            "curves": curve_values}


def settings_dict(bon: BestOfN, has_critic: bool) -> dict:
    """The Best-of-N entry of results.json's settings."""
    return {"n": bon.n, "select": bon.rule(has_critic), "aggregate": bon.aggregate, "temperature": bon.temperature,
            "top_p": bon.top_p, "sample_seed": bon.seed, "critic": has_critic}
