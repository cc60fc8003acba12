"""DeBERTa-v2/v3 and ModernBERT carry every feature the BERT family has, on tiny random models of each family.

Identity at init, the layer loop against the backbone's own forward, the multi-task forward and the AdapterHub
round trip run for every family in test_adapters.py / test_model.py / test_fusion_model.py /
test_adapterhub_format.py; here the rest: row routing, AdapterDrop, the frozen prefix, fusion training, routers,
export and `from_pretrained`, training one task without touching another.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from mtl import model_files
from mtl.adapters.config import AdapterConfig
from mtl.adapters.inject import Target
from mtl.arch import ARCHS, layer_list
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.routing import EntropyRouter, PrototypeRouter
from tests.conftest import tiny_backbone, tiny_batch

NEW = ["deberta-v2", "modernbert"]
PRESETS = ["pfeiffer", "houlsby", "parallel"]
EXACT = dict(rtol=0, atol=0)
CLOSE = dict(rtol=1e-5, atol=1e-5)


def _model(family: str, adapter: AdapterConfig | str = "pfeiffer", tasks=("a", "b", "c"), **kwargs) -> MTLModel:
    model = MTLModel(tiny_backbone(family), **kwargs)
    for i, task in enumerate(tasks):
        model.add_task(task, 2 + i, adapter)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # identity adapters would hide a task routed to the wrong rows
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("family", NEW)
def test_deberta_convolution_and_final_norm_are_in_the_loop(family):
    backbone = tiny_backbone(family, conv=3) if family == "deberta-v2" else tiny_backbone(family)
    batch = tiny_batch(rows=5, length=11)
    model = MTLModel(backbone)
    torch.testing.assert_close(model.encode(batch["input_ids"], batch["attention_mask"], None, []),
                               backbone(**batch).last_hidden_state, **EXACT)
    # the prefix after k layers, continued by the loop, is the same forward (the frozen-prefix cache reads this)
    for k in range(1, model.num_layers):
        prefix = model.prefix_states(batch["input_ids"], batch["attention_mask"], None, k)
        got = model.encode(batch["input_ids"], batch["attention_mask"], None, [], prefix=prefix, prefix_layers=k)
        torch.testing.assert_close(got, backbone(**batch).last_hidden_state, **EXACT)


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("preset", PRESETS)
def test_row_tasks_and_chunked_multi_task_forward_equal_each_task_alone(family, preset):
    model = _model(family, preset, chunk_rows=4)  # 3 tasks x 4 rows: packs of one task each above the shared layers
    batch = tiny_batch(rows=4)
    rows = ["c", "a", "b", "a"]
    mixed = model(**batch, row_tasks=rows)
    together = model(**batch, tasks=["a", "b", "c"])
    for task in ("a", "b", "c"):
        alone = model(**batch, tasks=task)[task]
        torch.testing.assert_close(together[task], alone, **CLOSE)
        idx = [i for i, t in enumerate(rows) if t == task]
        torch.testing.assert_close(mixed[task], alone[idx], **CLOSE)


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("preset", PRESETS)
def test_adapterdrop_equals_removing_the_dropped_adapters(family, preset):
    model = _model(family, AdapterConfig(type=preset, robust_drop=True), tasks=("a", "b"))
    batch = tiny_batch()
    dropped = model(**batch, tasks=["a", "b"], drop_first=1)  # rows copied in layer 1, below it one shared pass
    for slot in model.iter_slots():
        for task in ("a", "b"):
            if slot.layer_index < 1 and task in slot.adapters:
                del slot.adapters[task]
    for task in ("a", "b"):
        torch.testing.assert_close(dropped[task], model(**batch, tasks=task)[task], **CLOSE)


@pytest.mark.parametrize("family", NEW)
def test_leave_out_and_fixed_drop_place_no_adapter_there(family):
    model = MTLModel(tiny_backbone(family))
    model.add_task("left", 2, AdapterConfig(leave_out=[0]))
    model.add_task("drop", 2, AdapterConfig(type="houlsby", drop_first=1))
    assert model.adapter_layers("left") == model.adapter_layers("drop") == list(range(1, model.num_layers))
    assert model.adapter_locations("drop")[:2] == [(1, "attn"), (1, "ffn")]


@pytest.mark.parametrize("family", NEW)
def test_frozen_prefix_forward_equals_the_full_forward(family):
    model = _model(family, AdapterConfig(drop_first=1), tasks=("a",))
    batch = tiny_batch()
    prefix = model.prefix_states(batch["input_ids"], batch["attention_mask"], None, 1)
    cached = model(**batch, tasks="a", prefix=prefix, prefix_layers=1)["a"]
    torch.testing.assert_close(cached, model(**batch, tasks="a")["a"], **EXACT)


@pytest.mark.parametrize("family", NEW)
def test_training_one_task_moves_it_and_leaves_the_others_bit_identical(family):
    model = _model(family, tasks=("a", "b"))
    before = {k: v.clone() for k, v in model.task_parameters("a").items()}
    model.set_trainable(["b"])
    batch, labels = tiny_batch(), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(model.eval()(**batch, tasks="b")["b"], labels)
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(**batch, tasks="b")["b"], labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model.eval()(**batch, tasks="b")["b"], labels) < start / 2
    assert all(torch.equal(before[k], v) for k, v in model.task_parameters("a").items())
    assert not any(p.requires_grad for p in model.backbone.parameters() if p not in set(model.task_parameters("b").values()))


@pytest.mark.parametrize("family", NEW)
def test_fusion_trains_over_frozen_adapters_and_matches_its_naive_path(family):
    model = _model(family, tasks=("a", "b"))
    model.add_fusion("ab", ["a", "b"], 3)
    batch = tiny_batch()
    fast = model(**batch, tasks="ab")["ab"]
    model.fast_fusion = False
    torch.testing.assert_close(model(**batch, tasks="ab")["ab"], fast, **CLOSE)
    model.set_trainable([], parts=[("fusion", "ab")])
    model.train()
    loss = model(**batch, tasks="ab")["ab"].logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for t in ("a", "b") for p in model.task_parameters(t).values())
    fusion = model.part_parameters(("fusion", "ab"))
    assert fusion and all(p.grad is not None for p in fusion.values())


@pytest.mark.parametrize("family", NEW)
def test_routers_route_and_predict_like_the_chosen_task_alone(family):
    model = _model(family, AdapterConfig(drop_first=1))
    batch = tiny_batch(rows=4)
    chosen, logits = EntropyRouter().routed_logits(model, **batch)
    for row, task in enumerate(chosen):
        torch.testing.assert_close(logits[row], model(**batch, tasks=task)[task][row], **CLOSE)
    router = PrototypeRouter()
    for i, task in enumerate(("a", "b", "c")):  # three vocabularies far apart: features tell them apart
        ids = torch.randint(5 + 80 * i, 10 + 80 * i, (6, 8), generator=torch.Generator().manual_seed(i))
        router.add_batch(model, task, input_ids=ids, attention_mask=torch.ones_like(ids))
    ids = torch.cat([torch.randint(5 + 80 * i, 10 + 80 * i, (2, 8)) for i in range(3)])
    assert router.route(model, input_ids=ids, attention_mask=torch.ones_like(ids)) == ["a"] * 2 + ["b"] * 2 + ["c"] * 2
    calls = []
    hook = layer_list(model.backbone)[0].register_forward_hook(lambda *_: calls.append(1))
    chosen, logits = router.routed_logits(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    hook.remove()
    assert len(calls) == 1  # the router's prefix is reused by the chosen tasks
    for row, task in enumerate(chosen):
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), tasks=task)[task][row]
        torch.testing.assert_close(logits[row], alone, **CLOSE)


@pytest.mark.parametrize("family", NEW)
def test_export_and_from_pretrained_round_trip_bit_identical(family, tmp_path):
    model = _model(family, "houlsby", tasks=("a", "b"))
    model.add_fusion("ab", ["a", "b"], 3)
    batch = tiny_batch()
    folder = model.save_pretrained(tmp_path / "run")
    loaded = MTLModel.from_pretrained(folder, backbone=tiny_backbone(family))
    for task in ("a", "b", "ab"):
        torch.testing.assert_close(loaded(**batch, tasks=task)[task], model(**batch, tasks=task)[task], **EXACT)
    other = "modernbert" if family == "deberta-v2" else "deberta-v2"
    fresh = MTLModel(tiny_backbone(other))
    with pytest.raises(MTLConfigError, match="model_type"):
        model_files.load_task(fresh, folder / "adapters" / "a")


def test_an_unsupported_family_is_one_line_naming_the_supported_ones():
    from transformers import AutoModel

    config = AutoConfig.for_model("albert", vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, embedding_size=16)
    with pytest.raises(MTLConfigError) as err:
        MTLModel(AutoModel.from_config(config))
    message = str(err.value)
    assert "'albert' is not supported" in message and "\n" not in message
    assert all(f"'{family}'" in message for family in ARCHS)


@pytest.fixture(scope="module", params=NEW)
def family_dir(request, tmp_path_factory):
    """A tiny random model of the family with the MiniLM tokenizer, saved as a local Hugging Face folder."""
    from mtl.backbone import load_tokenizer

    path = tmp_path_factory.mktemp(request.param)
    model = tiny_backbone(request.param)
    model.resize_token_embeddings(30522)  # the MiniLM tokenizer's vocabulary
    model.save_pretrained(path)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return path


def test_fit_predict_and_load_from_a_local_folder_of_the_family(family_dir, task_dir, tmp_path):
    from mtl.cli import main

    run = tmp_path / "run"
    common = ["--model.backbone", str(family_dir), "--data.tasks", "[keyword]", "--data.tasks_dir", str(task_dir),
              "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--model.run_dir", str(run),
              "--trainer.default_root_dir", str(run)]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"])
    assert (run / "adapters" / "keyword" / "adapter.safetensors").is_file()
    main(["predict", *common, "--ckpt_path", str(next(run.rglob("*.ckpt")))])
    loaded = MTLModel.from_pretrained(run, backbone=str(family_dir))
    assert loaded.backbone.config.model_type == AutoConfig.from_pretrained(family_dir).model_type


@pytest.mark.parametrize("groups", ["a", [("a", slice(None))], [Target("a")]])
def test_encode_given_a_task_name_instead_of_route_targets_says_what_it_takes(groups):
    model = _model("bert", tasks=("a",))
    batch = tiny_batch()
    with pytest.raises(TypeError, match=r"\(Target, slice\) pairs"):
        model.encode(batch["input_ids"], batch["attention_mask"], None, groups)
    model.encode(batch["input_ids"], batch["attention_mask"], None, [(model.target("a"), slice(None))])
