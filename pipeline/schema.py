"""The pieces a config schema is built from: the error a bad value raises, numeric ranges, and the keys every
dataset has.

They sit below ``pipeline.config`` so that a dataset module (``pipeline/data/<name>.py``) can declare its own schema,
ranges and checks without importing the config module, which reads those declarations: no import circle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``: every config check words its failure so."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def plain_number(x: float) -> str:
    """``3.0`` -> ``3``, ``0.5`` -> ``0.5``: a number as a user would type it."""
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Bound:
    """The values one numeric key may take: from ``low`` to ``high`` (either end open or absent), always finite,
    null only when ``nullable``; ``note`` says what a special value means."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    note: str = ""

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """The range in words: ``in [0, 1)``, ``at least 1``, ``positive``, ``null or at least 1``."""
        lo, hi = self.low, self.high
        num = plain_number
        if lo is not None and hi is not None:
            text = f"in {'(' if self.low_open else '['}{num(lo)}, {num(hi)}{')' if self.high_open else ']'}"
        elif lo is not None:
            text = ("positive" if lo == 0 else f"greater than {num(lo)}") if self.low_open else f"at least {num(lo)}"
        else:
            text = ("negative" if hi == 0 else f"less than {num(hi)}") if self.high_open else f"at most {num(hi)}"
        return f"null or {text}" if self.nullable else text


SEED_MAX = 2**32 - 1
COUNT = Bound(1)
FRACTION = Bound(0, 1, high_open=True)  # a dropout rate or a moving-average decay
POSITIVE = Bound(0, low_open=True)
SEED = Bound(0, SEED_MAX, note=" (NumPy and Keras seeds are unsigned 32-bit)")


# The schema holds types only: every value lives in conf/ (one place), so a default cannot drift between the two.
@dataclass
class DataConfig:
    """What every dataset's ``data`` section has; each dataset's schema adds its own keys."""

    name: str = MISSING
    source: str = MISSING
    kind: str = MISSING
