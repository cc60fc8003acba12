"""What a trained fusion attends to: mean softmax weight per location and adapter over real tokens."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.atomic import write_bytes_atomic, write_json_atomic
from mtl.figures import png_bytes, pyplot

if TYPE_CHECKING:
    from mtl.adapters.inject import AdapterSlot
    from mtl.model import MTLModel


class AttentionReport:
    """Accumulates one fusion's attention weights (an `Observer` for `MTLModel.forward`)."""

    def __init__(self, fusion: str, adapters: list[str]) -> None:
        self.fusion, self.adapters = fusion, list(adapters)
        self.sums: dict[str, torch.Tensor] = {}  # "layer.position" -> summed weights per adapter
        self.tokens: dict[str, float] = {}
        self.mask: torch.Tensor | None = None  # the current batch's attention mask, set by the caller

    def __call__(self, slot: AdapterSlot, fusion: str, weights: torch.Tensor) -> None:
        if fusion != self.fusion:
            return
        key = f"{slot.layer_index}.{slot.position}"
        w = weights.detach().float().reshape(-1, weights.shape[-1])
        if self.mask is not None and self.mask.numel() == w.shape[0]:
            keep = self.mask.reshape(-1).bool().to(w.device)
            w = w[keep]
        self.sums[key] = self.sums.get(key, 0) + w.sum(0).cpu()
        self.tokens[key] = self.tokens.get(key, 0.0) + w.shape[0]

    def means(self) -> dict[str, list[float]]:
        """Mean weight per adapter at each location, in layer order."""
        order = sorted(self.sums, key=lambda k: (int(k.split(".")[0]), k.split(".")[1]))
        return {k: (self.sums[k] / max(self.tokens[k], 1.0)).tolist() for k in order}

    def overall(self) -> dict[str, float]:
        """Mean weight per adapter over every location."""
        rows = list(self.means().values())
        return {a: sum(r[i] for r in rows) / max(len(rows), 1) for i, a in enumerate(self.adapters)}

    def top(self, m: int) -> list[str]:
        """The ``m`` adapters with the highest mean weight, in their fusion order (pruning keeps these)."""
        overall = self.overall()
        keep = set(sorted(overall, key=overall.get, reverse=True)[:m])
        return [a for a in self.adapters if a in keep]

    def table(self) -> str:
        """A plain-text table: one row per location, one column per adapter."""
        width = max(8, *(len(a) for a in self.adapters))
        lines = [f"fusion '{self.fusion}': mean attention per layer and adapter (validation, real tokens)",
                 "location  " + "  ".join(a.rjust(width) for a in self.adapters)]
        for key, row in self.means().items():
            lines.append(f"{key:<8}  " + "  ".join(f"{v:>{width}.3f}" for v in row))
        lines.append("mean      " + "  ".join(f"{v:>{width}.3f}" for v in self.overall().values()))
        return "\n".join(lines)

    def save_json(self, path: str | Path) -> None:
        """The means as JSON (atomic)."""
        write_json_atomic(path, {"fusion": self.fusion, "adapters": self.adapters, "means": self.means(),
                                 "overall": self.overall()})

    def save_heatmap(self, path: str | Path) -> None:
        """A heatmap PNG (locations x adapters), written atomically."""
        plt = pyplot()

        means = self.means()
        data = [means[k] for k in means]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(self.adapters), 0.9 + 0.35 * len(data)))
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(self.adapters)), self.adapters, rotation=30, ha="right")
        ax.set_yticks(range(len(data)), [f"layer {k}" for k in means])
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_title(f"fusion '{self.fusion}': mean attention")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        write_bytes_atomic(path, png_bytes(fig))


@torch.no_grad()
def attention_report(model: MTLModel, fusion: str, batches: Iterable[dict[str, Any]],
                     device: torch.device | str = "cpu") -> AttentionReport:
    """Run ``fusion`` over the batches in eval mode and collect its attention."""
    report = AttentionReport(fusion, list(model.target(fusion).fused))
    with model.eval_mode():
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            types = batch.get("token_type_ids")
            report.mask = mask
            model(ids, mask, types.to(device) if types is not None else None, tasks=fusion, observe=report)
    return report
