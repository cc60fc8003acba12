"""One call for a whole setup: `Deployment.save` / `Deployment.load` keep every task, fusion and the router (which
travels beside the model), and a reloaded setup gives exactly the validation metrics it had (a fusion setup included);
`MTLModel.save_pretrained` / `from_pretrained` do the same for the model alone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mtl.data.module import TaskDataModule
from mtl.deployment import Deployment
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.model import MTLModel
from mtl.routing import PrototypeRouter

FUSION = "keyword_fusion"


def _trainer() -> L.Trainer:
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def _data(tiny_dir, task_dir, tmp_path, tasks=(), eval_tasks=()) -> TaskDataModule:
    return TaskDataModule(list(tasks), eval_tasks=list(eval_tasks), backbone=str(tiny_dir), tasks_dir=str(task_dir),
                          batch_size=16, cache_dir=str(tmp_path / "data-cache"))


@pytest.fixture(scope="module")
def setup(tiny_dir, task_dir, tmp_path_factory):
    """A run folder with two trained tasks and a fusion over both for keyword, plus a prototype router."""
    root = tmp_path_factory.mktemp("pretrained")
    run = root / "run"
    for task in ("keyword", "colour"):
        L.seed_everything(0)
        module = AdapterTrainer([task], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), lr=5e-3)
        _trainer().fit(module, datamodule=_data(tiny_dir, task_dir, root, [task]))
    module = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), lr=5e-3,
                            load_from=str(run), fusion={"name": FUSION, "adapters": ["colour", "keyword"]})
    _trainer().fit(module, datamodule=_data(tiny_dir, task_dir, root, ["keyword"]))
    model = MTLModel.from_pretrained(run)
    router = PrototypeRouter()
    data = _data(tiny_dir, task_dir, root, ["keyword", "colour"])
    data.setup("fit")
    for batch in data.train_dataloader():
        router.add_batch(model, batch["task"], batch["input_ids"], batch["attention_mask"])
    return root, run, Deployment(model, router, run)


def _validate(tiny_dir, task_dir, tmp_path, folder) -> dict[str, float]:
    module = AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "unused"),
                            load_from=str(folder), eval_tasks=["keyword", "colour"], eval_routes={"keyword": FUSION})
    trainer = _trainer()
    trainer.validate(module, datamodule=_data(tiny_dir, task_dir, tmp_path, eval_tasks=["keyword", "colour"]),
                     verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_reloaded_setup_gives_exactly_the_same_validation_metrics(setup, tiny_dir, task_dir, tmp_path):
    root, run, deployment = setup
    saved = deployment.save(tmp_path / "whole")
    assert sorted(p.name for p in saved.iterdir()) == ["adapters", "fusions", "router"]
    before, after = _validate(tiny_dir, task_dir, tmp_path, run), _validate(tiny_dir, task_dir, tmp_path, saved)
    assert f"val/{FUSION}/acc" in before and "val/colour/acc" in before  # keyword is scored through its fusion
    assert after == before  # every metric, exactly: the fusion setup loses nothing on reload


def test_from_pretrained_brings_back_every_part_and_the_router(setup, tmp_path):
    _, _, deployment = setup
    model = deployment.model
    loaded = Deployment.load(deployment.save(tmp_path / "whole"))
    reloaded = loaded.model
    assert loaded.source == tmp_path / "whole"
    assert reloaded.tasks == model.tasks and reloaded.target(FUSION).fused == ("colour", "keyword")
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(1000, 2000, (5, 12))
    model.eval(), reloaded.eval()
    assert loaded.router.predict(reloaded, ids) == deployment.router.predict(model, ids)
    logits, again = model(ids, tasks=model.tasks), reloaded(ids, tasks=model.tasks)
    assert all(torch.equal(logits[t], again[t]) for t in model.tasks)


def test_save_pretrained_never_replaces_a_folder_silently(setup, tmp_path):
    _, _, deployment = setup
    folder = deployment.save(tmp_path / "whole")
    marker = folder / "adapters" / "keyword" / "adapter.safetensors"
    before = marker.read_bytes()
    with pytest.raises(MTLConfigError, match="already exists"):
        deployment.save(folder)
    assert marker.read_bytes() == before
    deployment.save(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["adapters", "fusions", "router"]


def test_the_model_alone_saves_without_a_router_and_a_router_must_fit_the_model(setup, tmp_path):
    _, _, deployment = setup
    folder = deployment.model.save_pretrained(tmp_path / "model-only")
    assert sorted(p.name for p in folder.iterdir()) == ["adapters", "fusions"]
    assert Deployment.load(folder).router is None
    smaller = MTLModel.from_pretrained(folder)
    smaller.remove_task("colour")
    with pytest.raises(MTLConfigError, match=r"router: routes to \['colour'\], which the model does not have"):
        Deployment(smaller, deployment.router).save(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
