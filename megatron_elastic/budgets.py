"""Budgets named on a command line, parsed in one place for every tool that takes them
(``export_budget.py --budget``, ``evaluate.py --budgets``, ``generate.py --budget`` / ``--draft``).

A budget is one of an elastic checkpoint's trained budget names (its recipe's keys: ``full``,
``75%``, ``6B``, ... are names, not sizes or fractions), ``all`` (every trained budget, in the
recipe's order), or a fraction of the parent such as ``0.6`` between two trained budgets: the
router interpolates between their choices (untrained; the router refuses a fraction outside the
trained range when it decides). Several may be given comma-separated or as repeated flags.

    parse_budgets("all", ["full", "75%"])                   -> ["full", "75%"]
    parse_budgets(["full", "75%,full"], trained)            -> ["full", "75%"]
    parse_budgets("0.6", trained)                           -> [0.6]
    parse_budgets("0.6", trained, interpolate=False)        -> ValueError: ... pass --interpolate
    parse_budgets("0.6", trained, allow_fractions=False)    -> ValueError: unknown budget '0.6'
    parse_budgets("all", trained, single=True)              -> ValueError: unknown budget 'all'
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["parse_budgets"]


def parse_budgets(
    texts: str | Sequence[str],
    trained: Sequence[str],
    *,
    allow_fractions: bool = True,
    interpolate: bool | None = None,
    verb: str = "run",
    single: bool = False,
) -> list[str | float]:
    """The budgets ``texts`` name, in order, each once.

    ``allow_fractions=False``: a fraction is an unknown budget (an exported checkpoint, a draft
    without ``--interpolate``). ``interpolate``: when False, a fraction is refused with the hint
    to pass ``--interpolate`` ("... to ``verb`` it through router interpolation"); None accepts
    it without the flag. ``single``: ``texts`` is one budget, taken whole (no ``all``, no comma
    list). ``ValueError`` listing the trained budgets for anything else."""
    known = sorted(trained)
    if single:
        names = [texts] if isinstance(texts, str) else list(texts)
        if len(names) != 1:
            raise ValueError(f"give one budget, not {names}; trained budgets: {known}")
    else:
        items = [texts] if isinstance(texts, str) else list(texts)
        names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no budget given; trained budgets: {known} (or 'all')")
    out: list[str | float] = []
    for name in names:
        if name == "all" and not single:
            chosen: list[str | float] = list(trained)
        elif name in trained:
            chosen = [name]
        else:
            try:
                fraction = float(name)
            except ValueError:
                fraction = None
            if fraction is None or not allow_fractions:
                raise ValueError(f"unknown budget {name!r}; trained budgets: {known}")
            if interpolate is False:
                raise ValueError(
                    f"{fraction} is not a trained budget ({known}); pass --interpolate to {verb} "
                    "it through router interpolation (untrained)"
                )
            chosen = [fraction]
        out += [b for b in chosen if b not in out]
    return out
