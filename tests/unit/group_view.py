"""A process group as code that only sizes its work sees it: a size and this rank (nothing
communicates). Shared by tests that build a layer or kernel "as rank r of n" in one process."""

from __future__ import annotations


class GroupView:
    """A group of ``size`` ranks seen from ``rank``."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank
