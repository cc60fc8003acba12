"""Extractive QA in a continual sequence on a tiny backbone (adding a QA task, the prefix cache and fusion run in
tests/test_tagging_workflows.py, for every windowed kind)."""

from __future__ import annotations

from tests.test_tagging_workflows import _files


def test_a_qa_task_in_a_continual_sequence_scores_its_f1_in_r_and_keeps_its_adapter(tiny_dir, task_dir, tmp_path):
    import contextlib
    import io
    import json

    from mtl.cli import main

    (tmp_path / "c.yaml").write_text(f"""
seed_everything: 0
continual: {{order: [qa, keyword], strategy: per_task, run_dir: {tmp_path / 'run'}, tasks_dir: {task_dir}, routers: []}}
model: {{backbone: {tiny_dir}, lr: 1.0e-2}}
data: {{batch_size: 16, cache_dir: {tmp_path / 'cache'}}}
trainer: {{max_epochs: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}}
""")
    with contextlib.redirect_stdout(io.StringIO()):
        main(["continual", "--config", str(tmp_path / "c.yaml")])
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["task_metrics"]["qa"] == {"problem": "extractive_qa", "headline": "f1",
                                         "names": {"score": "SQuAD F1", "f1": "SQuAD F1"}}
    scores = out["scores"]
    after = scores["score"]["after"]
    assert after[0][0] == scores["f1"]["after"][0][0] and scores["acc"]["after"][0][0] is None  # QA has no acc
    assert after[1][0] == after[0][0]  # per_task: training keyword left the QA adapter as it was
    steps = tmp_path / "run" / "steps"
    assert _files(steps / "01-qa" / "adapters" / "qa") == _files(steps / "02-keyword" / "adapters" / "qa")
    assert "| stage | qa (SQuAD F1) | keyword (accuracy) |" in (tmp_path / "run" / "results.md").read_text()
