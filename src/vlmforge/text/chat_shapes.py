"""Conversations -> (input_ids, assistant mask) as :func:`vlmforge.text.chat.encode_conversation`
gives them, without running the chat template for every conversation.

A chat template that only writes each message's content as it is (and tests it at most for being
empty or a string) renders a conversation as fixed pieces of text around the contents; which pieces
depends only on the conversation's *shape*, its roles and which contents are empty. So
:class:`ConversationEncoder` renders each shape once, with probe contents, through the reference
path, cuts the text at the probes into the pieces and maps the supervised character spans onto them;
then a conversation of that shape is its pieces joined around its contents, tokenized by the fast
tokenizer's backend (:class:`PieceEncoder`: the text between added tokens piece by piece, as the
backend cuts it anyway, the template's own pieces from a cache), its mask computed from the token
offsets as the reference computes it.

The reference stays the judge. A template qualifies only when its syntax tree reads message content
in those ways alone (:func:`content_is_verbatim`); a shape only when two different probe sets (one
with whitespace, quotes and markup at its edges) cut into the same pieces and spans; and the first
conversation of each shape is encoded both ways and must come out equal, else that shape keeps the
reference path. Anything unusual (non-string content, another template, a backend set to truncate
or pad) takes the reference path as well.
"""

from __future__ import annotations

import json
import logging
import re
from itertools import chain
from typing import Sequence

import jinja2
import numpy as np
from jinja2 import nodes
from transformers.utils.chat_template_utils import render_jinja_template

from vlmforge.text.chat import CHAT_TEMPLATE, assistant_char_spans, encode_conversation, has_generation_markers

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_MAX_SHAPES = 4096  # distinct shapes kept per encoder; past that, new shapes take the reference path
_GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")
# how a template may look at a message's content and still render it as fixed pieces around it
_TYPE_TESTS = {"string", "defined", "undefined", "none"}  # constant for string content
_TRUTH_PARENTS = ("Not", "And", "Or")
# ways to reach a message's content under another name, which the syntax check cannot follow
_ALIASING_ATTRS = {"items", "values"}
_ALIASING_FILTERS = {"dictsort", "items"}


def _is_content(node) -> bool:
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return False


def content_is_verbatim(template: str) -> bool:
    """Whether ``template`` uses message content only as text written out as it is (an operand of
    ``+`` / ``~`` in an output), as an ``if`` condition (empty or not) or in a type test (``is
    string``). Filters, calls, comparisons, ``in``, slicing, ``set`` and loops over content, reading a
    message's ``items()`` / ``values()``, ``{% filter %}`` blocks, or a clock (``strftime_now``)
    disqualify it."""
    if "strftime_now" in template:
        return False
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(_GENERATION_TAGS.sub("", template))
    except Exception:  # a template jinja cannot parse here: leave it to the reference
        return False

    def allowed(path: list) -> bool:
        # path: the nodes from the root down to a content access (the last one)
        k = len(path) - 1
        while isinstance(path[k - 1], (nodes.Add, nodes.Concat)):
            k -= 1
        if isinstance(path[k - 1], nodes.Output):  # written out, concatenated at most
            return True
        k = len(path) - 1
        if isinstance(path[k - 1], nodes.Test) and path[k - 1].node is path[k]:
            if path[k - 1].name not in _TYPE_TESTS:
                return False
            k -= 1
        while type(path[k - 1]).__name__ in _TRUTH_PARENTS:
            k -= 1
        parent = path[k - 1]  # a condition on it: empty or not, part of the shape
        return isinstance(parent, (nodes.If, nodes.CondExpr)) and parent.test is path[k]

    def walk(node, path: list) -> bool:
        path.append(node)
        try:
            if _is_content(node) and not allowed(path):
                return False
            if isinstance(node, nodes.Getattr) and node.attr in _ALIASING_ATTRS or \
                    isinstance(node, nodes.Filter) and node.name in _ALIASING_FILTERS or \
                    isinstance(node, nodes.FilterBlock):  # a filter over written text, content included
                return False
            return all(walk(child, path) for child in node.iter_child_nodes())
        finally:
            path.pop()

    return walk(tree, [])


# ----------------------------------------------------------------------------- masks


