"""The rules of a config field: what one `section.key` accepts (its type and range, or its choices), beside its
default (`setting`), and `check_fields`, which runs a section's fields through them. A value a rule refuses is one
line naming the field, the value and what is allowed (dsv3.train.config: RunConfig; dsv3.posttrain.config)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError


class Invalid(Exception):
    """A value a rule does not accept (turned into a ConfigError naming the field)."""


@dataclass(frozen=True)
class Int:
    """An integer (not a bool, not 4.0) in [lo, hi]."""
    lo: int
    hi: int | None = None

    @property
    def allowed(self) -> str:
        return f"an integer >= {self.lo}" if self.hi is None else f"an integer in [{self.lo}, {self.hi}]"

    def clean(self, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo or (self.hi is not None and v > self.hi):
            raise Invalid
        return v


@dataclass(frozen=True)
class Real:
    """A finite number in the interval from lo to hi (None: unbounded; open ends exclude the bound), kept as a
    float."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def allowed(self) -> str:
        if self.hi is None:
            return f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def clean(self, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise Invalid
        v = float(v)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise Invalid
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise Invalid
        return v


@dataclass(frozen=True)
class Flag:
    allowed = "true or false"

    def clean(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise Invalid
        return v


@dataclass(frozen=True)
class OneOf:
    """One of a few strings (`pattern`: or any string matching it, described by `also`)."""
    choices: tuple[str, ...]
    pattern: str = ""
    also: str = ""

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices)) + (f" or {self.also}" if self.also else "")

    def clean(self, v: Any) -> str:
        if not isinstance(v, str) or not (v in self.choices or (self.pattern and re.fullmatch(self.pattern, v))):
            raise Invalid
        return v


@dataclass(frozen=True)
class Text:
    """A string: a path or a name (`nonempty`: not "")."""
    what: str
    nonempty: bool = True

    @property
    def allowed(self) -> str:
        return f"{'a non-empty' if self.nonempty else 'a'} string ({self.what})"

    def clean(self, v: Any) -> str:
        if not isinstance(v, str) or (self.nonempty and not v.strip()):
            raise Invalid
        return v


@dataclass(frozen=True)
class Items:
    """A list whose every item `item` accepts, of exactly `n` items (or of at least one, n = 0)."""
    item: Int | Real | Text
    n: int = 0

    @property
    def allowed(self) -> str:
        count = f"{self.n} items" if self.n else "one or more items"
        return f"a list of {count}, each {self.item.allowed}"

    def clean(self, v: Any) -> list:
        if not isinstance(v, list) or (len(v) != self.n if self.n else not v):
            raise Invalid
        return [self.item.clean(x) for x in v]


def setting(default: Any, rule: Int | Real | Flag | OneOf | Text | Items) -> Any:
    """A config field: its default and its rule (in the field's metadata, where RunConfig and the tests find it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def check_fields(section: str, obj: Any) -> None:
    """Every field of a section dataclass through its rule (ints stored as floats where the rule is Real)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            setattr(obj, f.name, f.metadata["rule"].clean(value))
        except Invalid:
            raise ConfigError(f"invalid run config: {section}.{f.name}={value!r}: must be "
                              f"{f.metadata['rule'].allowed}") from None


FRACTION = Real(0, 1)           # a position in the run, or a ratio
SEED = Int(0, 2**32 - 1)
