"""One generic injection mechanism: an `AdapterSlot` at each sub-layer named by `mtl.arch`.

A slot replaces the sub-layer module in place (same call signature), keeps the original as
``base``, and holds a ``ModuleDict`` task -> adapter. Which rows belong to which task is data:
the model sets a `Routing` on the shared `RoutingContext` for the duration of one forward.

A multi-task forward replicates the rows inside the first slot that has an adapter (``Routing.replicate``),
not at the start of its layer: everything the layer computes before that slot (for Pfeiffer, the whole
attention and feed-forward block) is identical for every task, so it runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mtl.arch import SubLayer, arch_spec, layer_list


@dataclass
class Routing:
    """Contiguous row ranges per task for the current forward (rows not listed: no adapter)."""

    groups: list[tuple[str, slice]] = field(default_factory=list)
    replicate: int = 1  # > 1: the rows still arrive once; the first slot with an adapter makes this many copies


class RoutingContext:
    """Shared by the model and its slots; holds a `Routing` only while a forward runs."""

    def __init__(self) -> None:
        self.routing: Routing | None = None

    @contextlib.contextmanager
    def use(self, routing: Routing) -> Iterator[None]:
        """Set the routing for one forward and always clear it afterwards."""
        previous, self.routing = self.routing, routing
        try:
            yield
        finally:
            self.routing = previous

    @property
    def groups(self) -> list[tuple[str, slice]]:
        """Current row groups; none outside `MTLModel.forward`, so the backbone alone stays the bare backbone."""
        return self.routing.groups if self.routing is not None else []


class AdapterSlot(nn.Module):
    """Drop-in replacement for one sub-layer that applies each task's adapter to that task's rows."""

    def __init__(self, base: nn.Module, sublayer: SubLayer, layer: nn.Module, context: RoutingContext,
                 layer_index: int, position: str) -> None:
        super().__init__()
        self.base = base
        self.style = sublayer.style
        self.layer_index = layer_index
        self.position = position
        self.adapters = nn.ModuleDict()
        # plain attributes, not submodules: the LayerNorm already belongs to the layer, the context to the model
        self.__dict__["context"] = context
        self.__dict__["layer_norm"] = base.LayerNorm if sublayer.style == "output" else layer.get_submodule(sublayer.layer_norm)

    @property
    def can_replicate(self) -> bool:
        """Whether this slot can make the row copies itself: it must own the residual sum (``output`` style)."""
        return self.style == "output"

    def adapt(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a, x)`` for every row (a = h where the row's task has no adapter here); x is replicated too
        when this slot makes the multi-task copies."""
        routing = self.context.routing
        groups = routing.groups if routing is not None else []
        if not any(task in self.adapters for task, _ in groups):
            return h, x
        if routing.replicate > 1:
            if not self.can_replicate:
                raise RuntimeError(f"layer {self.layer_index} {self.position}: a '{self.style}' slot cannot replicate rows")
            h, x = repeat_rows(h, routing.replicate), repeat_rows(x, routing.replicate)
            routing.replicate = 1
        if len(groups) == 1 and groups[0][1] == slice(None):
            return self.adapters[groups[0][0]](h, x, self.layer_norm), x
        pieces = [self.adapters[t](h[s], x[s], self.layer_norm) if t in self.adapters else h[s] for t, s in groups]
        return torch.cat(pieces, dim=0), x

    def forward(self, *args, **kwargs):
        if self.style == "output":
            hidden_in, x = args[0], args[1]
            a, x = self.adapt(self.base.dropout(self.base.dense(hidden_in)), x)
            return self.layer_norm(a + x)
        out = self.base(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        if isinstance(out, tuple):
            return (self.adapt(out[0], x)[0],) + tuple(out[1:])
        return self.adapt(out, x)[0]


def repeat_rows(tensor: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    """Stack ``copies`` copies of a batch along the row dimension (None stays None)."""
    if tensor is None:
        return None
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))


def inject_slots(backbone: nn.Module, context: RoutingContext) -> list[dict[str, AdapterSlot]]:
    """Replace every attention/FFN sub-layer with an empty slot; returns slots per layer by position."""
    spec = arch_spec(backbone)
    slots: list[dict[str, AdapterSlot]] = []
    for index, layer in enumerate(layer_list(backbone)):
        per_layer = {}
        for position, sublayer in (("attn", spec.attn), ("ffn", spec.ffn)):
            parent_path, _, name = sublayer.path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            base = getattr(parent, name)
            if isinstance(base, AdapterSlot):
                raise RuntimeError(f"layer {index} {position}: slots already injected")
            slot = AdapterSlot(base, sublayer, layer, context, index, position)
            setattr(parent, name, slot)
            per_layer[position] = slot
        slots.append(per_layer)
    return slots
