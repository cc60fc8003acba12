"""Routing without a task id: entropy and prototype routers, their files, and the routing report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from mtl.adapters.config import AdapterConfig
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.routing import (EntropyRouter, PrototypeRouter, feature_depth, load_router, normalized_entropy,
                         routing_report, save_confusion_png)
from tests.conftest import tiny_backbone

# each task's texts draw from its own few token ids, so frozen features tell the tasks apart
VOCAB = {"a": list(range(5, 10)), "b": list(range(100, 105)), "c": list(range(200, 205))}
LABELS = {"a": 2, "b": 3, "c": 4}


def _model(adapter: AdapterConfig | str = AdapterConfig(drop_first=1), tasks=("a", "b", "c")) -> MTLModel:
    model = MTLModel(tiny_backbone("bert"))
    for i, task in enumerate(tasks):
        model.add_task(task, LABELS[task], adapter)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # identity adapters would make every task's hidden states the same
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _rows(task: str, rows: int, seed: int, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(VOCAB[task])
    ids = vocab[torch.randint(0, len(vocab), (rows, length), generator=g)]
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, length - r % 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def _fit(router: PrototypeRouter, model: MTLModel, tasks=("a", "b", "c")) -> PrototypeRouter:
    for i, task in enumerate(tasks):
        for chunk in range(2):
            router.add_batch(model, task, **_rows(task, 6, seed=100 * i + chunk))
    return router


def _mixed(seed: int = 7) -> tuple[dict[str, torch.Tensor], list[str]]:
    parts = [_rows(t, 3, seed + i) for i, t in enumerate(("c", "a", "b"))]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])  # interleave the tasks so routed rows must be regrouped
    return {k: v[order] for k, v in batch.items()}, [["c", "a", "b"][i // 3] for i in order.tolist()]


def _one_line(info: pytest.ExceptionInfo, *words: str) -> None:
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# ---- entropy ------------------------------------------------------------------------------------
def test_normalized_entropy_by_hand_and_the_most_confident_head_wins():
    assert normalized_entropy(torch.tensor([[0.0, 0.0]])).item() == 1.0  # uniform over 2 labels: exactly 1
    p = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    expected = 1.5 * math.log(2) / math.log(3)  # H = 2 * 0.25 ln 4 + 0.5 ln 2
    assert normalized_entropy(p.log()[None]).item() == pytest.approx(expected, abs=1e-12)
    q = 1 / (1 + math.exp(3))
    two_confident = -(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2)
    assert normalized_entropy(torch.tensor([[0.0, 3.0]])).item() == pytest.approx(two_confident, abs=1e-12)
    assert normalized_entropy(torch.tensor([[0.0, 1000.0, 0.0]])).item() == 0.0  # no nan from 0 * log 0
    logits = {"two": torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]),
              "three": torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]])}
    # row 0: 1.0 vs confident; row 1: 0.27 vs ~1; row 2: 1.0 vs 0.946 (the 3-label head is less uncertain)
    assert EntropyRouter.choose(logits) == ["three", "two", "three"]
    assert EntropyRouter.choose({"x": torch.zeros(1, 2), "y": torch.zeros(1, 2)}) == ["x"]  # ties: first task


def test_entropy_router_predicts_from_one_forward_like_each_task_alone():
    model = _model(tasks=("a", "b", "c"))
    model.add_task("r", 1, problem="regression")
    batch, _ = _mixed()
    router = EntropyRouter()
    chosen, logits = router.routed_logits(model, **batch)
    alone = {t: model(**batch, tasks=t)[t] for t in ("a", "b", "c")}  # "r" (regression) is never a candidate
    scores = torch.stack([normalized_entropy(alone[t]) for t in ("a", "b", "c")], dim=1)
    assert chosen == [["a", "b", "c"][i] for i in scores.argmin(1).tolist()]
    for row, task in enumerate(chosen):
        torch.testing.assert_close(logits[row], alone[task][row], rtol=1e-5, atol=1e-5)
    assert router.predict(model, **batch) == [(t, int(alone[t][r].argmax())) for r, t in enumerate(chosen)]
    fixed = EntropyRouter(["b"])
    fixed.add_batch(model, "a", **batch)
    assert fixed.tasks == ["b", "a"] and set(fixed.route(model, **batch)) <= {"a", "b"}
    with pytest.raises(MTLConfigError) as info:
        EntropyRouter(["a", "r"]).route(model, **batch)
    _one_line(info, "classification", "r (regression")
    with pytest.raises(MTLConfigError) as info:
        EntropyRouter().route(MTLModel(tiny_backbone("bert")), **batch)
    _one_line(info, "no task trained yet")


# ---- prototype statistics ------------------------------------------------------------------------
def test_chunked_updates_equal_one_update_and_numpy():
    g = torch.Generator().manual_seed(0)
    data = {"a": 1000 + 2 * torch.randn(50, 6, generator=g, dtype=torch.float64),
            "b": -500 + torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                                          dtype=torch.float64)}
    whole, chunked = PrototypeRouter(), PrototypeRouter()
    for task, x in data.items():
        whole.update(task, x, depth=1)
    chunked.update("a", data["a"][:1], depth=1)
    chunked.update("b", data["b"][:20], depth=1)
    chunked.update("a", data["a"][1:18], depth=1)
    chunked.update("b", data["b"][20:21], depth=1)
    chunked.update("a", data["a"][18:18], depth=1)  # an empty chunk changes nothing
    chunked.update("a", data["a"][18:], depth=1)
    chunked.update("b", data["b"][21:], depth=1)
    assert chunked.tasks == whole.tasks == ["a", "b"] and chunked.count("a") == 50 and chunked.count("b") == 40
    arrays = {t: x.numpy() for t, x in data.items()}
    pooled = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in arrays.values()) / (90 - 2)
    for router in (whole, chunked):
        for task, x in arrays.items():
            np.testing.assert_allclose(router.mean(task).numpy(), x.mean(0), rtol=0, atol=1e-10)
        np.testing.assert_allclose(router.covariance().numpy(), pooled, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked.covariance(), whole.covariance(), rtol=0, atol=1e-10)


def test_mahalanobis_picks_the_right_task_where_euclidean_does_not():
    # two clouds with one shared covariance, long along x (sd 5) and thin along y (sd 0.2): the means differ by
    # (4, 1), a small step along x but 5 sd along y
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([5.0, 0.2], dtype=torch.float64)
    centre = {"a": torch.tensor([0.0, 0.0], dtype=torch.float64), "b": torch.tensor([4.0, 1.0], dtype=torch.float64)}
    cloud = {t: c + torch.randn(2000, 2, generator=g, dtype=torch.float64) * scale for t, c in centre.items()}
    router = PrototypeRouter(shrinkage=1e-3)
    for task, x in cloud.items():
        router.update(task, x, depth=1)
    point = torch.tensor([[3.9, 0.1]], dtype=torch.float64)  # 0.8 sd from a, 4.5 sd from b; Euclidean: 3.9 vs 0.9
    assert router.route_features(point, depth=1) == ["a"]
    sigma = router.covariance().numpy()
    metric = sigma + 1e-3 * np.trace(sigma) / 2 * np.eye(2)
    diffs = point.numpy()[:, None, :] - np.stack([router.mean("a").numpy(), router.mean("b").numpy()])[None]
    by_hand = np.einsum("rti,ij,rtj->rt", diffs, np.linalg.inv(metric), diffs)
    np.testing.assert_allclose(router.distances(point, depth=1).numpy(), by_hand, rtol=1e-10)
    test = {t: c + torch.randn(500, 2, generator=g, dtype=torch.float64) * scale for t, c in centre.items()}
    features, truth = torch.cat([test["a"], test["b"]]), ["a"] * 500 + ["b"] * 500
    means = torch.stack([router.mean("a"), router.mean("b")])
    euclidean = [["a", "b"][i] for i in torch.cdist(features, means).argmin(1).tolist()]
    mahalanobis = router.route_features(features, depth=1)
    accuracy = {name: np.mean([p == t for p, t in zip(routes, truth)])
                for name, routes in (("euclidean", euclidean), ("mahalanobis", mahalanobis))}
    assert accuracy["mahalanobis"] > 0.97 and accuracy["euclidean"] < 0.8, accuracy


def test_features_of_another_depth_or_width_are_refused():
    router = PrototypeRouter()
    router.update("a", torch.randn(4, 3), depth=2)
    for call in (lambda: router.update("b", torch.randn(4, 3), depth=1),
                 lambda: router.route_features(torch.randn(2, 3), depth=3)):
        with pytest.raises(MTLConfigError) as info:
            call()
        _one_line(info, "not comparable")
    with pytest.raises(MTLConfigError) as info:
        router.update("a", torch.randn(4, 5), depth=2)
    _one_line(info, "hidden size 3")
    with pytest.raises(ValueError, match="nan"):
        router.update("a", torch.tensor([[0.0, float("nan"), 0.0]]), depth=2)
    assert router.count("a") == 4


# ---- prototype on the model ----------------------------------------------------------------------
def test_feature_depth_is_the_lowest_adapter_layer_and_features_are_a_masked_mean():
    model = _model(AdapterConfig(drop_first=1))
    assert feature_depth(model, ["a", "b"]) == 1 and model.num_layers == 2
    router = _fit(PrototypeRouter(), model)
    assert (router.depth, router.hidden_size, router.backbone) == (1, 64, model.backbone_name)
    batch = _rows("b", 4, seed=3)
    hidden = model.prefix_states(batch["input_ids"], batch["attention_mask"], None, layers=1).double()
    mask = batch["attention_mask"].double()[..., None]
    torch.testing.assert_close(router.features(model, **batch), (hidden * mask).sum(1) / mask.sum(1),
                               rtol=0, atol=1e-12)
    everywhere = _model("pfeiffer")  # adapters from layer 0: nothing shared, the bare last layer instead
    assert feature_depth(everywhere, ["a"]) == 2
    assert _fit(PrototypeRouter(), everywhere).depth == 2
    mixed = _model(AdapterConfig(drop_first=1), tasks=("a",))
    mixed.add_task("b", 3, "pfeiffer")
    assert feature_depth(mixed, ["a"]) == 1 and feature_depth(mixed, ["a", "b"]) == 2


@pytest.mark.parametrize("adapter", [AdapterConfig(drop_first=1), "pfeiffer"], ids=["prefix-reused", "bare-fallback"])
def test_routed_predict_equals_running_the_chosen_task_alone(adapter):
    model = _model(adapter)
    router = _fit(PrototypeRouter(), model)
    batch, truth = _mixed()
    calls = []
    hook = model.backbone.encoder.layer[0].register_forward_hook(lambda *_: calls.append(1))
    chosen, logits = router.routed_logits(model, **batch)
    hook.remove()
    assert chosen == truth  # the three vocabularies are far apart in feature space
    # the prefix runs layer 0 once; the chosen tasks continue from it unless adapters sit inside it
    assert len(calls) == (1 if router.depth == 1 else 2)
    for row, task in enumerate(chosen):
        alone = model(**batch, tasks=task)[task][row]
        torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)
    assert router.predict(model, **batch) == [(t, int(v.argmax())) for t, v in zip(chosen, logits)]
    model.train()
    assert router.route(model, **batch) == truth and model.training  # eval inside, the mode restored after


def test_routing_refuses_an_empty_router_and_a_model_that_does_not_match():
    model = _model()
    batch = _rows("a", 2, seed=0)
    with pytest.raises(MTLConfigError) as info:
        PrototypeRouter().route(model, **batch)
    _one_line(info, "no task trained yet")
    router = _fit(PrototypeRouter(), model, tasks=("a", "b"))
    with pytest.raises(MTLConfigError) as info:
        router.route(_model(tasks=("a",)), **batch)
    _one_line(info, "['b']", "not in the model")
    narrow = MTLModel(BertModel(BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64), add_pooling_layer=False))
    narrow.add_task("a", 2)
    narrow.add_task("b", 3)
    with pytest.raises(MTLConfigError) as info:
        router.route(narrow, **batch)
    _one_line(info, "hidden size 64", "has 32")
    model.backbone_name = "another-backbone"
    with pytest.raises(MTLConfigError) as info:
        router.predict(model, **batch)
    _one_line(info, "another-backbone")
    model.backbone_name = router.backbone
    model.add_task("r", 1, problem="regression")
    router.add_batch(model, "r", **_rows("c", 4, seed=5))
    with pytest.raises(MTLConfigError) as info:
        router.predict(model, **batch)
    _one_line(info, "classification", "r (regression")


# ---- files ---------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = _model()
    router = _fit(PrototypeRouter(shrinkage=0.05), model)
    router.save(tmp_path / "router")
    files = load_file(str(tmp_path / "router" / "router.safetensors"))
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    assert meta == {"format_version": 1, "kind": "prototype", "tasks": ["a", "b", "c"], "depth": 1,
                    "hidden_size": 64, "backbone": model.backbone_name, "shrinkage": 0.05}
    assert files["counts"].tolist() == [12, 12, 12] and files["scatter"].dtype == torch.float64
    loaded = load_router(tmp_path / "router")
    assert isinstance(loaded, PrototypeRouter) and loaded.tasks == router.tasks
    assert (loaded.depth, loaded.hidden_size, loaded.backbone, loaded.shrinkage) == (1, 64, "bert", 0.05)
    for task in router.tasks:
        assert torch.equal(loaded.mean(task), router.mean(task)) and loaded.count(task) == router.count(task)
    assert torch.equal(loaded.covariance(), router.covariance())
    batch, truth = _mixed(seed=21)
    features = router.features(model, **batch)
    assert torch.equal(loaded.distances(features, depth=1), router.distances(features, depth=1))
    assert loaded.route(model, **batch) == router.route(model, **batch) == truth
    with pytest.raises(MTLConfigError, match="already exists"):
        router.save(tmp_path / "router")
    router.update("a", features[:2], depth=1)
    router.save(tmp_path / "router", overwrite=True)
    assert load_router(tmp_path / "router").count("a") == 14
    EntropyRouter(["b", "a"]).save(tmp_path / "entropy")
    entropy = load_router(tmp_path / "entropy")
    assert isinstance(entropy, EntropyRouter) and entropy.tasks == ["b", "a"]
    assert sorted(p.name for p in (tmp_path / "entropy").iterdir()) == ["router.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind
    with pytest.raises(MTLConfigError) as info:
        PrototypeRouter().save(tmp_path / "empty")
    _one_line(info, "no task trained yet")


def _truncate(folder):
    data = (folder / "router.safetensors").read_bytes()
    (folder / "router.safetensors").write_bytes(data[: len(data) // 2])


def _edit_json(**changes):
    def edit(folder):
        meta = json.loads((folder / "router.json").read_text())
        meta.update(changes)
        (folder / "router.json").write_text(json.dumps({k: v for k, v in meta.items() if v != "DROP"}))
    return edit


def _wrong_tensor(folder):
    tensors = load_file(str(folder / "router.safetensors"))
    tensors["means"] = tensors["means"][:, :10].contiguous()
    save_file(tensors, str(folder / "router.safetensors"))


def _nan_tensor(folder):
    tensors = load_file(str(folder / "router.safetensors"))
    tensors["means"][1, 3] = float("nan")
    save_file(tensors, str(folder / "router.safetensors"))


@pytest.mark.parametrize("damage, words", [
    (_truncate, ["router.safetensors", "not a readable safetensors"]),
    (_nan_tensor, ["router.safetensors", "tensor means holds 1 non-finite value(s) (NaN)"]),
    (lambda f: (f / "router.safetensors").unlink(), ["router.safetensors", "not found"]),
    (lambda f: (f / "router.json").unlink(), ["router.json", "not found"]),
    (_edit_json(depth="DROP"), ["router.json", "depth: missing"]),
    (_edit_json(kind="nearest"), ["router.json", "kind", "'prototype'"]),
    (_edit_json(hidden_size=65), ["router.safetensors", "means has shape (2, 64), expected (2, 65)"]),
    (_edit_json(tasks=["a", "b", "c"]), ["router.safetensors", "counts has shape (2,), expected (3,)"]),
    (_edit_json(tasks=["a", "a"]), ["router.json", "distinct task names"]),
    (_wrong_tensor, ["router.safetensors", "means has shape (2, 10), expected (2, 64)"]),
], ids=["truncated", "nan", "no-weights", "no-config", "missing-key", "unknown-kind", "hidden-size", "task-count",
        "duplicate-task", "wrong-shape"])
def test_broken_router_files_are_one_line_errors(tmp_path, damage, words):
    router = PrototypeRouter()
    router.update("a", torch.randn(3, 64, dtype=torch.float64), depth=1)
    router.update("b", torch.randn(3, 64, dtype=torch.float64), depth=1)
    folder = router.save(tmp_path / "router")
    damage(folder)
    with pytest.raises(MTLConfigError) as info:
        load_router(folder)
    _one_line(info, *words)


# ---- report --------------------------------------------------------------------------------------
class _ScriptedRouter:
    """Answers each predict call with the next scripted list (the report only consumes predict and tasks)."""

    kind = "scripted"
    tasks = ["a", "b", "c"]

    def __init__(self, answers):
        self.answers = list(answers)

    def predict(self, model, input_ids, attention_mask=None, token_type_ids=None):
        answer = self.answers.pop(0)
        assert len(answer) == input_ids.shape[0]
        return answer


def test_routing_report_numbers_by_hand(tmp_path):
    model = _model(tasks=("a", "b"))
    with torch.no_grad():  # constant heads: task-given answers are a -> 1 and b -> 2 for every row
        for task, bias in (("a", [0.0, 1.0]), ("b", [0.0, 0.0, 1.0])):
            model.heads[task].out.weight.zero_()
            model.heads[task].out.bias.copy_(torch.tensor(bias))
    batches = {"a": [{**_rows("a", 3, 1), "labels": torch.tensor([1, 1, 0])}],
               "b": [{**_rows("b", 2, 2), "labels": torch.tensor([2, 0])},
                     {**_rows("b", 1, 3), "labels": torch.tensor([2])}]}
    router = _ScriptedRouter([[("a", 1), ("b", 1), ("a", 0)], [("b", 2), ("b", 2)], [("a", 2)]])
    report = routing_report(model, router, batches)
    assert report["router"] == "scripted" and report["tasks"] == ["a", "b", "c"]
    assert report["confusion"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert report["per_task"]["a"] == {"rows": 3, "routing_accuracy": 2 / 3, "routed_accuracy": 2 / 3,
                                       "task_given_accuracy": 2 / 3}
    assert report["per_task"]["b"] == {"rows": 3, "routing_accuracy": 2 / 3, "routed_accuracy": 1 / 3,
                                       "task_given_accuracy": 2 / 3}
    assert report["overall"] == {"rows": 6, "routing_accuracy": 4 / 6, "routed_accuracy": 3 / 6,
                                 "task_given_accuracy": 4 / 6}
    json.dumps(report)
    save_confusion_png(report, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png"]


def test_routing_report_with_a_real_router_routes_every_row_right():
    model = _model()
    router = _fit(PrototypeRouter(), model)
    batches = {}
    for i, task in enumerate(("a", "b", "c")):
        rows = _rows(task, 5, seed=50 + i)
        batches[task] = [{**rows, "labels": torch.arange(5) % LABELS[task]}]
    report = routing_report(model, router, batches)
    assert report["confusion"] == [[5, 0, 0], [0, 5, 0], [0, 0, 5]]
    assert report["overall"]["routing_accuracy"] == 1.0
    for scores in report["per_task"].values():  # right task every time: routed = task-given accuracy
        assert scores["routed_accuracy"] == scores["task_given_accuracy"]
