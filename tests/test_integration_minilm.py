"""Integration: the real pretrained MiniLM-L6 and real offline data (about a minute in all)."""

from __future__ import annotations


import lightning as L
import pytest
import torch

from mtl.backbone import load_backbone, load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.lit import AdapterTrainer
from mtl.adapters.inject import Target
from mtl.model import MTLModel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm-l6")


def test_minilm_is_frozen_and_fresh_adapters_are_the_identity(minilm):
    assert all(not p.requires_grad for p in minilm.parameters())
    tok = load_tokenizer("minilm-l6")
    batch = tok(["Shares rose sharply after the results.", "The striker scored twice."], padding=True,
                return_tensors="pt")
    expected = minilm(**batch).last_hidden_state
    model = MTLModel(minilm)
    for preset in ("pfeiffer", "houlsby", "parallel"):
        model.add_task(preset, 5, preset)
        got = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           [(Target(preset), slice(None))])
        assert torch.equal(got, expected)
    adapter = sum(p.numel() for k, p in model.task_parameters("pfeiffer").items() if k.startswith("adapters."))
    assert adapter == 6 * (384 * 24 + 24 + 24 * 384 + 384)


def test_short_fit_on_bbc_news_learns_and_leaves_the_backbone_unchanged(tmp_path):
    torch.manual_seed(0)
    module = AdapterTrainer(["bbc_news"], run_dir=str(tmp_path / "run"))
    data = TaskDataModule(["bbc_news"], batch_size=16, cache_dir=str(tmp_path / "cache"))
    before = module.model.backbone_digest()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=25, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert module.model.backbone_digest() == before
    # 5 balanced-ish classes: majority is about 0.24; 400 examples of training should clear it by far
    assert trainer.callback_metrics["val/bbc_news/acc"] > 0.6
    assert (tmp_path / "run" / "adapters" / "bbc_news" / "adapter.safetensors").is_file()
