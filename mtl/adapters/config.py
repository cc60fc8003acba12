"""`AdapterConfig`: the bottleneck adapter's settings, with AdapterHub-compatible presets.

Presets follow AdapterHub `adapters` 1.3 (h = a sub-layer's dense+dropout output, x = its input,
LN = its own frozen LayerNorm):

- ``pfeiffer`` (SeqBnConfig): FFN output only; z = LN(h + x); a = up(relu(down(z))) + h; out = LN(a + x).
- ``houlsby`` (DoubleSeqBnConfig): attention and FFN outputs; a = up(swish(down(h))) + h; out = LN(a + x).
- ``parallel`` (ParBnConfig): FFN; out = LN(h + x + 4.0 * up(relu(down(x)))).

Unlike AdapterHub's SeqBn/DoubleSeqBn default, the up-projection starts at zero (``init="identity"``),
so a fresh adapter leaves the backbone's output exactly unchanged; ``init="bert"`` reproduces AdapterHub's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mtl.errors import MTLConfigError

POSITIONS = ("attn", "ffn")
NON_LINEARITIES = ("relu", "swish", "silu", "gelu", "tanh")
INITS = ("identity", "bert", "mam")

PRESETS: dict[str, dict[str, Any]] = {
    "pfeiffer": dict(positions=["ffn"], non_linearity="relu", original_ln_before=True, parallel=False, scaling=1.0),
    "houlsby": dict(positions=["attn", "ffn"], non_linearity="swish", original_ln_before=False, parallel=False, scaling=1.0),
    "parallel": dict(positions=["ffn"], non_linearity="relu", original_ln_before=False, parallel=True, scaling=4.0),
}


@dataclass
class AdapterConfig:
    """Settings of one task's bottleneck adapters; unset fields take the preset's value."""

    type: str = field(default="pfeiffer", metadata={"help": "preset: pfeiffer | houlsby | parallel"})
    reduction_factor: float | None = field(default=None, metadata={"help": "bottleneck = hidden_size / reduction_factor (default 16)"})
    bottleneck_size: int | None = field(default=None, metadata={"help": "explicit bottleneck width; overrides reduction_factor"})
    positions: list[str] | None = field(default=None, metadata={"help": "sub-layers that get an adapter: attn, ffn"})
    non_linearity: str | None = field(default=None, metadata={"help": "relu | swish | gelu | tanh"})
    original_ln_before: bool | None = field(default=None, metadata={"help": "adapter input is LN(h + x) instead of h (sequential only)"})
    residual_before_ln: bool = field(default=True, metadata={"help": "adapter residual is h (True) or LN(h + x) (False)"})
    parallel: bool | None = field(default=None, metadata={"help": "adapter reads the sub-layer input x and is added to its output"})
    scaling: float | None = field(default=None, metadata={"help": "factor on the adapter's up-projection output"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter output while training"})
    leave_out: list[int] = field(default_factory=list, metadata={"help": "layer indices (0-based) without an adapter"})
    init: str = field(default="identity", metadata={"help": "identity (zero up-projection) | bert (AdapterHub N(0, 0.02)) | mam"})
    drop_first: int = field(default=0, metadata={"help": "AdapterDrop: no adapter in the first k layers (at evaluation "
                                                         "too); with robust_drop, only the evaluation depth"})
    robust_drop: bool = field(default=False, metadata={"help": "AdapterDrop while training: each batch drops the first n "
                                                               "layers' adapters, n uniform in [0, L-1] (seeded)"})

    def __post_init__(self) -> None:
        if self.type not in PRESETS:
            raise MTLConfigError(f"adapter.type: '{self.type}' is not a preset, expected one of {sorted(PRESETS)}")
        for key, value in PRESETS[self.type].items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        if self.reduction_factor is None and self.bottleneck_size is None:
            self.reduction_factor = 16.0
        self.positions = list(self.positions)
        self.leave_out = sorted(int(i) for i in self.leave_out)
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise MTLConfigError(f"adapter.positions: {self.positions} is invalid, expected a non-empty subset of {list(POSITIONS)}")
        if self.non_linearity not in NON_LINEARITIES:
            raise MTLConfigError(f"adapter.non_linearity: '{self.non_linearity}' is unknown, expected one of {list(NON_LINEARITIES)}")
        if self.init not in INITS:
            raise MTLConfigError(f"adapter.init: '{self.init}' is unknown, expected one of {list(INITS)}")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise MTLConfigError(f"adapter.bottleneck_size: {self.bottleneck_size}, expected a positive integer")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise MTLConfigError(f"adapter.reduction_factor: {self.reduction_factor}, expected a positive number")
        if self.drop_first < 0:
            raise MTLConfigError(f"adapter.drop_first: {self.drop_first}, expected an integer >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise MTLConfigError(f"adapter.dropout: {self.dropout}, expected a value in [0, 1)")

    def bottleneck(self, hidden_size: int) -> int:
        """Bottleneck width for a backbone of this hidden size."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden_size // self.reduction_factor))

    def layers(self, num_layers: int) -> list[int]:
        """Layer indices that carry this adapter (fixed dropping creates none in the first drop_first layers)."""
        bad = [i for i in self.leave_out if not 0 <= i < num_layers]
        if bad:
            raise MTLConfigError(f"adapter.leave_out: {bad} out of range, the backbone has layers 0..{num_layers - 1}")
        if self.drop_first >= num_layers:
            raise MTLConfigError(f"adapter.drop_first: {self.drop_first}, expected at most {num_layers - 1} "
                                 f"(the backbone has {num_layers} layers)")
        dropped = 0 if self.robust_drop else self.drop_first
        layers = [i for i in range(dropped, num_layers) if i not in self.leave_out]
        if not layers:
            raise MTLConfigError(f"adapter.leave_out: {self.leave_out} with drop_first {self.drop_first} leaves none of "
                                 f"the backbone's {num_layers} layers with an adapter, expected at least one")
        return layers

    def trained_with_depth(self, depth: int) -> bool:
        """Whether training saw this many adapter-free first layers (robust dropping sees every depth)."""
        return self.robust_drop or depth <= self.drop_first

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, fully resolved settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Build from a dict (e.g. adapter_config.json), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MTLConfigError(f"{source}: unknown adapter keys {unknown}, expected some of {sorted(known)}")
        return cls(**data)


def as_adapter_config(value: AdapterConfig | str | dict[str, Any]) -> AdapterConfig:
    """Accept a preset name, a dict or an `AdapterConfig`."""
    if isinstance(value, AdapterConfig):
        return value
    if isinstance(value, str):
        return AdapterConfig(type=value)
    return AdapterConfig.from_dict(dict(value))
