"""One record per task (its route target, labels, spec) and the states of the parts it is built from.

A *part* is one adapter, one fusion or one head, named ``(kind, name)``. Each part has three separate states:
*active* (rows may be routed to it), *trainable* (its tensors have ``requires_grad``; read off the tensors, never
stored twice) and *frozen* for good (saved, never trained again). Stage 2 of AdapterFusion needs them apart: the
fused adapters are active but frozen, the fusion layers and the target head trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtl.adapters.inject import Target

Part = tuple[str, str]  # ("adapter" | "fusion" | "head", name)
PART_KINDS = ("adapter", "fusion", "head")


@dataclass
class PartState:
    """Whether rows may be routed to a part, and whether it is frozen for good."""

    active: bool = True
    frozen: bool = False


@dataclass
class TaskRecord:
    """A routable task: what its rows run through (an adapter or a fusion), its labels and task spec."""

    name: str
    target: Target
    labels: list[str] | None = None
    spec: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def route_part(self) -> Part:
        """The adapter or fusion part this task routes to."""
        return ("fusion", self.target.name) if self.target.is_fusion else ("adapter", self.target.name)

    @property
    def parts(self) -> list[Part]:
        """The parts this task owns: its route part and its head (fused adapters belong to their own tasks)."""
        return [self.route_part, ("head", self.name)]
