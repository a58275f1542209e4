"""A preference index on disk and its memory-mapped reader (:class:`PreferenceIndex`).

Like the SFT index (:mod:`vlmforge.data.sft.index`): ``vlmforge preference index`` (:mod:`.build`)
reads the row files once and keeps, per pair, only fixed-width numbers in ``.npy`` files opened
with ``mmap_mode="r"``, so a million pairs cost a few tens of MiB of address space, touched lazily:

- ``offsets`` (uint64) / ``nbytes`` (uint32): where the row's JSON lies in its file,
- ``file_id`` (uint16) / ``line`` (uint32): which row file (``manifest["sources"]``) and line,
- ``n_images`` (uint16),
- ``prompt_text_tokens`` (uint32): the chat-formatted prompt, each ``<image>`` counted once,
- ``prompt_tokens`` (uint32): the same with each image as ``visual_tokens`` tokens (the manifest's),
- ``chosen_tokens`` / ``rejected_tokens`` (uint32): each response plus its end-of-turn token.

A row repeated by a meta.json ``repeat_time`` > 1 is several records with the same offsets.
Random access is one ``os.pread`` + ``json.loads`` (:meth:`PreferenceIndex.pair`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vlmforge.data.preference.formats import PreferenceDataError, PreferencePair, parse_row
from vlmforge.files import stamp_problem

ARRAYS = {
    "offsets": np.uint64,
    "nbytes": np.uint32,
    "file_id": np.uint16,
    "line": np.uint32,
    "n_images": np.uint16,
    "prompt_text_tokens": np.uint32,
    "prompt_tokens": np.uint32,
    "chosen_tokens": np.uint32,
    "rejected_tokens": np.uint32,
}
INDEX_VERSION = 1
STAGE = "preference-index"


class PreferenceIndex:
    """An opened preference index: memory-mapped arrays + the row files, opened on first use."""

    def __init__(self, folder: str | os.PathLike, check_stale: bool = True):
        self.dir = Path(folder)
        man_path = self.dir / "manifest.json"
        if not man_path.is_file():
            raise PreferenceDataError(
                f"{self.dir}: not a preference index (no manifest.json); build it with `vlmforge preference index`"
            )
        self.manifest = json.loads(man_path.read_text())
        if self.manifest.get("stage") != STAGE:
            raise PreferenceDataError(f"{man_path}: not a preference index manifest (stage {self.manifest.get('stage')!r})")
        self.sources: list[dict] = list(self.manifest["sources"])
        if check_stale:
            for s in self.sources:
                problem = stamp_problem(s)
                if problem == "gone":
                    raise PreferenceDataError(f"{self.dir}: row file {s['path']} is gone")
                if problem:
                    raise PreferenceDataError(
                        f"{self.dir}: index is stale: {s['path']} changed since it was indexed; rebuild it with "
                        "`vlmforge preference index ... --overwrite`"
                    )
        for name in ARRAYS:
            arr = np.load(self.dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            setattr(self, name, arr.view(np.ndarray))  # plain ndarray view: cheap scalar indexing
        self.visual_tokens = int(self.manifest["visual_tokens"])
        self.allow_absolute_paths = bool(self.manifest.get("allow_absolute_paths", False))
        self._fds: list[int | None] = [None] * len(self.sources)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getstate__(self):  # pragma: no cover - DataLoader workers reopen the files themselves
        d = dict(self.__dict__)
        d["_fds"] = [None] * len(self.sources)
        return d

    def _fd(self, fid: int) -> int:
        if self._pid != os.getpid():  # a forked worker: do not share descriptors
            self._fds = [None] * len(self.sources)
            self._pid = os.getpid()
        fd = self._fds[fid]
        if fd is None:
            fd = self._fds[fid] = os.open(self.sources[fid]["path"], os.O_RDONLY)
        return fd

    def raw(self, i: int) -> bytes:
        """The JSON bytes of record ``i``."""
        return os.pread(self._fd(int(self.file_id[i])), int(self.nbytes[i]), int(self.offsets[i]))

    def row(self, i: int) -> dict:
        try:
            return json.loads(self.raw(i))
        except ValueError as e:
            raise PreferenceDataError(f"{self.where(i)}: JSON does not parse: {e}", "unparsable") from None

    def pair(self, i: int) -> PreferencePair:
        """Record ``i`` as a :class:`PreferencePair` (its other fields in ``.meta``)."""
        try:
            return parse_row(self.raw(i))
        except PreferenceDataError as e:
            raise PreferenceDataError(f"{self.where(i)}: {e}", e.reason) from None

    def where(self, i: int) -> str:
        return f"{self.sources[int(self.file_id[i])]['path']}:{int(self.line[i])}"

    def image_root(self, i: int) -> str:
        """The folder record ``i``'s image paths are relative to (its row file's root)."""
        return self.sources[int(self.file_id[i])]["image_root"]

    def prompt_lengths(self, visual_tokens: int | None = None) -> np.ndarray:
        """Prompt tokens of every pair (int64), recomputed when ``visual_tokens`` differs from the build's."""
        if visual_tokens is None or int(visual_tokens) == self.visual_tokens:
            return self.prompt_tokens.astype(np.int64)
        return self.prompt_text_tokens.astype(np.int64) + self.n_images.astype(np.int64) * (int(visual_tokens) - 1)

    def longest_row(self, visual_tokens: int | None = None) -> np.ndarray:
        """Prompt + the longer response: the longest row a pair needs (what ``max_len`` bounds)."""
        return self.prompt_lengths(visual_tokens) + np.maximum(self.chosen_tokens, self.rejected_tokens).astype(np.int64)

    def shared_lengths(self, visual_tokens: int | None = None) -> np.ndarray:
        """Prompt + chosen + rejected: the pair's tokens in the shared-prompt layout."""
        return (self.prompt_lengths(visual_tokens) + self.chosen_tokens.astype(np.int64)
                + self.rejected_tokens.astype(np.int64))

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.sources)


def open_preference_index(folder: str | os.PathLike, check_stale: bool = True) -> PreferenceIndex:
    return PreferenceIndex(folder, check_stale=check_stale)
