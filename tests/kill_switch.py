"""A callback that kills its own process (SIGKILL) at a chosen point of a continual run: tests resume for real.

It is named in the test configs always, and armed only by $MTL_TEST_KILL_AT=``<stage folder>:<train|test>:<batch>``,
so the killed run and its resumed rerun have the same configuration.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillSwitch(Callback):
    """SIGKILL this process after the given training or test batch of the given stage."""

    def _maybe_kill(self, trainer, kind: str, batch_idx: int) -> None:
        at = os.environ.get("MTL_TEST_KILL_AT")
        if not at:
            return
        stage, when, batch = at.split(":")
        if Path(trainer.default_root_dir).name == stage and when == kind and int(batch) == batch_idx:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_kill(trainer, "train", batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe_kill(trainer, "test", batch_idx)
