"""Frozen-prefix cache: each example's hidden states after the first k frozen layers, computed once.

With no adapter in layers 1..k and those layers run in eval mode (no dropout), their output for an
example is the same every epoch, so later epochs can start at layer k+1. Rows are stored unpadded
(``[length, hidden]``) and re-padded with zeros per batch: padded positions are masked out as keys and
excluded from pooling, so they never change a real token's output.

Storage: in memory up to ``memory_mb``; beyond that, rows are appended to a file in ``directory``. A split
whose every row is on disk is renamed to its final name (atomic) and memory-mapped, so a later run with the
same key (backbone weights, k, tokenizer, dataset fingerprint, dtype) reuses it instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.arch import layer_list
from mtl.atomic import write_json_atomic
from mtl.errors import MTLConfigError

if TYPE_CHECKING:
    from mtl.model import MTLModel

Part = tuple[str, str]  # (task, split)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_key(*parts: object) -> str:
    """A short hash of everything the cached states depend on."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class _DiskPart:
    """One split's rows in a flat file: appended while being filled, memory-mapped once complete."""

    def __init__(self, directory: Path, name: str, hidden: int, dtype: torch.dtype) -> None:
        self.final, self.index_file = directory / f"{name}.bin", directory / f"{name}.json"
        self.tmp = directory / f".{name}.{os.getpid()}.tmp"
        self.hidden, self.dtype = hidden, dtype
        self.offsets: dict[int, tuple[int, int]] = {}  # row -> (first token, length)
        self.tokens = 0
        self.mapped: torch.Tensor | None = None
        if self.final.is_file() and self.index_file.is_file():
            self.offsets = {int(k): tuple(v) for k, v in json.loads(self.index_file.read_text()).items()}
            self.tokens = sum(n for _, n in self.offsets.values())
            self._map()

    def _map(self) -> None:
        flat = torch.from_file(str(self.final), shared=False, size=self.tokens * self.hidden, dtype=self.dtype)
        self.mapped = flat.view(self.tokens, self.hidden)

    def get(self, row: int) -> torch.Tensor | None:
        if self.mapped is None or row not in self.offsets:
            return None
        start, length = self.offsets[row]
        return self.mapped[start:start + length]

    def append(self, row: int, states: torch.Tensor) -> None:
        with open(self.tmp, "ab") as f:
            f.write(states.contiguous().view(torch.uint8).numpy().tobytes())
        self.offsets[row] = (self.tokens, states.shape[0])
        self.tokens += states.shape[0]

    def finish(self) -> None:
        """All rows written: fsync, rename into place, write the index, memory-map."""
        with open(self.tmp, "ab") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        write_json_atomic(self.index_file, {str(k): list(v) for k, v in self.offsets.items()})
        self._map()


