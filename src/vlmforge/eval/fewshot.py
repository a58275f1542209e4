"""k-shot in-context evaluation: k demonstrations, each with its own image, as prior chat turns.

A prompt is ``[user(<image> demo_1 question), assistant(demo_1 answer), ..., user(<image> query)]``
and its image list is the demonstrations' images in order, then the query's. Demonstrations are
drawn without replacement from a support set (another file, or the task itself) excluding the
query, its CircularEval siblings and any item showing one of the query's images. The draw depends
only on (seed, query id), so a run is reproducible and each seed gives a different draw.
"""

from __future__ import annotations

import random

from vlmforge.eval.prompts import user_turn


def _question_keys(item) -> set[str]:
    """Besides its images, what a demonstration must not share with the query: id, CircularEval group."""
    return {"id:" + item.id} | ({"group:" + item.group} if item.group is not None else set())


class DemoPool:
    """The support set, with image identities computed once (base64 images hash once, not per query)."""

    def __init__(self, items: list):
        # One demo per question: a circular task's rotations would otherwise repeat a question.
        self.items = [it for it in items if it.meta.get("rotation", 0) == 0]
        self.keys = [{ref.key() for ref in it.images} for it in self.items]

    def check(self, queries: list, k: int) -> None:
        """Fail before any generation if some query cannot get k demonstrations."""
        by_key: dict[str, set[int]] = {}
        for i, (it, keys) in enumerate(zip(self.items, self.keys)):
            for key in keys | _question_keys(it):
                by_key.setdefault(key, set()).add(i)
        for q in queries:
            keys = {ref.key() for ref in q.images} | _question_keys(q)
            excluded = set().union(*(by_key.get(key, set()) for key in keys))
            if len(self.items) - len(excluded) < k:
                raise ValueError(
                    f"{k}-shot needs {k} demonstrations for item {q.id!r}; the support set has only "
                    f"{len(self.items) - len(excluded)} (other questions, other images)"
                )

    def sample(self, query, k: int, seed: int) -> list:
        if k <= 0:
            return []
        own = {ref.key() for ref in query.images}
        candidates = [
            it for it, keys in zip(self.items, self.keys)
            if it.id != query.id and (query.group is None or it.group != query.group) and not (own & keys)
        ]
        if len(candidates) < k:
            raise ValueError(
                f"{k}-shot needs {k} demonstrations for item {query.id!r}; the support set has only {len(candidates)}"
            )
        return random.Random(f"{seed}:{query.id}").sample(candidates, k)


def build_messages(kind: str, scorer, query, demos: list, likelihood: bool = False) -> tuple[list[dict], list]:
    """Chat messages and the matching image refs (demonstrations first, then the query).

    ``kind`` names the prompt format, ``scorer`` (that kind's ``Kind``) answers the demonstrations;
    ``likelihood``: every question asked as the likelihood protocol asks it (no option list)."""
    messages, images = [], []
    for demo in demos:
        messages.append(user_turn(kind, demo, likelihood))
        messages.append({"role": "assistant", "content": scorer.demo_answer(demo)})
        images.extend(demo.images)
    messages.append(user_turn(kind, query, likelihood))
    images.extend(query.images)
    return messages, images