def generation_mask(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """transformers' assistant mask of ``apply_chat_template(return_assistant_tokens_mask=True)``:
    its single pass over the tokens (a span index that only moves forward past spans ending at or
    before the token's start; mark the token when it ends after that span's start), vectorised."""
    n = len(spans)
    if not n or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    at = np.maximum.accumulate(np.searchsorted(spans[:, 1], starts, side="right"))
    inside = at < n
    return inside & (ends > spans[np.minimum(at, n - 1), 0])


def overlap_mask(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """The mask of :func:`vlmforge.text.chat._mask_from_spans`: a non-empty token overlapping any
    span (``spans`` sorted and disjoint, so the first span ending after the token's start decides)."""
    if not len(spans) or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    at = np.searchsorted(spans[:, 1], starts, side="right")
    inside = at < len(spans)
    return inside & (ends > starts) & (spans[np.minimum(at, len(spans) - 1), 0] < ends)


# ----------------------------------------------------------------------------- pieces

_PIECES_KEPT = 8192  # distinct pieces cached per tokenizer, and pieces remembered as seen once
_LOCAL_PRE_TOKENIZERS = {"Split", "ByteLevel", "Digits"}
_LOCAL_POST_PROCESSORS = {None, "TemplateProcessing", "ByteLevel"}  # without special tokens: per token
_PIECES_PROBE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                 "What's in  it? 42 ünïcödé\n\n<image><image> x<|im_end|>\n<|im_start|>assistant\n A cat.<|im_end|>\n")


def _nodes(node) -> list[dict]:
    """The components of a tokenizer.json pre-tokenizer / post-processor node (Sequence flattened)."""
    if not node:
        return []
    subs = node.get("pretokenizers") or node.get("processors")
    if node.get("type") == "Sequence" and subs is not None:
        return [n for sub in subs for n in _nodes(sub)]
    return [node]


class PieceEncoder:
    """``backend.encode(text)`` put together from the encodings of the text's pieces between added
    tokens, which the backend cuts out first and encodes apart in any case (no normalizer, added
    tokens that strip nothing, a pre-tokenizer and post-processor that act within a piece); the
    pieces a chat template writes again and again then come from a cache. :meth:`for_backend`
    gives one only for a backend where that holds, checked on a probe text too."""

    def __init__(self, backend):
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        # longest first: at each position the longest added token wins, as the backend matches them
        contents = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.added_ids = {t.content: np.array([i], np.int64) for i, t in added.items()}
        self.added_offsets = {t.content: np.array([[0, len(t.content)]], np.int64) for t in added.values()}
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._seen: set[str] = set()  # pieces met once: cached when met again (most replies never are)

    @classmethod
    def for_backend(cls, backend) -> PieceEncoder | None:
        try:
            spec = json.loads(backend.to_str())
            pre, post = _nodes(spec.get("pre_tokenizer")), _nodes(spec.get("post_processor"))
            added = backend.get_added_tokens_decoder().values()
            local = (spec.get("normalizer") is None and not backend.encode_special_tokens
                     and all(n.get("type") in _LOCAL_PRE_TOKENIZERS and not n.get("add_prefix_space") for n in pre)
                     and ({n.get("type") for n in post} or {None}) <= _LOCAL_POST_PROCESSORS
                     and not any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added)
                     and not (spec.get("model") or {}).get("dropout"))
            if not local:
                return None
            pieces = cls(backend)
            whole = backend.encode(_PIECES_PROBE, add_special_tokens=False)
            ids, offsets = pieces.encode(_PIECES_PROBE)
            if ids.tolist() != list(whole.ids) or [tuple(o) for o in offsets.tolist()] != list(whole.offsets):
                return None
            pieces.cache.clear()
            pieces._seen.clear()
            return pieces
        except Exception:  # an unusual backend: encode whole texts
            return None

    def _piece(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        got = self.cache.get(text)
        if got is not None:
            return got
        enc = self.backend.encode(text, add_special_tokens=False)
        n = len(enc)
        got = (np.fromiter(enc.ids, np.int64, n),
               np.fromiter(chain.from_iterable(enc.offsets), np.int64, 2 * n).reshape(n, 2))
        if text in self._seen:
            if len(self.cache) < _PIECES_KEPT:
                self.cache[text] = got
        else:
            if len(self._seen) >= _PIECES_KEPT:
                self._seen.clear()
            self._seen.add(text)
        return got

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, character offsets [n, 2]) of ``text``, as ``backend.encode(text, add_special_tokens=False)``."""
        ids, offsets, starts = [], [], []
        pos = 0
        for m in self.added.finditer(text) if self.added is not None else ():
            if m.start() > pos:
                piece_ids, piece_offsets = self._piece(text[pos : m.start()])
                ids.append(piece_ids)
                offsets.append(piece_offsets)
                starts.append(pos)
            token = m.group()
            ids.append(self.added_ids[token])
            offsets.append(self.added_offsets[token])
            starts.append(m.start())
            pos = m.end()
        if pos < len(text) or not ids:
            piece_ids, piece_offsets = self._piece(text[pos:])
            ids.append(piece_ids)
            offsets.append(piece_offsets)
            starts.append(pos)
        counts = [len(a) for a in ids]
        shift = np.repeat(np.asarray(starts, np.int64), counts)
        return np.concatenate(ids), np.concatenate(offsets) + shift[:, None]


# ----------------------------------------------------------------------------- shapes


class _Shape:
    """A conversation shape's text pieces (``pieces[k]`` before the k-th non-empty content, the last
    after all) and supervised spans as ``(piece, offset)`` pairs for their start and end."""

    __slots__ = ("pieces", "spans")

    def __init__(self, pieces: list[str], spans: list[tuple[tuple[int, int], tuple[int, int]]]):
        self.pieces, self.spans = pieces, spans


def _probe(k: int, variant: int) -> str:
    # unlikely in any template; the second variant has whitespace, quotes and markup at its edges,
    # so a template that strips, escapes or re-wraps content cuts differently and is caught
    return f"\u2063vlmforge{k}\u2063" if variant == 0 else f" \n\t<&'\"\u2063vlmforge-{k}-probe\u2063\"'&>\t\n "


def _cut(text: str, probes: list[str]) -> tuple[list[str], list[int]] | None:
    """``text`` cut at each probe (each exactly once, in order): the pieces between, and where each
    piece starts in ``text``."""
    pieces, starts, pos = [], [], 0
    for p in probes:
        at = text.find(p, pos)
        if at < 0 or text.count(p) != 1:
            return None
        pieces.append(text[pos:at])
        starts.append(pos)
        pos = at + len(p)
    pieces.append(text[pos:])
    starts.append(pos)
    return pieces, starts


def _locate(pos: int, pieces: list[str], starts: list[int]) -> tuple[int, int] | None:
    """Character ``pos`` as (piece, offset in it); None inside a probe."""
    for k, (piece, start) in enumerate(zip(pieces, starts)):
        if start <= pos <= start + len(piece):
            return k, pos - start
    return None


class ConversationEncoder:
    """``encoder(messages) -> (input_ids, mask)`` equal to ``encode_conversation(tok, messages)``
    (int64 ids, bool mask), fast for templates and shapes that qualify (see the module docstring).
    ``fast=False``: always the reference path."""

    def __init__(self, tok, *, fast: bool = True):
        self.tok = tok
        self._source = tok.chat_template
        self.template = self._source or CHAT_TEMPLATE
        self.generation = has_generation_markers(self.template)
        self.backend = getattr(tok, "backend_tokenizer", None)
        self.fast = bool(fast) and self.backend is not None and isinstance(self.template, str) \
            and content_is_verbatim(self.template)
        self._shapes: dict[tuple, _Shape | None] = {}
        # the template's own pieces of text tokenized once (a backend that splits at added tokens)
        self.pieces = PieceEncoder.for_backend(self.backend) if self.fast and \
            not getattr(tok, "split_special_tokens", False) else None

    @property
    def shapes(self) -> dict[tuple, bool]:
        """The shapes met so far: True for those on the fast path, False for those the template keeps."""
        return {key: shape is not None for key, shape in self._shapes.items()}

    def reference(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """The chat template's own (ids, mask): :func:`vlmforge.text.chat.encode_conversation`."""
        ids, mask = encode_conversation(self.tok, messages)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)

    def __call__(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        key = self._key(messages) if self.fast else None
        if key is None or not self._backend_plain():
            return self.reference(messages)
        shape = self._shapes.get(key, False)
        if shape is False:
            if len(self._shapes) >= _MAX_SHAPES:
                return self.reference(messages)
            return self._first_of_shape(key, messages)
        if shape is None:
            return self.reference(messages)
        return self._encode(shape, [m["content"] for m in messages if m["content"]])

    # -- the fast path ------------------------------------------------------------------
    def _key(self, messages: Sequence[dict]) -> tuple | None:
        """The shape of ``messages`` (roles, non-empty contents); None when the reference must
        handle them (list content, other keys' types, another template set since)."""
        template = self.tok.chat_template
        if template is not self._source and template != self._source or not messages:
            return None
        key = []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                return None
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or type(content) is not str:
                return None
            key.append((role, content != ""))
        return tuple(key)

    def _backend_plain(self) -> bool:
        """The backend encodes as the tokenizer's call does (no truncation or padding left set, its
        own handling of special tokens)."""
        b = self.backend
        return b.truncation is None and b.padding is None and \
            b.encode_special_tokens == bool(getattr(self.tok, "split_special_tokens", False))

    def _encode(self, shape: _Shape, contents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces = shape.pieces
        parts, starts, pos = [], [], 0
        for piece, content in zip(pieces, contents):
            starts.append(pos)
            parts += (piece, content)
            pos += len(piece) + len(content)
        starts.append(pos)
        parts.append(pieces[-1])
        text = "".join(parts)
        if self.pieces is not None and not self.backend.encode_special_tokens:
            ids, offsets = self.pieces.encode(text)
        else:
            enc = self.backend.encode(text, add_special_tokens=False)
            n = len(enc)
            ids = np.fromiter(enc.ids, np.int64, n)
            offsets = np.fromiter(chain.from_iterable(enc.offsets), np.int64, 2 * n).reshape(n, 2)
        spans = np.asarray([(starts[a] + da, starts[b] + db) for (a, da), (b, db) in shape.spans],
                           dtype=np.int64).reshape(-1, 2)
        mask = (generation_mask if self.generation else overlap_mask)(offsets, spans)
        return ids, mask

    def _first_of_shape(self, key: tuple, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Build the shape, encode ``messages`` both ways and keep the shape only if they agree."""
        want = self.reference(messages)
        try:
            shape = self._build(key)
        except Exception:  # a template that raises on its probe: the reference decides, as always
            shape = None
        if shape is not None:
            got = self._encode(shape, [m["content"] for m in messages if m["content"]])
            if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                log.warning("chat template: the per-shape fast path disagrees with the template on a "
                            "%d-turn conversation; that shape is encoded by the template", len(messages))
                shape = None
        self._shapes[key] = shape
        return want

    def _render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
        """The reference's text of ``messages`` and the character spans its mask supervises."""
        if not self.generation:
            return assistant_char_spans(self.tok, messages, self.template)

        texts, indices = render_jinja_template(conversations=[messages], chat_template=self.template,
                                               return_assistant_tokens_mask=True, add_generation_prompt=False,
                                               **self.tok.special_tokens_map)
        text = texts[0]
        # the text apply_chat_template tokenizes, through its public path
        if text != self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False):
            return None
        return text, [tuple(s) for s in indices[0]]

    def _build(self, key: tuple) -> _Shape | None:
        found = []
        for variant in (0, 1):
            probes = [_probe(k, variant) for k, (_, nonempty) in enumerate(key) if nonempty]
            it = iter(probes)
            messages = [{"role": role, "content": next(it) if nonempty else ""} for role, nonempty in key]
            rendered = self._render(messages)
            if rendered is None:
                return None
            text, spans = rendered
            cut = _cut(text, probes)
            if cut is None:
                return None
            pieces, starts = cut
            located = [(_locate(a, pieces, starts), _locate(b, pieces, starts)) for a, b in spans]
            if any(a is None or b is None for a, b in located):
                return None
            ordered = all(spans[k][0] <= spans[k][1] for k in range(len(spans))) and \
                all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1))
            if not ordered:
                return None
            found.append((pieces, located))
        if found[0] != found[1]:
            return None
        return _Shape(*found[0])
