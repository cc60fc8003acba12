"""The continual command's parse errors for keys the runner sets itself: one line naming the key to set instead."""

from __future__ import annotations

import pytest

from mtl.continual.cli import continual_main
from mtl.errors import MTLConfigError

RUNNER = "set by the continual runner for each stage, not in a continual config"


@pytest.mark.parametrize("key, value, instead", [
    ("data.tasks_dir", "tasks", "; set continual.tasks_dir instead"),
    ("model.tasks_dir", "tasks", "; set continual.tasks_dir instead"),
    ("model.run_dir", "runs/x", "; set continual.run_dir instead"),
    ("data.backbone", "minilm-l6", "; set model.backbone instead (the data is tokenized for the model's backbone)"),
    ("model.fusion", "{type: dynamic}", "; set continual.fusion instead (with continual.strategy fusion)"),
    ("model.adapter_sharing", "shared", "; continual.strategy decides it (shared: one adapter for every task)"),
    ("data.tasks", "[a, b]", " (the tasks come from continual.order)"),
    ("model.load_from", "runs/x", " (the tasks come from continual.order)"),  # the runner's own: nothing to set
])
def test_a_runner_key_names_what_to_set_instead(tmp_path, key, value, instead):
    with pytest.raises(MTLConfigError) as caught:
        continual_main([f"--{key}", value])
    assert str(caught.value) == f"--{key}: {RUNNER}{instead}"
    section, name = key.split(".")
    config = tmp_path / "continual.yaml"
    config.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(MTLConfigError) as caught:
        continual_main(["--config", str(config)])
    assert str(caught.value) == f"{config}: {key}: {RUNNER}{instead}"
