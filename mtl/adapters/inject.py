"""One generic injection mechanism: an `AdapterSlot` at each sub-layer named by `mtl.arch`.

A slot replaces the sub-layer module in place (same call signature), keeps the original as ``base``, and holds
``ModuleDict``s name -> adapter and name -> fusion layer. Which rows go through what is data: for the duration
of one layer call the model sets a `Routing` on the shared `RoutingContext`; each route names a `Target` (one
adapter, or a fusion of several adapters) and a row range. The slot resolves the target and never writes back
into the routing.

A multi-task forward replicates the rows inside the first slot that has an adapter (the model names it in
``Routing.replicate_at``), not at the start of its layer: everything the layer computes before that slot (for
Pfeiffer, the whole attention and feed-forward block) is identical for every task, so it runs once. In that slot
every route starts from the same rows, so an adapter needed by several routes (a fused target and the adapter's
own task) runs once there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mtl.adapters.bottleneck import factored_outputs, grouped_outputs
from mtl.arch import SubLayer, arch_spec, layer_list, repeat_rows


@dataclass(frozen=True)
class Target:
    """What a route applies to its rows: the adapter ``name``, or the fusion ``name`` over ``fused`` adapters."""

    name: str
    fused: tuple[str, ...] = ()

    @property
    def is_fusion(self) -> bool:
        """Whether this target mixes several adapters with a fusion layer."""
        return bool(self.fused)


# from this many task groups in one layer call, gathering each row's adapter weights for one batched matmul beats
# a loop of small matmuls per group (benchmarks/mixed_batch.py)
GROUPED_MIN = 4

Observer = Callable[["AdapterSlot", str, torch.Tensor], None]  # (slot, fusion name, softmax weights [rows, seq, N])


@dataclass(frozen=True)
class Routing:
    """Contiguous row ranges per target for one layer call (a None target, or rows not listed: no adapter)."""

    groups: list[tuple[Target | None, slice]] = field(default_factory=list)
    replicate: int = 1  # > 1: the rows arrive once and the slot at ``replicate_at`` makes this many copies
    replicate_at: str | None = None
    temperatures: dict[str, float] = field(default_factory=dict)  # fusion name -> softmax temperature
    fast_fusion: bool = True
    observe: Observer | None = None  # receives each fusion's attention weights (reports)


class RoutingContext:
    """Shared by the model and its slots; holds a `Routing` only while a layer runs."""

    def __init__(self) -> None:
        self.routing: Routing | None = None

    @contextlib.contextmanager
    def use(self, routing: Routing) -> Iterator[None]:
        """Set the routing for one call and always clear it afterwards."""
        previous, self.routing = self.routing, routing
        try:
            yield
        finally:
            self.routing = previous


class AdapterSlot(nn.Module):
    """Drop-in replacement for one sub-layer that applies each route's target to that route's rows."""

    def __init__(self, base: nn.Module, sublayer: SubLayer, layer: nn.Module, context: RoutingContext,
                 layer_index: int, position: str) -> None:
        super().__init__()
        self.base = base
        self.style = sublayer.style
        self.layer_index = layer_index
        self.position = position
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        # plain attributes, not submodules: the LayerNorm already belongs to the layer, the context to the model
        self.__dict__["context"] = context
        if sublayer.style == "output":
            norm = base.LayerNorm
        else:  # a pre-norm block has no norm after its MLP: an original_ln_before adapter reads h + x there
            norm = layer.get_submodule(sublayer.layer_norm) if sublayer.layer_norm else nn.Identity()
        self.__dict__["layer_norm"] = norm

    @property
    def can_replicate(self) -> bool:
        """Whether this slot can make the row copies itself: it must own the residual sum (``output`` style)."""
        return self.style == "output"

    def has(self, target: Target | None) -> bool:
        """Whether ``target`` does anything at this location."""
        if target is None:
            return False
        return target.name in (self.fusions if target.is_fusion else self.adapters)

    def adapt(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a, x)`` for every row (a = h where the row's target has nothing here); x is replicated too
        when this slot makes the multi-task copies."""
        routing = self.context.routing
        if routing is None or not any(self.has(t) for t, _ in routing.groups):
            return h, x
        groups = routing.groups
        if len(groups) == 1 and groups[0][1] == slice(None):
            return self._route(groups[0][0], h, x, routing, None), x
        if routing.replicate > 1 and routing.replicate_at == self.position:
            if not self.can_replicate:
                raise RuntimeError(f"layer {self.layer_index} {self.position}: a '{self.style}' slot cannot replicate rows")
            memo: dict[str, torch.Tensor] = {}  # every route starts from the same rows here: share adapter outputs
            pieces = [self._route(t, h, x, routing, memo) for t, _ in groups]
            return torch.cat(pieces, dim=0), repeat_rows(x, routing.replicate)
        if len(groups) >= GROUPED_MIN:
            grouped = self._grouped(groups, h, x)
            if grouped is not None:
                return grouped, x
        pieces = [self._route(t, h[s], x[s], routing, None) for t, s in groups]
        return torch.cat(pieces, dim=0), x

    def _grouped(self, groups: list[tuple[Target | None, slice]], h: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Many plain adapters on their own rows (a server's mixed batch) in one batched pass; None where that does
        not apply: a fusion or a row with no adapter here, adapters that read other inputs, or dropout at work."""
        if any(t is None or t.is_fusion or t.name not in self.adapters for t, _ in groups):
            return None
        adapters = [self.adapters[t.name] for t, _ in groups]
        rules = {(a.parallel, a.original_ln_before, a.residual_before_ln) for a in adapters}
        if len(rules) > 1 or any(a.training and a.dropout.p > 0 for a in adapters):
            return None
        counts = [len(range(*s.indices(h.shape[0]))) for _, s in groups]
        if sum(counts) != h.shape[0]:
            return None
        z, residual = adapters[0].inputs(h, x, self.layer_norm)  # row-wise, and the same rules for every adapter
        up = grouped_outputs(adapters, counts, z)
        return None if up is None else up + residual

    def _up(self, name: str, z: torch.Tensor, memo: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if memo is None:
            return self.adapters[name].up_output(z)
        if name not in memo:
            memo[name] = self.adapters[name].up_output(z)
        return memo[name]

    def _route(self, target: Target | None, h: torch.Tensor, x: torch.Tensor, routing: Routing,
               memo: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if not self.has(target):
            return h
        if not target.is_fusion:
            adapter = self.adapters[target.name]
            z, residual = adapter.inputs(h, x, self.layer_norm)
            return adapter.dropout(self._up(target.name, z, memo)) + residual
        fusion = self.fusions[target.name]
        adapters = [self.adapters[name] for name in target.fused]
        # every fused adapter reads the same input and residual (checked when the fusion is added)
        z, residual = adapters[0].inputs(h, x, self.layer_norm)
        query = h if fusion.config.query_before_ln else z
        temperature = routing.temperatures.get(target.name, 1.0)
        # factored unless the adapters' outputs are shared with other routes here (memo) or must be built anyway
        factored = None if memo is not None or not routing.fast_fusion or fusion.config.residual_before \
            else factored_outputs(adapters, z)
        if factored is not None:
            out, weights = fusion.forward_factored(query, *factored, residual, temperature)
        else:
            up = torch.stack([self._up(name, z, memo) for name in target.fused])
            out, weights = fusion(query, up, residual, temperature, fast=routing.fast_fusion)
        if routing.observe is not None:
            routing.observe(self, target.name, weights)
        return out

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