class PrefixCache:
    """Hidden states after layer ``k`` per (task, split, row), filled on first use."""

    def __init__(self, k: int, key: str, sizes: dict[Part, int], hidden_size: int, dtype: str = "float32",
                 memory_mb: float = 2048, directory: str | Path | None = None) -> None:
        self.k, self.key, self.sizes, self.hidden_size = k, key, sizes, hidden_size
        self.dtype = DTYPES[dtype]
        self.limit = int(memory_mb * 2**20)
        self.directory = Path(directory) if directory is not None else None
        self.memory: dict[Part, dict[int, torch.Tensor]] = {}
        self.disk: dict[Part, _DiskPart] = {}
        self.used = 0
        self.hits = self.misses = 0

    def _disk(self, part: Part) -> _DiskPart | None:
        if self.directory is None:
            return None
        if part not in self.disk:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"prefix-{self.key}-{part[0]}-{part[1]}"
            self.disk[part] = _DiskPart(self.directory, name, self.hidden_size, self.dtype)
        return self.disk[part]

    def _get(self, part: Part, row: int) -> torch.Tensor | None:
        found = self.memory.get(part, {}).get(row)
        if found is None:
            disk = self._disk(part)
            found = disk.get(row) if disk is not None else None
        return found

    def _put(self, part: Part, row: int, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        disk = self._disk(part)
        if self.used + size > self.limit and disk is not None and disk.mapped is None:
            disk.append(row, states)
        else:
            self.memory.setdefault(part, {})[row] = states
            self.used += size
        if disk is not None and disk.offsets and disk.mapped is None:
            if len(disk.offsets) + len(self.memory.get(part, {})) >= self.sizes.get(part, -1):
                disk.finish()

    def fetch(self, part: Part, rows: list[int], attention_mask: torch.Tensor,
              compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Padded ``[batch, seq, hidden]`` states after layer k; ``compute(selected_rows)`` fills the missing ones.

        Batches must be right-padded (as the BERT-family tokenizers pad).
        """
        found = [self._get(part, row) for row in rows]
        missing = [i for i, states in enumerate(found) if states is None]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            select = torch.tensor(missing, device=attention_mask.device)
            fresh = compute(select)
            lengths = attention_mask.index_select(0, select).sum(1).tolist()
            for i, states, length in zip(missing, fresh, lengths):
                stored = states[:length].detach().to("cpu", self.dtype).contiguous()
                self._put(part, rows[i], stored)
                found[i] = stored
        out = torch.zeros(len(rows), attention_mask.shape[1], self.hidden_size)
        for i, states in enumerate(found):
            out[i, :states.shape[0]] = states.to(torch.float32)
        return out.to(attention_mask.device)

    def forward(self, model: MTLModel, part: Part, batch: dict[str, Any], task: str) -> torch.Tensor:
        """The cache-aware forward: ``task``'s logits for a batch with row ``index``, layers 1..k read from the cache."""
        ids, mask, types = batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")

        def compute(rows: torch.Tensor) -> torch.Tensor:
            pick = lambda t: t.index_select(0, rows) if t is not None else None  # noqa: E731
            return model.prefix_states(pick(ids), pick(mask), pick(types), self.k)

        if mask is None:
            mask = torch.ones_like(ids)
        prefix = self.fetch(part, batch["index"].tolist(), mask, compute)
        return model(ids, mask, types, tasks=task, prefix=prefix, prefix_layers=self.k)[task]

    @staticmethod
    def cached_depth(model: MTLModel) -> int:
        """How many first layers the cache may hold for the model's trainable tasks; refuses where it is not exact."""
        trainable = model.trainable_tasks()
        targets = [model.records[t].target for t in trainable]
        # a fusion's layers sit where its fused adapters are, so their settings decide for it as well
        names = {name for target in targets for name in (target.fused if target.is_fusion else (target.name,))}
        configs = [model.adapter_configs[name] for name in names]
        if any(c.robust_drop for c in configs):
            raise MTLConfigError("model.cache_frozen_prefix: not exact with adapter.robust_drop (the prefix changes "
                                 "per batch); use a fixed adapter.drop_first")
        if model.backbone_dropout:
            raise MTLConfigError("model.cache_frozen_prefix: not exact with model.backbone_dropout: true "
                                 "(cached layers must be deterministic)")
        k = model.first_adapter_layer(targets, model.drop_depths(trainable, None)) if targets else 0
        if k < 1:
            raise MTLConfigError("model.cache_frozen_prefix: needs adapter.drop_first >= 1 (no adapter in the "
                                 "layers to cache)")
        below = [f"{name} (layer {i})" for i, layer in enumerate(layer_list(model.backbone)[:k])
                 for name, p in layer.named_parameters() if p.requires_grad]
        if below:
            raise MTLConfigError(f"model.cache_frozen_prefix: trainable parameter {below[0]} lies in the first {k} "
                                 f"layers")
        return k

    @classmethod
    def for_training(cls, model: MTLModel, datasets: dict[Part, Any], tokenizer_size: int, dtype: str = "float32",
                     memory_mb: float = 2048, directory: str | Path | None = None) -> PrefixCache:
        """Check that caching is exact for the model's trainable tasks (`cached_depth`), then key the cache by
        everything the states depend on (backbone weights, depth, tokenizer, each dataset's fingerprint, dtype)."""
        k = cls.cached_depth(model)
        fingerprints = [(task, split, getattr(data, "_fingerprint", None)) for (task, split), data in datasets.items()]
        key = cache_key(model.backbone_digest(), k, model.backbone_name, tokenizer_size, fingerprints, dtype)
        print(f"frozen-prefix cache: layers 1..{k} computed once per example (eval mode), key {key}")
        sizes = {part: len(data) for part, data in datasets.items()}
        return cls(k, key, sizes, model.hidden_size, dtype, memory_mb, directory)
