"""`FusionConfig`: AdapterFusion settings, field names as AdapterHub `adapters` 1.3 `AdapterFusionConfig`.

Presets (AdapterHub's `DynamicAdapterFusionConfig` / `StaticAdapterFusionConfig`):

- ``dynamic``: query, key and value projections; value starts near identity and is pulled
  towards it by ``reg_weight * ||I - V||_F^2``.
- ``static``: query and key only; the context is the probability-weighted sum of the adapters' outputs.

Extras AdapterHub lacks: ``reg_weight`` (AdapterHub hard-codes 0.01) and an explicit temperature
schedule (AdapterHub starts at 50 and subtracts 0.05 per forward call, down to 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mtl.errors import MTLConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "dynamic": dict(query=True, key=True, value=True, value_initialized=True, regularization=True, temperature=False),
    "static": dict(query=True, key=True, value=False, value_initialized=False, regularization=False, temperature=False),
}


@dataclass
class FusionConfig:
    """Settings of one AdapterFusion layer; unset fields take the preset's value."""

    type: str = field(default="dynamic", metadata={"help": "preset: dynamic | static"})
    query: bool | None = field(default=None, metadata={"help": "learned query projection (must be true)"})
    key: bool | None = field(default=None, metadata={"help": "learned key projection (must be true)"})
    value: bool | None = field(default=None, metadata={"help": "learned value projection (no bias)"})
    value_initialized: bool | None = field(default=None, metadata={"help": "value starts as identity (1e-6 off-diagonal) "
                                                                           "instead of N(0, 0.02)"})
    regularization: bool | None = field(default=None, metadata={"help": "add reg_weight * ||I - V||_F^2 to the loss"})
    temperature: bool | None = field(default=None, metadata={"help": "anneal the softmax temperature from "
                                                                     "temperature_start to temperature_end"})
    residual_before: bool = field(default=False, metadata={"help": "add the residual to each adapter output before "
                                                                   "fusion instead of to the fused output"})
    value_before_softmax: bool = field(default=True, metadata={"help": "apply value per adapter before mixing "
                                                                       "(same result: value is linear)"})
    query_before_ln: bool = field(default=False, metadata={"help": "query is the sub-layer output before the "
                                                                   "adapter's LayerNorm"})
    dropout_prob: float | None = field(default=None, metadata={"help": "dropout on the attention scores; None: the "
                                                                       "backbone's attention_probs_dropout_prob"})
    reg_weight: float = field(default=0.01, metadata={"help": "weight of the value regularisation"})
    temperature_start: float = field(default=50.0, metadata={"help": "softmax temperature at step 0 when annealing"})
    temperature_end: float = field(default=1.0, metadata={"help": "temperature after temperature_steps and at evaluation"})
    temperature_steps: int = field(default=1000, metadata={"help": "optimiser steps of the linear temperature decay"})

    def __post_init__(self) -> None:
        if self.type not in PRESETS:
            raise MTLConfigError(f"fusion.type: '{self.type}' is not a preset, expected one of {sorted(PRESETS)}")
        for key, value in PRESETS[self.type].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not (self.query and self.key):
            raise MTLConfigError(f"fusion.query/fusion.key: query={self.query}, key={self.key}, expected both true "
                                 "(the variant without query or key projection is not implemented)")
        if self.regularization and not self.value:
            raise MTLConfigError("fusion.regularization: true needs a value projection, expected value=true "
                                 "or regularization=false")
        if self.dropout_prob is not None and not 0.0 <= self.dropout_prob < 1.0:
            raise MTLConfigError(f"fusion.dropout_prob: {self.dropout_prob}, expected a value in [0, 1) or null")
        if self.reg_weight < 0:
            raise MTLConfigError(f"fusion.reg_weight: {self.reg_weight}, expected a number >= 0")
        if self.temperature_steps < 1:
            raise MTLConfigError(f"fusion.temperature_steps: {self.temperature_steps}, expected an integer >= 1")
        for name in ("temperature_start", "temperature_end"):
            if getattr(self, name) <= 0:
                raise MTLConfigError(f"fusion.{name}: {getattr(self, name)}, expected a positive number")

    def temperature_at(self, step: int | None) -> float:
        """Softmax temperature after `step` optimiser steps; None means evaluation."""
        if not self.temperature:
            return 1.0
        if step is None:
            return self.temperature_end
        frac = min(max(step, 0), self.temperature_steps) / self.temperature_steps
        return self.temperature_start + (self.temperature_end - self.temperature_start) * frac

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, fully resolved settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "fusion config") -> FusionConfig:
        """Build from a dict (e.g. a JSON file), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MTLConfigError(f"{source}: unknown fusion keys {unknown}, expected some of {sorted(known)}")
        return cls(**data)


def as_fusion_config(value: FusionConfig | str | dict[str, Any]) -> FusionConfig:
    """Accept a preset name, a dict or a `FusionConfig`."""
    if isinstance(value, FusionConfig):
        return value
    if isinstance(value, str):
        return FusionConfig(type=value)
    return FusionConfig.from_dict(dict(value))
