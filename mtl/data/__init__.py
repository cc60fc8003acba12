"""Task specs, dataset sources, task sampling and the LightningDataModule.

``TaskSpec`` / ``load_task_spec`` import without Lightning; ``TaskDataModule`` (which needs
Lightning) is imported on first access.
"""

from typing import Any

from mtl.data.spec import SourceSpec, SplitSpec, TaskSpec, load_task_spec

__all__ = ["SourceSpec", "SplitSpec", "TaskDataModule", "TaskSpec", "load_task_spec"]


def __getattr__(name: str) -> Any:
    """Import ``TaskDataModule`` lazily so that reading specs never imports Lightning."""
    if name == "TaskDataModule":
        from mtl.data.module import TaskDataModule

        return TaskDataModule
    raise AttributeError(f"module 'mtl.data' has no attribute {name!r}")
