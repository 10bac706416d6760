"""Sweeps: the command-line forms that expand into Hydra multiruns.

``seeds=N`` repeats every configuration of a sweep (named, or a hand-written grid) with seeds 1..N: the same seeds
for every configuration, so runs pair up by seed (same initial weights draw, same data order) and
``pipeline.compare`` can test differences over seeds.
"""

from __future__ import annotations

import re

MAX_SEEDS = 1000
_SEEDS = re.compile(r"\+?seeds=(?P<value>.*)")


class SweepError(ValueError):
    """A sweep option that cannot work; the message says how to write it."""


def expand_seeds(argv: list[str]) -> list[str]:
    """``seeds=N`` -> ``seed=1,...,N`` (and multirun mode); every other argument unchanged."""
    found = [(i, m) for i, a in enumerate(argv) if (m := _SEEDS.fullmatch(a))]
    if not found:
        return argv
    if len(found) > 1:
        raise SweepError("seeds= is given more than once; give it once, e.g. seeds=5")
    index, match = found[0]
    value = match["value"]
    if not value.isdigit() or not 1 <= int(value) <= MAX_SEEDS:
        raise SweepError(f"seeds must be a whole number of seeds from 1 to {MAX_SEEDS} (seeds 1..N), got {value!r}")
    if any(a.lstrip("+~").startswith("seed=") for a in argv):
        raise SweepError("give either seeds=N (seeds 1..N) or seed=a,b,c, not both")
    expanded = [*argv[:index], "seed=" + ",".join(str(s) for s in range(1, int(value) + 1)), *argv[index + 1 :]]
    if not {"-m", "--multirun"} & set(argv) and not any(a.startswith("hydra.mode=") for a in argv):
        expanded.append("hydra.mode=MULTIRUN")
    return expanded
