"""A store written the way fit writes one (tasks, a fusion, a prototype router) on the tiny backbone, and the answers
`MTLModel.forward` gives each text alone: what the serving tests compare the server with."""

from __future__ import annotations

from pathlib import Path

import torch

from mtl import model_files
from mtl.backbone import load_tokenizer
from mtl.model import MTLModel
from mtl.routing import PrototypeRouter

LABELS = ["red", "green", "blue"]
TASKS = ["t0", "t1", "t2", "t3"]
FUSION = "f01"
TEXTS = ["alpha river stone", "green cloud seven", "a much longer text about tables and rivers and stones " * 3,
         "beta", "delta gamma table", "seven seven seven"]


def noisy(model: MTLModel, task: str, seed: int) -> None:
    """Random non-zero adapter, fusion and head weights, so every task answers differently."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.task_parameters(task).values():
            p.add_(torch.randn_like(p) * 0.5)


def write_store(root: Path, backbone: Path) -> Path:
    """``root/adapters/t0..t3`` (t3: houlsby), ``root/fusions/f01`` over t0 and t1, ``root/router`` (prototype)."""
    model = MTLModel(str(backbone))
    for i, task in enumerate(TASKS):
        model.add_task(task, len(LABELS), "houlsby" if task == "t3" else "pfeiffer", labels=LABELS,
                       spec={"max_length": 8 if task == "t2" else 32})
        noisy(model, task, i)
        model_files.save_task(model, task, root / "adapters")
    model.add_fusion(FUSION, ["t0", "t1"], len(LABELS), labels=LABELS)
    noisy(model, FUSION, 10)
    model_files.save_fusion(model, FUSION, root)
    router, tokenizer = PrototypeRouter(), load_tokenizer(str(backbone))
    for i, task in enumerate(TASKS):
        batch = tokenizer([f"{task} {w} {i}" for w in TEXTS], padding=True, return_tensors="pt")
        router.add_batch(model, task, batch["input_ids"], batch["attention_mask"])
    router.save(root / "router")
    return root


def expected(model: MTLModel, tokenizer, text: str, task: str, max_length: int) -> torch.Tensor:
    """Softmax scores of ``text`` alone through ``task`` (truncated as the task was trained)."""
    batch = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch, tasks=task)[task][0], dim=-1)


def retrain(root: Path, backbone: Path, task: str, seed: int) -> None:
    """Export ``task`` again with other weights, atomically over the old folder (what a new fit does)."""
    model = store_model(root, backbone)
    noisy(model, task, seed)
    model_files.save_task(model, task, root / "adapters", overwrite=True)


def store_model(root: Path, backbone: Path) -> MTLModel:
    """The store as one model (every part loaded), for the expected answers."""
    return MTLModel.from_pretrained(root, backbone=str(backbone)).eval()
