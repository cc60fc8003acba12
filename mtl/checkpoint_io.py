"""Lightning checkpoints written atomically, and the one rule for which checkpoint still holds a run's weights.

Lightning's own writer copies a temporary file from the system's temp folder over the target: on a full disk that
copy stops part-way and truncates the previous best checkpoint, and the error names the temp folder. Here the bytes
go to a temporary file beside the target, are synced, then renamed over it (`mtl.atomic`), so a failed write
leaves the previous checkpoint whole and the error names the checkpoint's own folder.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mtl import storage
from mtl.atomic import write_bytes_atomic
from mtl.errors import MTLConfigError, write_failure


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose save is a temp file in the target's folder, fsync, then rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` in one rename (a local path; the previous file stays whole on failure)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failure(path.parent, err) from None
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getvalue())


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """``trainer.plugins`` plus `AtomicCheckpointIO`, unless the user chose a checkpoint writer of their own."""
    given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in given):
        return given
    return [*given, AtomicCheckpointIO()]


def loadable_checkpoint(candidates: Iterable[str | Path]) -> Path | None:
    """The first of ``candidates`` that is a whole mtl checkpoint (it loads and holds mtl's record), or None: a
    message that names a checkpoint as holding the weights names one it has read."""
    for candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        try:
            storage.read_checkpoint(candidate)
        except (MTLConfigError, OSError):
            continue
        return Path(candidate)
    return None
