"""The bottleneck adapter: pure PyTorch, no Hugging Face, no Lightning."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtl.adapters.config import AdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """down -> non-linearity -> up, placed on one sub-layer as `AdapterConfig` says.

    ``forward(h, x, layer_norm)`` returns ``a`` such that the sub-layer's output becomes
    ``layer_norm(a + x)``: h is the sub-layer's (dense + dropout) output, x its input.
    """

    def __init__(self, hidden_size: int, config: AdapterConfig) -> None:
        super().__init__()
        width = config.bottleneck(hidden_size)
        self.down = nn.Linear(hidden_size, width)
        self.act = _ACTIVATIONS[config.non_linearity]()
        self.up = nn.Linear(width, hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = float(config.scaling)
        self.parallel = bool(config.parallel)
        self.original_ln_before = bool(config.original_ln_before)
        self.residual_before_ln = bool(config.residual_before_ln)
        self.reset_parameters(config.init)

    def reset_parameters(self, init: str = "identity") -> None:
        """Initialise; every scheme but ``bert`` zeroes the up-projection (identity at start)."""
        with torch.no_grad():
            if init == "mam":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            else:
                self.down.weight.normal_(0.0, 0.02)
            self.down.bias.zero_()
            if init == "bert":
                self.up.weight.normal_(0.0, 0.02)
            else:
                self.up.weight.zero_()
            self.up.bias.zero_()

    def inputs(self, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, residual)``: what the bottleneck reads and what its output is added to."""
        if self.parallel:
            return x, h
        z = layer_norm(h + x) if self.original_ln_before else h
        return z, (h if self.residual_before_ln else z)

    def up_output(self, z: torch.Tensor) -> torch.Tensor:
        """scaling * up(act(down(z))), before dropout: what a fusion layer mixes."""
        return self.up(self.act(self.down(z))) * self.scaling

    def forward(self, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """Return ``a``; the caller applies ``layer_norm(a + x)``."""
        z, residual = self.inputs(h, x, layer_norm)
        return self.dropout(self.up_output(z)) + residual


def factored_outputs(adapters: list[BottleneckAdapter], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Several adapters' outputs on the same input, left factored as u_n = W_n a_n + b_n (scaling folded into W, b).

    Returns (activations [..., N, r], W [N, d, r], b [N, d]), computing every down-projection in one matmul; None
    when the adapters differ in width or non-linearity (then call `up_output` per adapter).
    """
    widths = {a.down.out_features for a in adapters}
    if len(widths) > 1 or len({type(a.act) for a in adapters}) > 1:
        return None
    down = nn.functional.linear(z, torch.cat([a.down.weight for a in adapters]), torch.cat([a.down.bias for a in adapters]))
    acts = adapters[0].act(down).unflatten(-1, (len(adapters), widths.pop()))
    weight = torch.stack([a.up.weight * a.scaling for a in adapters])
    bias = torch.stack([a.up.bias * a.scaling for a in adapters])
    return acts, weight, bias


def grouped_outputs(adapters: list[BottleneckAdapter], counts: list[int], z: torch.Tensor) -> torch.Tensor | None:
    """``up_output`` of ``adapters[i]`` on its ``counts[i]`` consecutive rows of ``z`` [rows, seq, d], for all rows in
    two batched matmuls instead of a loop of small ones per adapter. None when the adapters differ in width or
    non-linearity."""
    widths = {a.down.out_features for a in adapters}
    if len(widths) > 1 or len({type(a.act) for a in adapters}) > 1:
        return None
    down_w = torch.stack([a.down.weight for a in adapters]).transpose(1, 2)  # [adapters, d, r]
    down_b = torch.stack([a.down.bias for a in adapters]).unsqueeze(1)
    up_w = torch.stack([a.up.weight if a.scaling == 1.0 else a.up.weight * a.scaling for a in adapters]).transpose(1, 2)
    up_b = torch.stack([a.up.bias if a.scaling == 1.0 else a.up.bias * a.scaling for a in adapters]).unsqueeze(1)
    rows, seq, width = z.shape
    if len(set(counts)) == 1:  # equal groups: each adapter's rows side by side, no per-row copy of the weights
        z = z.reshape(len(adapters), counts[0] * seq, width)
        act = adapters[0].act(torch.baddbmm(down_b, z, down_w))
        return torch.baddbmm(up_b, act, up_w).reshape(rows, seq, -1)
    index = torch.repeat_interleave(torch.arange(len(adapters), device=z.device),
                                    torch.tensor(counts, device=z.device))
    act = adapters[0].act(torch.baddbmm(down_b[index], z, down_w[index]))
    return torch.baddbmm(up_b[index], act, up_w[index])
