"""An SFT index on disk and its memory-mapped reader (:class:`SFTIndex`).

Loading a LLaVA file (:mod:`.records`) with ``json.load`` needs tens of bytes of Python objects
per byte of JSON. Instead ``vlmforge sft-index`` (:mod:`.build`) scans it once and keeps, per
record, only fixed-width numbers in ``.npy`` files that are opened with ``mmap_mode="r"``:

- ``offsets`` (uint64) / ``nbytes`` (uint32): where the record's JSON lies in its source file,
- ``file_id`` (uint16) / ``line`` (uint32): which source file and line (for error messages),
- ``n_images`` (uint16) / ``has_image`` (bool),
- ``text_tokens`` (uint32): tokens of the chat-formatted text, each ``<image>`` counted once
  (:mod:`.lengths`: exact or estimated),
- ``mm_length`` (uint32): the multimodal length the packer and length grouping use:
  ``text_tokens + n_images * (visual_tokens - 1)`` on a fixed grid (every image one tile),
  ``text_tokens - n_images + visual_tokens[i]`` under a dynamic layout,
- ``visual_tokens`` (uint32, only an index built with ``model.images.tiles`` or a start/end wrap):
  the record's placeholder and wrap tokens, its images' tiles counted from their (width, height)
  read from the file headers (:class:`vlmforge.arch.tiles.ImageLayout`; a meta source's
  ``max_dynamic_patch`` is its tile budget).

The manifest's ``images`` records the layout the index was built for (tiles, tile, min/max_tiles,
thumbnail, tokens_per_tile, start/end and their ids) and ``tiles`` its statistics. An index with
``visual_tokens`` is only read with the same layout (:func:`layout_problem`); a fixed-grid index
recomputes its lengths for another number of tokens per image, as before.

``manifest.json`` lists the source files (``inputs``, one per ``file_id``) and, per file, its
``sources`` entry: name and meta file (InternVL meta files), image root, ``repeat_time``,
``data_augment``, ``max_dynamic_patch``, rows read / kept / dropped and the mixture's shares. A
``repeat_time`` above 1 writes a record's row more than once.

Packing plans with ``mm_length``: build the index with exact lengths for packing (an estimated
length can overflow a pack; the loader then moves the overflowing conversation to an extra row,
never splitting it). Random access is one ``os.pread`` + ``json.loads`` (:meth:`SFTIndex.record`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from vlmforge.arch.tiles import ImageLayout, layout_mismatch
from vlmforge.data.sft.records import SFTDataError, llava_to_messages
from vlmforge.files import stamp_problem

ARRAYS = {
    "offsets": np.uint64,
    "nbytes": np.uint32,
    "file_id": np.uint16,
    "line": np.uint32,
    "n_images": np.uint16,
    "has_image": np.bool_,
    "text_tokens": np.uint32,
    "mm_length": np.uint32,
}
# written only under a dynamic layout (tiles or a wrap): fixed-grid indexes stay as they were
LAYOUT_ARRAYS = {"visual_tokens": np.uint32}
# 2: the ``images`` layout in the manifest, ``visual_tokens`` under a dynamic layout; version 1
# indexes (no ``images``) are fixed-grid and read as before
INDEX_VERSION = 2


class SFTIndex:
    """An opened index: memory-mapped arrays + open source files; ``record(i)`` reads one record.

    Holding it costs a few file descriptors and the pages of the arrays that were touched
    (a few fixed-width numbers per record), not the JSON.
    """

    def __init__(self, index_dir: str | os.PathLike, check_stale: bool = True):
        self.dir = Path(index_dir)
        man_path = self.dir / "manifest.json"
        if not man_path.is_file():
            raise SFTDataError(f"{self.dir}: not an SFT index (no manifest.json); build it with `vlmforge sft-index`")
        self.manifest = json.loads(man_path.read_text())
        if self.manifest.get("stage") != "sft-index":
            raise SFTDataError(f"{man_path}: not an SFT index manifest (stage {self.manifest.get('stage')!r})")
        self.sources = [s["path"] for s in self.manifest["inputs"]]
        # per file id: name, image root, data_augment, max_dynamic_patch (None: an index from before
        # meta files, where every file is read from the one image_root)
        self.source_info: list[dict] | None = self.manifest.get("sources")
        if check_stale:
            for s in self.manifest["inputs"] + self.manifest.get("meta_files", []):
                problem = stamp_problem(s)
                if problem == "gone":
                    raise SFTDataError(f"{self.dir}: source file {s['path']} is gone")
                if problem:
                    raise SFTDataError(
                        f"{self.dir}: index is stale: {s['path']} changed since it was indexed; rebuild it"
                    )
        version = int(self.manifest.get("index_version", 1))
        if version > INDEX_VERSION:
            raise SFTDataError(f"{self.dir}: SFT index version {version} is newer than this vlmforge reads "
                               f"({INDEX_VERSION}); rebuild it with `vlmforge sft-index` or update vlmforge")
        for name in ARRAYS:
            setattr(self, name, self._array(name))
        self.visual_tokens = int(self.manifest["visual_tokens"])  # tokens per image (per tile)
        # per record: placeholder + wrap tokens under the build's dynamic layout; None on a fixed grid
        self.record_visual: np.ndarray | None = \
            self._array("visual_tokens") if "visual_tokens" in self.manifest.get("arrays", ()) else None
        images = self.manifest.get("images")
        self.layout = ImageLayout.from_record(images) if images else ImageLayout(self.visual_tokens)
        self.image_root = self.manifest.get("image_root")
        self._fds: list[int | None] = [None] * len(self.sources)
        self._pid = os.getpid()

    def _array(self, name: str) -> np.ndarray:
        # A plain ndarray view of the memory map: same pages, but scalar indexing skips
        # np.memmap's Python-level __getitem__ on every record read.
        return np.load(self.dir / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)

    @property
    def dynamic(self) -> bool:
        """Built under a dynamic layout (per-record ``visual_tokens``)."""
        return self.record_visual is not None

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getstate__(self):  # pragma: no cover - DataLoader workers re-open files themselves
        d = dict(self.__dict__)
        d["_fds"] = [None] * len(self.sources)
        return d

    def _fd(self, fid: int) -> int:
        if self._pid != os.getpid():  # forked worker: do not share file offsets/descriptors
            self._fds = [None] * len(self.sources)
            self._pid = os.getpid()
        fd = self._fds[fid]
        if fd is None:
            fd = self._fds[fid] = os.open(self.sources[fid], os.O_RDONLY)
        return fd

    def raw(self, i: int) -> bytes:
        """The JSON bytes of record ``i`` (IndexError when out of range)."""
        fd = self._fds[self.file_id[i]] if self._pid == os.getpid() else None
        if fd is None:
            fd = self._fd(int(self.file_id[i]))
        return os.pread(fd, int(self.nbytes[i]), int(self.offsets[i]))

    def record(self, i: int) -> dict:
        """The parsed JSON record ``i`` (as ``json.loads`` of its bytes)."""
        try:
            return json.loads(self.raw(i))
        except ValueError as e:
            raise SFTDataError(f"{self.where(i)}: JSON does not parse: {e}", "json_error") from None

    def messages(self, i: int) -> tuple[list[dict], list[str]]:
        rec = self.record(i)
        try:
            return llava_to_messages(rec)
        except SFTDataError as e:
            raise SFTDataError(f"{self.where(i)}: {e}", e.reason) from None

    def where(self, i: int) -> str:
        return f"{self.sources[int(self.file_id[i])]}:{int(self.line[i])}"

    def layout_problem(self, layout: ImageLayout) -> str | None:
        """Why this index cannot be read with ``layout`` (None: it can). A dynamic index holds lengths
        for its build's layout only; a fixed-grid one recomputes them for any fixed grid."""
        if not (self.dynamic or layout.dynamic) or not layout_mismatch(layout.record(), self.layout.record()):
            return None
        return (f"SFT index {self.dir} was built for images as {self.layout.describe()}, but the recipe's "
                f"model has {layout.describe()}: rebuild it with `vlmforge sft-index` and this recipe")

    def mm_lengths(self, visual_tokens: int | None = None) -> np.ndarray:
        """Multimodal lengths; on a fixed grid recomputed (in memory) when ``visual_tokens`` differs
        from the build's (a dynamic index's lengths hold for its own layout only)."""
        if visual_tokens is None or visual_tokens == self.visual_tokens:
            return self.mm_length
        if self.dynamic:
            raise SFTDataError(f"{self.dir}: built for {self.visual_tokens} tokens per tile, asked for {visual_tokens}")
        return self.text_tokens.astype(np.int64) + self.n_images.astype(np.int64) * (visual_tokens - 1)

    def visual_lengths(self, visual_tokens: int | None = None) -> np.ndarray:
        """Visual tokens (placeholders and wraps) of every record: the build's per-record counts under
        a dynamic layout, ``n_images x visual_tokens`` on a fixed grid (what rank balancing weighs)."""
        if self.record_visual is not None:
            return self.record_visual
        vt = self.visual_tokens if visual_tokens is None else int(visual_tokens)
        return self.n_images.astype(np.int64) * vt

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.sources)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.record(i)


def open_index(index_dir: str | os.PathLike, check_stale: bool = True) -> SFTIndex:
    return SFTIndex(index_dir, check_stale=check_stale)
