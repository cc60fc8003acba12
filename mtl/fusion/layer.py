"""`FusionLayer`: AdapterFusion attention over N adapter outputs (AdapterHub `adapters` 1.3 `BertFusion`).

Per token, with q = Q(query), k_n = K(up_n), v_n = V(up_n) (or up_n without V):
p = softmax(dropout(q . k_n) / T) over n, output = sum_n p_n v_n + residual.
With ``residual_before`` the residual is added to every up_n first (keys and values alike, as
AdapterHub's in-place add on the shared key/value tensor does) and not to the output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.fusion.config import FusionConfig


class FusionLayer(nn.Module):
    """AdapterFusion for one sub-layer: attention from the query over the adapters' outputs."""

    def __init__(self, hidden_size: int, config: FusionConfig, dropout_prob: float) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        for linear in (self.query, self.key):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)
        self.value: nn.Linear | None = None
        if config.value:
            self.value = nn.Linear(hidden_size, hidden_size, bias=False)
            with torch.no_grad():
                if config.value_initialized:
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
                else:
                    self.value.weight.normal_(mean=0.0, std=0.02)
        # AdapterHub drops out raw scores (before the softmax), not probabilities
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, query: Tensor, up: Tensor, residual: Tensor, temperature: float = 1.0,
                fast: bool = True) -> tuple[Tensor, Tensor]:
        """Fuse `up` [N, ..., d] with `query` [..., d]; returns (context + residual, probs [..., N])."""
        if self.config.residual_before:
            up = up + residual
        q = self.query(query)
        context, probs = (self._fast if fast else self._naive)(q, up, temperature)
        if not self.config.residual_before:
            context = context + residual
        return context, probs

    def _naive(self, q: Tensor, up: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Reference: project every adapter's output with K and V, as AdapterHub does."""
        apply_v_first = self.value is not None and self.config.value_before_softmax
        scores, values = [], []
        for u in up:
            scores.append((q * self.key(u)).sum(-1))
            values.append(self.value(u) if apply_v_first else u)
        probs = self._probs(torch.stack(scores, dim=-1), temperature)
        context = (probs.movedim(-1, 0).unsqueeze(-1) * torch.stack(values)).sum(0)
        if self.value is not None and not apply_v_first:
            context = self.value(context)
        return context, probs

    def _fast(self, q: Tensor, up: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Exact rewrite: q . (W u + b) = (W^T q) . u + q . b, and V (sum p_n u_n) = sum p_n V u_n."""
        qk = q @ self.key.weight
        scores = torch.einsum("...d,n...d->...n", qk, up)
        if self.training and self.dropout.p > 0:
            # q . b shifts every score of a token equally, so the softmax ignores it, but dropout does not
            scores = scores + (q @ self.key.bias).unsqueeze(-1)
        probs = self._probs(scores, temperature)
        context = torch.einsum("...n,n...d->...d", probs, up)
        if self.value is not None:
            context = self.value(context)
        return context, probs

    def forward_factored(self, query: Tensor, acts: Tensor, up_weight: Tensor, up_bias: Tensor, residual: Tensor,
                         temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """The fast path with each adapter's output left factored as u_n = W_n a_n + b_n (scaling folded in).

        ``acts`` [..., N, r] are the adapters' bottleneck activations, ``up_weight`` [N, d, r] and ``up_bias`` [N, d]
        their (scaled) up-projections. Exact: (Kᵀq)·u_n = (W_nᵀKᵀq)·a_n + (Kᵀq)·b_n and Σ p_n u_n = Σ W_n (p_n a_n) +
        Σ p_n b_n, so the N outputs of width d are never built: on CPUs that memory traffic, not arithmetic,
        dominated fusion over many adapters. Not for ``residual_before`` (it adds the residual to every u_n).
        """
        q = self.query(query)
        qk = q @ self.key.weight
        scores = torch.einsum("...d,ndr,...nr->...n", qk, up_weight, acts) + qk @ up_bias.T
        if self.training and self.dropout.p > 0:
            scores = scores + (q @ self.key.bias).unsqueeze(-1)  # see _fast
        probs = self._probs(scores, temperature)
        context = torch.einsum("...n,...nr,ndr->...d", probs, acts, up_weight) + probs @ up_bias
        if self.value is not None:
            context = self.value(context)
        return context + residual, probs

    def _probs(self, scores: Tensor, temperature: float) -> Tensor:
        """Dropout on the scores, then the softmax over adapters at this temperature."""
        return torch.softmax(self.dropout(scores) / temperature, dim=-1)

    def value_regularization(self) -> Tensor:
        """||I - V||_F^2 (sum of squares); zero without a value projection. The caller weights it."""
        if self.value is None:
            return torch.zeros((), device=self.query.weight.device, dtype=self.query.weight.dtype)
        weight = self.value.weight
        eye = torch.eye(self.hidden_size, device=weight.device, dtype=weight.dtype)
        return (eye - weight).pow(2).sum()
