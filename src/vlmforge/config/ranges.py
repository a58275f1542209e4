"""Allowed ranges of the numeric recipe fields, declared in the schema next to each field.

    lr: float = ranged(1e-4, gt=0)                      # > 0 and finite
    warmup_ratio: float = ranged(0.03, ge=0, le=1)      # in [0, 1]
    projector_lr: Optional[float] = ranged(None, gt=0)  # checked when set (None passes)
    shots: list[int] = ranged(factory=lambda: [0], ge=0)  # every element of a list / dict value

OmegaConf checks types and ``Literal`` choices but not ranges. :func:`check_ranges` walks a
structured config against its dataclasses' field metadata; the loader calls it after every merge
step, so the error names the file or ``--set`` that brought the bad value in. A ranged value must
also be finite (NaN and infinity fail every range). A few pairs of fields are ordered
(:data:`ORDERED`, e.g. ``model.images.min_tiles <= model.images.max_tiles``), checked likewise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmforge.errors import ConfigError

RANGE_KEY = "vlmforge.range"
# (lower, upper): pairs of fields where the first must not exceed the second
ORDERED = (("model.images.min_tiles", "model.images.max_tiles"),)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclasses.dataclass(frozen=True)
class Range:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def allows(self, value: float) -> bool:
        v = float(value)
        return (
            math.isfinite(v)
            and (self.gt is None or v > self.gt)
            and (self.ge is None or v >= self.ge)
            and (self.lt is None or v < self.lt)
            and (self.le is None or v <= self.le)
        )

    def describe(self, is_float: bool = True) -> str:
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        if lo is not None and hi is not None:
            left, right = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        finite = " and finite" if is_float else ""
        if lo is not None:
            return f"{'>' if self.gt is not None else '>='} {_num(lo)}{finite}"
        if hi is not None:
            return f"{'<' if self.lt is not None else '<='} {_num(hi)}{finite}"
        return "finite"


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field whose value (or each element of a list / dict value) must lie in the range."""
    metadata = {RANGE_KEY: Range(gt=gt, ge=ge, lt=lt, le=le)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_ranges(schema: type) -> dict[str, Range]:
    """{field name: Range} of a dataclass (fields without a declared range left out)."""
    if not dataclasses.is_dataclass(schema):
        return {}
    return {f.name: f.metadata[RANGE_KEY] for f in dataclasses.fields(schema) if RANGE_KEY in f.metadata}


def _elements(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, ListConfig):
        for i, v in enumerate(value):
            yield f"{key}[{i}]", v
    elif isinstance(value, DictConfig):
        for k, v in value.items():
            yield f"{key}.{k}", v
    else:
        yield key, value


def range_violations(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, Range]]:
    """(key, value, range) for every ranged value of ``cfg`` outside its range. Missing values and
    interpolations that do not resolve yet are left to the completeness check."""
    ranges = field_ranges(OmegaConf.get_type(cfg))
    for name in cfg.keys():
        name = str(name)
        key = f"{prefix}{name}"
        if OmegaConf.is_missing(cfg, name):
            continue
        try:
            value = cfg[name]
        except OmegaConfBaseException:
            continue
        rng = ranges.get(name)
        if rng is None:
            if isinstance(value, DictConfig):
                yield from range_violations(value, key + ".")
            continue
        for k, v in _elements(key, value):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not rng.allows(v):
                yield k, v, rng


def order_violations(cfg: DictConfig) -> Iterator[tuple[str, Any, str, Any]]:
    """(lower key, its value, upper key, its value) for every :data:`ORDERED` pair the wrong way round;
    pairs not in ``cfg`` (another schema) or not numbers yet are left out."""
    for lo, hi in ORDERED:
        try:
            a = OmegaConf.select(cfg, lo, default=None, throw_on_missing=False)
            b = OmegaConf.select(cfg, hi, default=None, throw_on_missing=False)
        except OmegaConfBaseException:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) and a > b:
            yield lo, a, hi, b


def check_ranges(cfg: DictConfig, source: str) -> None:
    """Raise ConfigError ``<source>: <key> must be <range>, got <value>`` for the first value out of range
    (or ``<source>: <key> (v) must be <= <key> (w)`` for an :data:`ORDERED` pair the wrong way round)."""
    for key, value, rng in range_violations(cfg):
        raise ConfigError(f"{source}: {key} must be {rng.describe(isinstance(value, float))}, got {value!r}")
    for lo, a, hi, b in order_violations(cfg):
        raise ConfigError(f"{source}: {lo} ({a}) must be <= {hi} ({b})")
