"""Small file helpers every stage uses: numbered line reading, atomic writes and the stage manifest."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from vlmforge import __version__
from vlmforge.errors import UserError

# A run folder's per-step log, one json object per optimizer step (written by the trainer).
METRICS_FILE = "metrics.jsonl"


class PathOutsideRootError(UserError):
    """A path read from a data file that leads out of its declared root (``..``, an absolute path,
    a symlink pointing elsewhere). Readers skip and count it under ``reason`` or stop in strict mode."""

    reason = "path_outside_root"


def resolve_inside(
    root: str | os.PathLike | None,
    rel: str,
    *,
    allow_absolute: bool = False,
    dir_cache: dict[str, str] | None = None,
) -> Path:
    """``root / rel`` with symlinks resolved, refused (:class:`PathOutsideRootError`) unless it lies
    inside ``root`` (also resolved).

    An absolute ``rel`` is refused unless ``allow_absolute`` (then it is returned as given, resolved).
    ``root=None``: no folder to resolve against yet, so only a lexical check (no absolute path, no
    ``..`` leading out); the path comes back normalised and relative. ``dir_cache`` (a dict kept by
    the caller) memoises resolved folders, so many files in one folder cost one lookup each.
    """
    rel = os.fspath(rel)
    if "\0" in rel:
        raise PathOutsideRootError(f"path {rel!r} contains a NUL byte")
    if os.path.isabs(rel):
        if not allow_absolute:
            raise PathOutsideRootError(
                f"absolute path {rel} (paths must be relative to the image root; opt in with allow_absolute_paths)"
            )
        return Path(os.path.realpath(rel))
    if root is None:
        norm = os.path.normpath(rel)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise PathOutsideRootError(f"path {rel} leads out of the image root")
        return Path(norm)
    cache: dict[str, str] = {} if dir_cache is None else dir_cache

    def realdir(d: str) -> str:
        r = cache.get(d)
        if r is None:
            r = cache[d] = os.path.realpath(d)
        return r

    base = realdir(os.fspath(root))
    head, tail = os.path.split(os.path.join(base, rel))
    if tail in ("", ".", ".."):
        real = os.path.realpath(os.path.join(base, rel))
    else:
        real = os.path.join(realdir(head), tail)
        if os.path.islink(real):
            real = os.path.realpath(real)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise PathOutsideRootError(f"path {rel} resolves to {real}, outside the image root {base}")
    return Path(real)


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """("FILE:LINE", text) for every non-blank line, so a reader's errors can name the exact line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line


def prepare_out_dir(
    path: str | os.PathLike, *, overwrite: bool = False, resumable: bool = False, flag: str = "--out"
) -> bool:
    """Make a stage's output folder ready; returns True when it already held files.

    Every stage treats an existing non-empty folder the same way: refused unless ``overwrite``
    (the stage then writes over it) or ``resumable`` (the stage picks up where a killed run
    stopped, as curate and train do). A path that is a file, or that cannot be created or
    written, is refused as one line naming ``flag`` and the path.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; give a folder path")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not (overwrite or resumable):
        raise UserError(
            f"{flag} {out} exists and is not empty; pass --overwrite to write over it, or choose another {flag}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot create the folder ({e.strerror or e}); choose a writable path") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: the folder is not writable; choose a writable path")
    return nonempty


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file + rename so a killed process never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_manifest(
    out_dir: str | os.PathLike,
    stage: str,
    *,
    inputs: Any = None,
    config: Any = None,
    counts: dict | None = None,
    dropped: dict | None = None,
    **extra: Any,
) -> Path:
    """Every stage writes ``manifest.json``: inputs, config, counts, what was dropped and why."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    manifest = {
        "stage": stage,
        "vlmforge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "inputs": inputs,
        "counts": counts or {},
        "dropped": dropped or {},
        **extra,
        "config": config,
    }
    path = Path(out_dir) / "manifest.json"
    write_json(path, manifest)
    return path


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl ([] when there is none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows


# A manifest lists this many examples (file:line or shard/key) of each reason it dropped samples for.
EXAMPLES_PER_REASON = 5


def note_example(examples: dict[str, list[dict]], reason: str, example: dict) -> None:
    """Keep ``example`` under ``reason`` if that reason has fewer than EXAMPLES_PER_REASON so far."""
    kept = examples.setdefault(reason, [])
    if len(kept) < EXAMPLES_PER_REASON:
        kept.append(example)


def file_stamp(path: str | os.PathLike) -> dict:
    """What an index records of a source file to notice later that it changed: path, size, mtime."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stamp_problem(stamp: dict) -> str | None:
    """None if the file still matches its :func:`file_stamp`, else "gone" or "changed"."""
    try:
        st = os.stat(stamp["path"])
    except FileNotFoundError:
        return "gone"
    return None if (st.st_size, st.st_mtime_ns) == (stamp["size"], stamp["mtime_ns"]) else "changed"
