"""`PartPool`: the modules of removed tasks, kept for tasks added later with the same shapes.

Building a task's modules (and randomly initialising them, only for a file's weights to overwrite them) is most of
an adapter's load time. A server that loads and evicts adapters all the time hands each evicted task's modules to a
pool and takes them back for the next load of the same shape, so once warm it builds none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class PartPool:
    """Free modules keyed by what they were built from (compared with ``==``, so configs need not be hashable).

    A module taken from the pool holds its previous task's values: only a caller that overwrites every parameter
    (loading a file) may pass a pool to `MTLModel.add_task`.
    """

    def __init__(self) -> None:
        self._free: list[tuple[Any, nn.Module | dict]] = []
        self.reused = 0  # modules handed out again (how often a build was saved)

    def __len__(self) -> int:
        return len(self._free)

    def put(self, key: Any, parts: nn.Module | dict) -> None:
        """Keep ``parts`` (a module, or a dict of modules built together) for a later `take` with an equal key."""
        self._free.append((key, parts))

    def take(self, key: Any, build: Callable[[], Any]) -> Any:
        """The most recently freed parts built from ``key``, or ``build()`` when there are none."""
        for i in range(len(self._free) - 1, -1, -1):
            if self._free[i][0] == key:
                parts = self._free.pop(i)[1]
                modules = parts.values() if isinstance(parts, dict) else [parts]
                for module in modules:  # as a newly built module is: trainable
                    module.requires_grad_(True)
                self.reused += 1
                return parts
        return build()

    def trim(self, keep: int) -> None:
        """Drop all but the ``keep`` most recently freed entries (their memory goes back)."""
        del self._free[:max(0, len(self._free) - keep)]
