"""AdapterHub's adapter and fusion folders, both ways, without AdapterHub installed: folders written by hand in its
exact layout.

The references below recompute AdapterHub 1.3's bottleneck and fusion math (methods/modeling.py `Adapter`,
`ParallelAdapter`, `BertFusion`, methods/bottleneck.py) from the tensors by their AdapterHub names, on a plain Hugging
Face BERT whose sub-layer forwards are replaced; they never go through mtl's adapter or fusion code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtl import model_files
from mtl.interop.adapterhub import load_adapterhub, save_adapterhub
from mtl.interop.adapterhub_fusion import load_adapterhub_fusion, save_adapterhub_fusion
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from tests.conftest import tiny_backbone, tiny_batch

HIDDEN, LAYERS = 64, 2
# AdapterHub 1.3's BnConfig defaults (configuration/adapter_config.py), as its to_dict() writes them
BN = dict(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu", original_ln_before=False,
          original_ln_after=True, ln_before=False, ln_after=False, init_weights="bert", init_weights_seed=None,
          is_parallel=False, scaling=1.0, use_gating=False, residual_before_ln=True, adapter_residual_before_ln=False,
          inv_adapter=None, inv_adapter_reduction_factor=None, cross_adapter=False, leave_out=[], dropout=0.0,
          phm_layer=False, phm_dim=4, factorized_phm_W=True, shared_W_phm=False, shared_phm_rule=True,
          factorized_phm_rule=False, phm_c_init="normal", phm_init_range=0.0001, learn_phm=True,
          hypercomplex_nonlinearity="glorot-uniform", phm_rank=1, phm_bias=True, stochastic_depth=0.0)
AH_PRESETS = {  # SeqBnConfig, DoubleSeqBnConfig, ParBnConfig
    "pfeiffer": {**BN, "original_ln_before": True},
    "houlsby": {**BN, "mh_adapter": True, "non_linearity": "swish"},
    "parallel": {**BN, "reduction_factor": 2, "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0},
}
LABELS = ["neg", "neu", "pos"]


def _meta(name: str) -> dict:
    """The top-level keys AdapterHub writes into every config file of a saved module."""
    return {"hidden_size": HIDDEN, "model_class": "BertAdapterModel", "model_name": "tiny", "model_type": "bert",
            "name": name, "version": "adapters.1.3.0"}


def _write_files(folder: Path, name: str, config: dict, config_name: str, tensors: dict, weights: str, legacy: str,
                 head: dict | None, legacy_bin: bool, g: torch.Generator) -> dict:
    """A module's config and weights, and its classification head when ``head`` is given, as AdapterHub saves them."""
    (folder / config_name).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    head_tensors = {}
    if head is not None:
        head_tensors = {f"heads.{name}.1.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2,
                        f"heads.{name}.1.bias": torch.randn(HIDDEN, generator=g) * 0.2,
                        f"heads.{name}.4.weight": torch.randn(3, HIDDEN, generator=g) * 0.2,
                        f"heads.{name}.4.bias": torch.randn(3, generator=g) * 0.2}
        head_cfg = {"head_type": "classification", "num_labels": 3, "layers": 2, "activation_function": "tanh",
                    "label2id": {label: i for i, label in enumerate(LABELS)}, "use_pooler": False, "bias": True,
                    "dropout_prob": None, **head}
        (folder / "head_config.json").write_text(json.dumps({**_meta(name), "config": head_cfg}))
    if legacy_bin:
        torch.save(tensors, folder / legacy)
        if head is not None:
            torch.save(head_tensors, folder / "pytorch_model_head.bin")
    else:
        save_file(tensors, str(folder / weights))
        if head is not None:
            save_file(head_tensors, str(folder / "model_head.safetensors"))
    return {**tensors, **head_tensors}


def write_ah(folder: Path, cfg: dict, name: str = "ah", head: dict | None = None, legacy_bin: bool = False,
             prefix: str = "", top: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folder as AdapterHub's save_adapter(..., with_head=True) writes it; returns every tensor written."""
    g = torch.Generator().manual_seed(seed)
    factor = cfg["reduction_factor"]
    width = int(HIDDEN // factor) if isinstance(factor, (int, float)) else 4
    tensors = {}
    for layer in range(LAYERS):
        for location, on in (("attention.output", cfg["mh_adapter"]), ("output", cfg["output_adapter"])):
            if on and layer not in cfg["leave_out"]:
                base = f"{prefix}encoder.layer.{layer}.{location}.adapters.{name}."
                for key, shape in (("adapter_down.0.weight", (width, HIDDEN)), ("adapter_down.0.bias", (width,)),
                                   ("adapter_up.weight", (HIDDEN, width)), ("adapter_up.bias", (HIDDEN,))):
                    tensors[base + key] = torch.randn(shape, generator=g) * 0.3
    folder.mkdir(parents=True)
    config = {**_meta(name), "config": cfg, **(top or {})}
    return _write_files(folder, name, config, "adapter_config.json", tensors, "adapter.safetensors",
                        "pytorch_adapter.bin", head, legacy_bin, g)


def adapterhub_reference(cfg: dict, tensors: dict[str, torch.Tensor], name: str = "ah",
                         prefix: str = "") -> torch.nn.Module:
    """A plain BERT (same weights as tiny_backbone()) whose sub-layers compute AdapterHub's adapter math."""
    ref = tiny_backbone("bert")
    act = {"relu": F.relu, "swish": F.silu}[cfg["non_linearity"]]
    for layer_index, layer in enumerate(ref.encoder.layer):
        for location, module in (("attention.output", layer.attention.output), ("output", layer.output)):
            base = f"{prefix}encoder.layer.{layer_index}.{location}.adapters.{name}."
            if base + "adapter_up.weight" not in tensors:
                continue

            def forward(hidden_states, input_tensor, module=module, w=lambda k, b=base: tensors[b + k]):
                def bottleneck(z):
                    down = act(F.linear(z, w("adapter_down.0.weight"), w("adapter_down.0.bias")))
                    return F.linear(down, w("adapter_up.weight"), w("adapter_up.bias")) * cfg["scaling"]
                h, x = module.dense(hidden_states), input_tensor  # eval: dropout is the identity
                if cfg["is_parallel"]:  # ParallelAdapter: reads x, output added to h; then the frozen LN
                    return module.LayerNorm(bottleneck(x) + h + x)
                z = module.LayerNorm(h + x) if cfg["original_ln_before"] else h
                residual = h if cfg["residual_before_ln"] else z
                return module.LayerNorm(bottleneck(z) + residual + x)

            module.forward = forward
    return ref


def mtl_hidden(model: MTLModel, task: str, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(batch["input_ids"], batch["attention_mask"], None, [(model.target(task), slice(None))])


CASES = [("pfeiffer", {}), ("houlsby", {}), ("parallel", {}),
         ("pfeiffer", {"leave_out": [0], "residual_before_ln": False, "dropout": 0.1, "reduction_factor": 8})]


@pytest.mark.parametrize("preset,changes", CASES)
def test_import_equals_adapterhub_math(tmp_path, preset, changes):
    cfg = {**AH_PRESETS[preset], **changes}
    written = write_ah(tmp_path / "ah", cfg, head={})
    model = MTLModel(tiny_backbone("bert"))
    assert load_adapterhub(model, tmp_path / "ah") == "ah"
    config = model.adapter_configs["ah"]
    assert config.positions == (["attn", "ffn"] if cfg["mh_adapter"] else ["ffn"])
    assert (config.parallel, config.scaling, config.leave_out) == (cfg["is_parallel"], cfg["scaling"], cfg["leave_out"])
    # every mtl tensor is the written one, under the documented name mapping
    params = model.task_parameters("ah")
    assert len(params) == len(written)
    for key, p in params.items():
        if key.startswith("head."):
            ah_key = f"heads.ah.{'1' if '.dense.' in key else '4'}.{key.rsplit('.', 1)[1]}"
        else:
            _, layer, position, proj, kind = key.split(".")
            location = "attention.output" if position == "attn" else "output"
            proj = "adapter_down.0" if proj == "down" else "adapter_up"
            ah_key = f"encoder.layer.{layer}.{location}.adapters.ah.{proj}.{kind}"
        assert torch.equal(p, written[ah_key]), key
    batch = tiny_batch()
    ref = adapterhub_reference(cfg, written)
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        bare = tiny_backbone("bert")(**batch).last_hidden_state
    hidden = mtl_hidden(model, "ah", batch)
    assert (expected - bare).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    torch.testing.assert_close(hidden, expected, rtol=0, atol=2e-6)
    head = model.heads["ah"]
    assert (head.pooling, head.problem, model.records["ah"].labels) == ("cls", "classification", LABELS)
    assert head.dropout.p == 0.1  # dropout_prob null: the backbone's hidden_dropout_prob, as AdapterHub does
    logits = model(**batch, tasks="ah")["ah"]
    dense = torch.tanh(F.linear(expected[:, 0], written["heads.ah.1.weight"], written["heads.ah.1.bias"]))
    torch.testing.assert_close(logits, F.linear(dense, written["heads.ah.4.weight"], written["heads.ah.4.bias"]),
                               rtol=0, atol=2e-6)


def test_legacy_bin_with_model_prefix(tmp_path):
    written = write_ah(tmp_path / "ah", AH_PRESETS["houlsby"], head={}, legacy_bin=True, prefix="bert.")
    model = MTLModel(tiny_backbone("bert"))
    load_adapterhub(model, tmp_path / "ah", task="mine")
    assert torch.equal(model.task_parameters("mine")["adapters.1.attn.up.weight"],
                       written["bert.encoder.layer.1.attention.output.adapters.ah.adapter_up.weight"])
    assert torch.equal(model.task_parameters("mine")["head.out.bias"], written["heads.ah.4.bias"])


class _Payload:
    """Unpickling this would create a file: weights_only=True must refuse it before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_legacy_bin_with_pickled_object_is_refused(tmp_path):
    folder = tmp_path / "ah"
    write_ah(folder, AH_PRESETS["pfeiffer"], head={}, legacy_bin=True)
    marker = tmp_path / "unpickled"
    tensors = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    torch.save({**tensors, "extra": _Payload(marker)}, folder / "pytorch_adapter.bin")
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError) as err:
        load_adapterhub(model, folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / "pytorch_adapter.bin") in message and "weights_only" in message
    assert not marker.exists() and model.tasks == []


UNSUPPORTED = [("phm_layer", True), ("use_gating", True), ("ln_before", True), ("ln_after", True),
               ("inv_adapter", "nice"), ("scaling", "learned"), ("scaling", "channel"),
               ("residual_before_ln", "post_add"),
               ("original_ln_after", False), ("non_linearity", "gelu_new"), ("stochastic_depth", 0.1),
               ("cross_adapter", True), ("init_weights", "houlsby"), ("architecture", "lora"),
               ("reduction_factor", {"0": 8, "default": 16}), ("output_adapter", False), ("new_field", 1),
               ("invertible_adapter", {"block_type": "nice", "reduction_factor": 2})]


@pytest.mark.parametrize("key,value", UNSUPPORTED, ids=[f"{k}={v}" for k, v in UNSUPPORTED])
def test_unsupported_config_is_one_line_error(tmp_path, key, value):
    write_ah(tmp_path / "ah", {**AH_PRESETS["pfeiffer"], key: value}, head={})
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError) as err:
        load_adapterhub(model, tmp_path / "ah")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "ah" / "adapter_config.json") in message and key in message
    assert model.tasks == [] and model.adapter_configs == {}


@pytest.mark.parametrize("key,value", [("hidden_size", 768), ("model_type", "gpt2")])
def test_other_backbone_is_one_line_error(tmp_path, key, value):
    write_ah(tmp_path / "ah", AH_PRESETS["pfeiffer"], head={}, top={key: value})
    with pytest.raises(MTLConfigError, match=f"adapter_config.json: {key} is") as err:
        load_adapterhub(MTLModel(tiny_backbone("bert")), tmp_path / "ah")
    assert "\n" not in str(err.value)


def test_config_without_version_gets_adapterhubs_activation_rename(tmp_path):
    # AdapterHub reads an unversioned "gelu" as gelu_new (tanh approximation), which mtl lacks; "gelu_orig" is gelu
    write_ah(tmp_path / "old", {**AH_PRESETS["pfeiffer"], "non_linearity": "gelu"}, head={}, top={"version": None})
    with pytest.raises(MTLConfigError, match="non_linearity is 'gelu_new'"):
        load_adapterhub(MTLModel(tiny_backbone("bert")), tmp_path / "old")
    write_ah(tmp_path / "orig", {**AH_PRESETS["pfeiffer"], "non_linearity": "gelu_orig"}, head={},
             top={"version": None})
    write_ah(tmp_path / "new", {**AH_PRESETS["pfeiffer"], "non_linearity": "gelu"}, head={})
    model = MTLModel(tiny_backbone("bert"))
    load_adapterhub(model, tmp_path / "orig", task="orig")
    load_adapterhub(model, tmp_path / "new", task="new")
    assert model.adapter_configs["orig"].non_linearity == model.adapter_configs["new"].non_linearity == "gelu"


def test_bad_tensor_names_and_shapes(tmp_path):
    write_ah(tmp_path / "ah", AH_PRESETS["pfeiffer"], head={})
    tensors = load_file(str(tmp_path / "ah" / "adapter.safetensors"))
    tensors["encoder.layer.0.output.adapters.ah.gate.weight"] = torch.zeros(1, HIDDEN)
    save_file(tensors, str(tmp_path / "ah" / "adapter.safetensors"))
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError, match="tensor 'encoder.layer.0.output.adapters.ah.gate.weight' is not"):
        load_adapterhub(model, tmp_path / "ah")
    write_ah(tmp_path / "narrow", {**AH_PRESETS["pfeiffer"], "reduction_factor": 32}, head={})
    config = tmp_path / "narrow" / "adapter_config.json"
    config.write_text(config.read_text().replace('"reduction_factor": 32', '"reduction_factor": 16'))
    with pytest.raises(MTLConfigError, match=r"has shape \(2, 64\), expected \(4, 64\)"):
        load_adapterhub(model, tmp_path / "narrow")
    assert model.tasks == []


def test_head_that_mtl_cannot_map(tmp_path, capsys):
    written = write_ah(tmp_path / "ah", AH_PRESETS["pfeiffer"], head={"use_pooler": True})
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError, match="head_config.json: config.use_pooler is True.*pass num_labels") as err:
        load_adapterhub(model, tmp_path / "ah")
    assert "\n" not in str(err.value) and model.tasks == []
    load_adapterhub(model, tmp_path / "ah", num_labels=4)
    assert "importing the adapter with a fresh 4-label classification head" in capsys.readouterr().err
    assert model.heads["ah"].num_outputs == 4 and model.heads["ah"].pooling == "cls"
    assert torch.equal(model.task_parameters("ah")["adapters.0.ffn.down.bias"],
                       written["encoder.layer.0.output.adapters.ah.adapter_down.0.bias"])
    write_ah(tmp_path / "bare", AH_PRESETS["pfeiffer"])  # saved with_head=False
    with pytest.raises(MTLConfigError, match="no head_config.json; pass num_labels"):
        load_adapterhub(model, tmp_path / "bare", task="bare")
    write_ah(tmp_path / "good", AH_PRESETS["pfeiffer"], head={})
    with pytest.raises(MTLConfigError, match="the head has 3 labels, but num_labels is 2"):
        load_adapterhub(model, tmp_path / "good", task="other", num_labels=2)
    assert model.tasks == ["ah"]


def test_mtl_export_folder_is_pointed_to_load_task(tmp_path):
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("t", 2)
    model_files.save_task(model, "t", tmp_path)
    with pytest.raises(MTLConfigError, match="use load_task"):
        load_adapterhub(model, tmp_path / "t", task="u")


def _random_tasks(family: str) -> MTLModel:
    model = MTLModel(tiny_backbone(family))
    for i, preset in enumerate(("pfeiffer", "houlsby", "parallel")):
        model.add_task(f"t{i}", 3, preset, pooling="cls", labels=LABELS)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.task_parameters(f"t{i}").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_export_import_round_trip_is_bit_identical(tmp_path, family):
    model, batch = _random_tasks(family), tiny_batch()
    loaded = MTLModel(tiny_backbone(family))
    for task in model.tasks:
        first = save_adapterhub(model, task, tmp_path / "a" / task)
        assert sorted(p.name for p in first.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                           "head_config.json", "model_head.safetensors"]
        assert load_adapterhub(loaded, first) == task
        for key, p in model.task_parameters(task).items():
            assert torch.equal(loaded.task_parameters(task)[key], p), key
        assert torch.equal(loaded(**batch, tasks=task)[task], model(**batch, tasks=task)[task])
        second = save_adapterhub(loaded, task, tmp_path / "b" / task)
        for file in first.iterdir():
            assert file.read_bytes() == (second / file.name).read_bytes(), file.name


@pytest.mark.parametrize("preset", list(AH_PRESETS))
def test_adapterhub_config_survives_import_and_export(tmp_path, preset):
    cfg = {**AH_PRESETS[preset], "leave_out": [1]}
    written = write_ah(tmp_path / "ah", cfg, head={"dropout_prob": 0.25})
    model = MTLModel(tiny_backbone("bert"))
    load_adapterhub(model, tmp_path / "ah")
    out = save_adapterhub(model, "ah", tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["config"] == cfg
    head = json.loads((out / "head_config.json").read_text())["config"]
    assert (head["dropout_prob"], head["label2id"], head["use_pooler"]) == (0.25, {"neg": 0, "neu": 1, "pos": 2}, False)
    exported = {**load_file(str(out / "adapter.safetensors")), **load_file(str(out / "model_head.safetensors"))}
    assert exported.keys() == written.keys()
    assert all(torch.equal(exported[k], written[k]) for k in written)


def test_export_writes_adapterdrop_as_leave_out_and_exact_widths(tmp_path):
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("k", 3, {"type": "pfeiffer", "drop_first": 1, "bottleneck_size": 5}, pooling="cls")
    with torch.no_grad():
        for p in model.task_parameters("k").values():
            p.add_(torch.randn(p.shape) * 0.2)
    cfg = json.loads((save_adapterhub(model, "k", tmp_path / "k") / "adapter_config.json").read_text())["config"]
    assert cfg["leave_out"] == [0] and int(HIDDEN // cfg["reduction_factor"]) == 5  # AdapterHub's width formula
    loaded = MTLModel(tiny_backbone("bert"))
    load_adapterhub(loaded, tmp_path / "k")
    batch = tiny_batch()
    assert torch.equal(loaded(**batch, tasks="k")["k"], model(**batch, tasks="k")["k"])


def test_export_head_rules_and_overwrite(tmp_path, capsys):
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("m", 3)  # mean pooling: AdapterHub's heads cannot express it
    with pytest.raises(MTLConfigError, match="pools the 'mean'.*with_head=False"):
        save_adapterhub(model, "m", tmp_path / "m", with_head=True)
    assert not (tmp_path / "m").exists()
    out = save_adapterhub(model, "m", tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert "without its head" in capsys.readouterr().err
    with pytest.raises(MTLConfigError, match="already exists"):
        save_adapterhub(model, "m", tmp_path / "m")
    model.add_task("c", 3, pooling="cls")
    save_adapterhub(model, "c", tmp_path / "m", overwrite=True, with_head=False)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["name"] == "c"
    assert not (tmp_path / "m" / "head_config.json").exists() and capsys.readouterr().err == ""
    model.add_fusion("f", ["m", "c"], 2)
    with pytest.raises(MTLConfigError, match="is a fusion"):
        save_adapterhub(model, "f", tmp_path / "f")


def test_import_overwrite_and_adapter_name_in_use(tmp_path):
    first = write_ah(tmp_path / "one", AH_PRESETS["pfeiffer"], head={}, seed=1)
    second = write_ah(tmp_path / "two", AH_PRESETS["houlsby"], head={}, seed=2)
    key, ah_key = "adapters.1.ffn.up.weight", "encoder.layer.1.output.adapters.ah.adapter_up.weight"
    model = MTLModel(tiny_backbone("bert"))
    load_adapterhub(model, tmp_path / "one")
    with pytest.raises(MTLConfigError, match="task 'ah' already exists"):
        load_adapterhub(model, tmp_path / "two")
    assert torch.equal(model.task_parameters("ah")[key], first[ah_key])
    load_adapterhub(model, tmp_path / "two", overwrite=True)
    assert torch.equal(model.task_parameters("ah")[key], second[ah_key])
    assert model.adapter_configs["ah"].positions == ["attn", "ffn"]
    shared = MTLModel(tiny_backbone("bert"))
    shared.add_task("x", 2, adapter_name="ah")  # task x runs on an adapter called 'ah'
    before = {k: p.clone() for k, p in shared.task_parameters("x").items()}
    with pytest.raises(MTLConfigError, match=r"adapter name 'ah' is already used by \['x'\]"):
        load_adapterhub(shared, tmp_path / "one", overwrite=True)
    assert shared.tasks == ["x"] and all(torch.equal(p, before[k]) for k, p in shared.task_parameters("x").items())


# ---- tagging heads (mtl's token_classification TokenHead) ---------------------------------------------------------
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def write_tagging_head(folder: Path, name: str, layers: int = 1, seed: int = 5) -> dict[str, torch.Tensor]:
    """A tagging head as AdapterHub 1.3's TaggingHead saves it (heads/base.py: config keys as its __init__ sets them;
    an nn.Sequential of [Dropout, Linear(H, H), Tanh, Dropout] per extra layer, then Dropout, Linear(H, tags))."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    if layers == 2:
        tensors = {f"heads.{name}.1.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2,
                   f"heads.{name}.1.bias": torch.randn(HIDDEN, generator=g) * 0.2}
    out = 3 * layers - 2  # the last Linear's index: 1 for one layer, 4 for two
    tensors.update({f"heads.{name}.{out}.weight": torch.randn(len(TAGS), HIDDEN, generator=g) * 0.2,
                    f"heads.{name}.{out}.bias": torch.randn(len(TAGS), generator=g) * 0.2})
    config = {"head_type": "tagging", "num_labels": len(TAGS), "layers": layers, "activation_function": "tanh",
              "label2id": {tag: i for i, tag in enumerate(TAGS)}, "dropout_prob": None}
    (folder / "head_config.json").write_text(json.dumps({**_meta(name), "config": config}))
    save_file(tensors, str(folder / "model_head.safetensors"))
    return tensors


def test_tagging_head_import_equals_adapterhub_math(tmp_path):
    cfg = AH_PRESETS["pfeiffer"]
    written = write_ah(tmp_path / "ah", cfg)
    head = write_tagging_head(tmp_path / "ah", "ah")
    model = MTLModel(tiny_backbone("bert"))
    assert load_adapterhub(model, tmp_path / "ah") == "ah"
    assert model.heads["ah"].settings() == {"num_outputs": 5, "problem": "token_classification", "pooling": "none",
                                            "dropout": 0.1}  # dropout_prob null: the backbone's hidden_dropout_prob
    assert model.records["ah"].labels == TAGS
    params = model.task_parameters("ah")
    assert torch.equal(params["head.out.weight"], head["heads.ah.1.weight"])
    assert torch.equal(params["head.out.bias"], head["heads.ah.1.bias"])
    batch = tiny_batch()
    with torch.no_grad():
        expected = adapterhub_reference(cfg, written)(**batch).last_hidden_state
    logits = model(**batch, tasks="ah")["ah"]
    assert logits.shape == (4, 9, 5)  # a tag score for every token, padding included, as AdapterHub's head gives
    torch.testing.assert_close(logits, F.linear(expected, head["heads.ah.1.weight"], head["heads.ah.1.bias"]),
                               rtol=0, atol=2e-6)


def _random_tagger(family: str = "bert") -> MTLModel:
    model = MTLModel(tiny_backbone(family))
    model.add_task("ner", len(TAGS), "pfeiffer", problem="token_classification", labels=TAGS, head_dropout=0.2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.task_parameters("ner").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_tagger_export_import_round_trip_is_bit_identical(tmp_path, capsys):
    model, batch = _random_tagger(), tiny_batch()
    first = save_adapterhub(model, "ner", tmp_path / "a" / "ner", with_head=True)
    assert capsys.readouterr().err == ""  # the head is written, no warning
    assert sorted(p.name for p in first.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                       "head_config.json", "model_head.safetensors"]
    # exactly the keys AdapterHub's TaggingHead(model, name, **config) takes (no use_pooler, no bias)
    assert json.loads((first / "head_config.json").read_text()) == {
        "hidden_size": HIDDEN, "model_class": "BertAdapterModel", "model_name": "bert", "model_type": "bert",
        "name": "ner", "version": "adapters.1.3.0",
        "config": {"head_type": "tagging", "num_labels": 5, "layers": 1, "activation_function": "tanh",
                   "dropout_prob": 0.2, "label2id": {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}}}
    head = load_file(str(first / "model_head.safetensors"))
    assert sorted(head) == ["heads.ner.1.bias", "heads.ner.1.weight"]  # [Dropout, Linear]: the Linear is index 1
    assert torch.equal(head["heads.ner.1.weight"], model.task_parameters("ner")["head.out.weight"])
    loaded = MTLModel(tiny_backbone("bert"))
    assert load_adapterhub(loaded, first) == "ner"
    assert loaded.heads["ner"].settings() == model.heads["ner"].settings()
    assert loaded.records["ner"].labels == TAGS
    for key, p in model.task_parameters("ner").items():
        assert torch.equal(loaded.task_parameters("ner")[key], p), key
    assert torch.equal(loaded(**batch, tasks="ner")["ner"], model(**batch, tasks="ner")["ner"])
    second = save_adapterhub(loaded, "ner", tmp_path / "b" / "ner")
    for file in first.iterdir():
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name


def test_tagging_head_that_mtl_cannot_map(tmp_path):
    write_ah(tmp_path / "two", AH_PRESETS["pfeiffer"])
    write_tagging_head(tmp_path / "two", "ah", layers=2)
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError) as err:
        load_adapterhub(model, tmp_path / "two")
    assert str(err.value) == (f"{tmp_path / 'two' / 'head_config.json'}: config.layers is 2; mtl's tagging head is "
                              "AdapterHub's with layers 1 and bias true (one linear layer); pass "
                              "num_labels to import the adapter with a fresh head")
    assert model.tasks == []
    shutil.copytree(tmp_path / "two", tmp_path / "qa")
    config = json.loads((tmp_path / "qa" / "head_config.json").read_text())
    config["config"].update(head_type="question_answering", layers=1)  # 5 outputs: not a start and an end
    (tmp_path / "qa" / "head_config.json").write_text(json.dumps(config))
    with pytest.raises(MTLConfigError, match=r"config.num_labels is 5; mtl's question_answering head is AdapterHub's "
                                             r"with layers 1 and bias true \(one linear layer\) and num_labels 2 "
                                             r"\(start, end\); pass num_labels") as err:
        load_adapterhub(model, tmp_path / "qa")
    config["config"]["head_type"] = "dependency_parsing"
    (tmp_path / "qa" / "head_config.json").write_text(json.dumps(config))
    with pytest.raises(MTLConfigError, match=r"config.head_type is 'dependency_parsing'; .*, or its tagging or "
                                             r"question_answering head with layers 1; pass num_labels") as err:
        load_adapterhub(model, tmp_path / "qa")
    assert "\n" not in str(err.value) and model.tasks == []
    # a one-layer head whose file holds a second layer is not read as one
    write_ah(tmp_path / "extra", AH_PRESETS["pfeiffer"])
    tensors = write_tagging_head(tmp_path / "extra", "ah")
    extra = {**tensors, "heads.ah.4.weight": torch.zeros(5, HIDDEN)}
    save_file(extra, str(tmp_path / "extra" / "model_head.safetensors"))
    with pytest.raises(MTLConfigError, match=r"tensor 'heads.ah.4.weight' is not a layer of head 'ah', expected "
                                             r"heads.ah.<1>.<weight\|bias>"):
        load_adapterhub(model, tmp_path / "extra")
    assert model.tasks == []


# ---- AdapterFusion folders (save_adapter_fusion) ------------------------------------------------------------------
# AdapterHub 1.3's DynamicAdapterFusionConfig / StaticAdapterFusionConfig, as its to_dict() writes them
AH_FUSION = {
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True, residual_before=False,
                    temperature=False, value_before_softmax=True, value_initialized=True, dropout_prob=None),
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False,
                   dropout_prob=None),
}


def write_ah_fusion(folder: Path, cfg: dict, adapter_names: list[str], positions=("output",), head: dict | None = None,
                    legacy_bin: bool = False, prefix: str = "", top: dict | None = None,
                    seed: int = 10) -> dict[str, torch.Tensor]:
    """A folder as AdapterHub's save_adapter_fusion(folder, names, with_head=...) writes it; returns its tensors.

    Like AdapterHub, it has a fusion layer in every layer at the adapters' locations, leave_out layers included.
    """
    g = torch.Generator().manual_seed(seed)
    name = ",".join(adapter_names)
    tensors = {}
    for layer in range(LAYERS):
        for location in positions:
            base = f"{prefix}encoder.layer.{layer}.{location}.adapter_fusion_layer.{name}."
            for key, shape in (("query.weight", (HIDDEN, HIDDEN)), ("query.bias", (HIDDEN,)),
                               ("key.weight", (HIDDEN, HIDDEN)), ("key.bias", (HIDDEN,))):
                # small enough that the attention over adapters stays soft (sharp scores only amplify rounding)
                tensors[base + key] = torch.randn(shape, generator=g) * 0.05
            if cfg.get("value"):
                tensors[base + "value.weight"] = torch.eye(HIDDEN) + torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1
    folder.mkdir(parents=True)
    config = {**_meta(name), "adapter_names": adapter_names, "config": cfg, **(top or {})}
    return _write_files(folder, name, config, "adapter_fusion_config.json", tensors, "model_adapter_fusion.safetensors",
                        "pytorch_model_adapter_fusion.bin", head, legacy_bin, g)


def fusion_reference(adapter_cfg: dict, adapters: dict[str, torch.Tensor], fusion_cfg: dict,
                     fusion: dict[str, torch.Tensor], names: list[str]) -> torch.nn.Module:
    """A plain BERT whose sub-layers compute AdapterHub's Fuse(names) by hand (methods/bottleneck.py compose_fuse,
    methods/modeling.py BertFusion, eval mode, T = 1), reading every tensor by its AdapterHub name."""
    ref = tiny_backbone("bert")
    act = {"relu": F.relu, "swish": F.silu}[adapter_cfg["non_linearity"]]
    fusion_name = ",".join(names)
    for layer_index, layer in enumerate(ref.encoder.layer):
        for location, module in (("attention.output", layer.attention.output), ("output", layer.output)):
            at = f"encoder.layer.{layer_index}.{location}."
            if at + f"adapters.{names[0]}.adapter_up.weight" not in adapters:
                continue

            def forward(hidden_states, input_tensor, module=module, at=at):
                def a(name, key):
                    return adapters[f"{at}adapters.{name}.{key}"]

                def f(key):
                    return fusion[f"{at}adapter_fusion_layer.{fusion_name}.{key}"]

                h, x = module.dense(hidden_states), input_tensor
                # the last adapter's pre_forward gives the adapters' input, the query and the residual
                z = module.LayerNorm(h + x) if adapter_cfg["original_ln_before"] else h
                residual = h if adapter_cfg["residual_before_ln"] else z
                query = h if fusion_cfg["query_before_ln"] else z
                ups = [F.linear(act(F.linear(z, a(n, "adapter_down.0.weight"), a(n, "adapter_down.0.bias"))),
                                a(n, "adapter_up.weight"), a(n, "adapter_up.bias")) for n in names]
                if fusion_cfg["residual_before"]:
                    ups = [u + residual for u in ups]
                q = F.linear(query, f("query.weight"), f("query.bias"))
                scores = torch.stack([(q * F.linear(u, f("key.weight"), f("key.bias"))).sum(-1) for u in ups], -1)
                probs = torch.softmax(scores, dim=-1)
                values = [F.linear(u, f("value.weight")) if fusion_cfg["value"] else u for u in ups]
                context = sum(probs[..., i:i + 1] * v for i, v in enumerate(values))
                if not fusion_cfg["residual_before"]:
                    context = context + residual
                return module.LayerNorm(context + x)

            module.forward = forward
    return ref


def _fusion_setup(tmp_path: Path, preset: str, fusion_cfg: dict, changes: dict | None = None, names=("a0", "a1", "a2"),
                  **kwargs) -> tuple[dict, dict, dict]:
    """AdapterHub folders of three adapters and a fusion over them; returns (adapter cfg, adapter tensors, fusion)."""
    cfg = {**AH_PRESETS[preset], **(changes or {})}
    adapters = {}
    for i, name in enumerate(names):
        adapters.update(write_ah(tmp_path / name, cfg, name=name, head={}, seed=i))
    positions = [loc for loc, on in (("attention.output", cfg["mh_adapter"]), ("output", cfg["output_adapter"])) if on]
    fusion = write_ah_fusion(tmp_path / "fusion", fusion_cfg, list(names), positions=positions, **kwargs)
    return cfg, adapters, fusion


def _load_adapters(model: MTLModel, tmp_path: Path, names=("a0", "a1", "a2")) -> None:
    for name in names:
        load_adapterhub(model, tmp_path / name)


FUSION_CASES = [("pfeiffer", "dynamic", {}), ("pfeiffer", "static", {}),
                ("houlsby", "dynamic", {"residual_before": True, "query_before_ln": True}),
                ("pfeiffer", "dynamic", {"value_before_softmax": False, "dropout_prob": 0.2})]


@pytest.mark.parametrize("preset,fusion_preset,changes", FUSION_CASES)
def test_fusion_import_equals_adapterhub_math(tmp_path, preset, fusion_preset, changes):
    fusion_cfg = {**AH_FUSION[fusion_preset], **changes}
    cfg, adapters, fusion = _fusion_setup(tmp_path, preset, fusion_cfg, head={})
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    assert load_adapterhub_fusion(model, tmp_path / "fusion") == "a0_a1_a2"
    assert model.target("a0_a1_a2").fused == ("a0", "a1", "a2")
    config = model.fusion_configs["a0_a1_a2"]
    for key in ("value", "residual_before", "query_before_ln", "value_before_softmax", "temperature"):
        assert getattr(config, key) == fusion_cfg[key], key
    assert config.dropout_prob == fusion_cfg["dropout_prob"]
    # every fusion tensor is the written one under the documented name mapping
    params = model.part_parameters(("fusion", "a0_a1_a2"))
    assert len(params) == len(model.adapter_locations("a0")) * (5 if fusion_cfg["value"] else 4)
    for key, p in params.items():
        _, layer, position, proj, kind = key.split(".")
        location = "attention.output" if position == "attn" else "output"
        assert torch.equal(p, fusion[f"encoder.layer.{layer}.{location}.adapter_fusion_layer.a0,a1,a2.{proj}.{kind}"])
    batch = tiny_batch()
    with torch.no_grad():
        expected = fusion_reference(cfg, adapters, fusion_cfg, fusion, ["a0", "a1", "a2"])(**batch).last_hidden_state
        single = adapterhub_reference(cfg, {k: v for k, v in adapters.items() if ".a0." in k}, name="a0")(**batch)
    hidden = mtl_hidden(model, "a0_a1_a2", batch)
    assert (expected - single.last_hidden_state).abs().max() > 1e-2  # the fusion is not just one adapter
    torch.testing.assert_close(hidden, expected, rtol=0, atol=5e-6)
    model.fast_fusion = False  # AdapterHub's own order of operations: the same numbers
    torch.testing.assert_close(mtl_hidden(model, "a0_a1_a2", batch), expected, rtol=0, atol=5e-6)
    assert model.records["a0_a1_a2"].labels == LABELS and model.heads["a0_a1_a2"].pooling == "cls"
    logits = model(**batch, tasks="a0_a1_a2")["a0_a1_a2"]
    dense = torch.tanh(F.linear(expected[:, 0], fusion["heads.a0,a1,a2.1.weight"], fusion["heads.a0,a1,a2.1.bias"]))
    torch.testing.assert_close(logits, F.linear(dense, fusion["heads.a0,a1,a2.4.weight"],
                                                fusion["heads.a0,a1,a2.4.bias"]), rtol=0, atol=5e-6)


def test_fusion_config_mapping():
    from mtl.interop.adapterhub_fusion import fusion_config_from_adapterhub

    dynamic = fusion_config_from_adapterhub(AH_FUSION["dynamic"], "f.json")
    assert (dynamic.type, dynamic.value, dynamic.value_initialized, dynamic.regularization, dynamic.reg_weight,
            dynamic.temperature, dynamic.dropout_prob) == ("dynamic", True, True, True, 0.01, False, None)
    static = fusion_config_from_adapterhub("static", "f.json")  # a preset name, as add_adapter_fusion takes it
    assert (static.type, static.value, static.regularization) == ("static", False, False)
    # regularization without a value matrix does nothing in AdapterHub; mtl refuses the pair, so it becomes false
    assert not fusion_config_from_adapterhub({**AH_FUSION["static"], "regularization": True}, "f.json").regularization
    # AdapterHub reads dropout_prob 0 as "the backbone's attention dropout", as mtl reads null
    assert fusion_config_from_adapterhub({**AH_FUSION["dynamic"], "dropout_prob": 0}, "f.json").dropout_prob is None
    annealed = fusion_config_from_adapterhub({**AH_FUSION["dynamic"], "temperature": True}, "f.json")
    assert annealed.temperature and annealed.temperature_at(0) == 50.0 and annealed.temperature_at(None) == 1.0
    # AdapterHub subtracts 50 / 1000 per forward call: 1.05 after 979 calls, 1 from the 980th on
    assert annealed.temperature_at(979) == pytest.approx(1.05) and annealed.temperature_at(980) == 1.0


FUSION_UNSUPPORTED = [("query", False), ("key", False), ("value", "yes"), ("value_initialized", "true"),
                      ("dropout_prob", 1.5), ("new_field", 1), ("temperature", None)]


@pytest.mark.parametrize("key,value", FUSION_UNSUPPORTED, ids=[f"{k}={v}" for k, v in FUSION_UNSUPPORTED])
def test_unsupported_fusion_config_is_one_line_error(tmp_path, key, value):
    _fusion_setup(tmp_path, "pfeiffer", {**AH_FUSION["dynamic"], key: value}, head={})
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    with pytest.raises(MTLConfigError) as err:
        load_adapterhub_fusion(model, tmp_path / "fusion")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "fusion" / "adapter_fusion_config.json") in message
    assert f"config.{key}" in message or f"'{key}'" in message
    assert model.tasks == ["a0", "a1", "a2"] and model.fusion_configs == {}


def test_fusion_missing_field_and_foreign_config(tmp_path):
    cfg = dict(AH_FUSION["dynamic"])
    del cfg["residual_before"]
    _fusion_setup(tmp_path, "pfeiffer", cfg, head={})
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    with pytest.raises(MTLConfigError, match=r"adapter_fusion_config.json: config.residual_before: missing"):
        load_adapterhub_fusion(model, tmp_path / "fusion")
    with pytest.raises(MTLConfigError, match=r"adapter_fusion_config.json: not found"):
        load_adapterhub_fusion(model, tmp_path / "a0")  # an adapter folder, not a fusion
    assert model.fusion_configs == {}


def test_fusion_needs_its_adapters_at_the_same_locations(tmp_path):
    _fusion_setup(tmp_path, "pfeiffer", AH_FUSION["dynamic"], head={})
    model = MTLModel(tiny_backbone("bert"))
    load_adapterhub(model, tmp_path / "a0")
    with pytest.raises(MTLConfigError, match=r"adapter_names: \['a1', 'a2'\] not loaded in the model") as err:
        load_adapterhub_fusion(model, tmp_path / "fusion")
    assert "\n" not in str(err.value)
    # loaded under other names: map them in AdapterHub's order
    load_adapterhub(model, tmp_path / "a1", task="b1")
    load_adapterhub(model, tmp_path / "a2", task="b2")
    assert load_adapterhub_fusion(model, tmp_path / "fusion", task="f", adapters=["a0", "b1", "b2"]) == "f"
    assert model.target("f").fused == ("a0", "b1", "b2")
    write_ah(tmp_path / "short", {**AH_PRESETS["pfeiffer"], "leave_out": [0]}, name="a2")
    other = MTLModel(tiny_backbone("bert"))
    _load_adapters(other, tmp_path, ("a0", "a1"))
    load_adapterhub(other, tmp_path / "short", num_labels=2)
    with pytest.raises(MTLConfigError, match="sit at different layers or positions"):
        load_adapterhub_fusion(other, tmp_path / "fusion")
    write_ah(tmp_path / "par", AH_PRESETS["parallel"], name="p0", head={})
    write_ah(tmp_path / "par1", AH_PRESETS["parallel"], name="p1", head={})
    write_ah_fusion(tmp_path / "pfusion", AH_FUSION["dynamic"], ["p0", "p1"])
    load_adapterhub(other, tmp_path / "par")
    load_adapterhub(other, tmp_path / "par1")
    with pytest.raises(MTLConfigError, match=r"pfusion/adapter_fusion_config.json: fusion 'p0_p1'.*must be sequential"):
        load_adapterhub_fusion(other, tmp_path / "pfusion", num_labels=2)
    assert other.fusion_configs == {}


def test_fusion_in_leave_out_layers_is_dropped_and_legacy_bin(tmp_path):
    # AdapterHub keeps (never-run) fusion layers where leave_out removed the adapters; prefix as BertAdapterModel
    cfg, adapters, fusion = _fusion_setup(tmp_path, "pfeiffer", AH_FUSION["dynamic"], {"leave_out": [0]},
                                          head={}, legacy_bin=True, prefix="bert.")
    assert "bert.encoder.layer.0.output.adapter_fusion_layer.a0,a1,a2.query.weight" in fusion
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    load_adapterhub_fusion(model, tmp_path / "fusion")
    assert sorted({k.split(".")[1] for k in model.part_parameters(("fusion", "a0_a1_a2"))}) == ["1"]
    batch = tiny_batch()
    unprefixed = {k.removeprefix("bert."): v for k, v in fusion.items()}
    with torch.no_grad():
        expected = fusion_reference(cfg, adapters, AH_FUSION["dynamic"], unprefixed, ["a0", "a1", "a2"])(**batch)
    torch.testing.assert_close(mtl_hidden(model, "a0_a1_a2", batch), expected.last_hidden_state, rtol=0, atol=5e-6)


def test_fusion_bad_tensors_head_and_pickles(tmp_path, capsys):
    _fusion_setup(tmp_path, "pfeiffer", AH_FUSION["dynamic"])  # saved as AdapterHub's default: without a head
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    with pytest.raises(MTLConfigError, match="fusion: no head_config.json; pass num_labels to import the fusion"):
        load_adapterhub_fusion(model, tmp_path / "fusion")
    weights = tmp_path / "fusion" / "model_adapter_fusion.safetensors"
    tensors = load_file(str(weights))
    good = dict(tensors)
    tensors["encoder.layer.1.output.adapter_fusion_layer.a0,a1,a2.query.weight"] = torch.zeros(HIDDEN, 3)
    save_file(tensors, str(weights))
    with pytest.raises(MTLConfigError, match=r"fusions.1.ffn.query.weight has shape \(64, 3\), expected \(64, 64\)"):
        load_adapterhub_fusion(model, tmp_path / "fusion", num_labels=2)
    tensors["encoder.layer.1.output.adapter_fusion_layer.other.query.weight"] = torch.zeros(HIDDEN, HIDDEN)
    save_file(tensors, str(weights))
    with pytest.raises(MTLConfigError, match="tensor 'encoder.layer.1.output.adapter_fusion_layer.other.query.weight' "
                                             "is not a tensor of fusion 'a0,a1,a2'"):
        load_adapterhub_fusion(model, tmp_path / "fusion", num_labels=2)
    weights.unlink()
    marker = tmp_path / "unpickled"
    torch.save({**good, "extra": _Payload(marker)}, tmp_path / "fusion" / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(MTLConfigError, match="pytorch_model_adapter_fusion.bin: holds pickled Python objects"):
        load_adapterhub_fusion(model, tmp_path / "fusion", num_labels=2)
    assert not marker.exists() and model.fusion_configs == {}
    torch.save(good, tmp_path / "fusion" / "pytorch_model_adapter_fusion.bin")
    load_adapterhub_fusion(model, tmp_path / "fusion", num_labels=2)
    assert "importing the fusion with a fresh 2-label classification head" in capsys.readouterr().err
    assert model.heads["a0_a1_a2"].num_outputs == 2


def test_other_heads_and_fusions_saved_alongside_are_skipped(tmp_path):
    # AdapterHub's head and fusion savers match "heads.<name>" / "adapter_fusion_layer.<name>" as substrings, so the
    # file of head 'a0' also holds the head of fusion 'a0,a1,a2', and fusion 'a0,a1,a2' those of 'a0,a1,a2,x'
    _, _, fusion = _fusion_setup(tmp_path, "pfeiffer", AH_FUSION["dynamic"], head={})
    head_file = tmp_path / "a0" / "model_head.safetensors"
    mine = load_file(str(head_file))
    save_file({**mine, **{k: v for k, v in fusion.items() if k.startswith("heads.")}}, str(head_file))
    fusion_file = tmp_path / "fusion" / "model_adapter_fusion.safetensors"
    extra = {k.replace(".a0,a1,a2.", ".a0,a1,a2,x."): v + 1 for k, v in load_file(str(fusion_file)).items()}
    save_file({**load_file(str(fusion_file)), **extra}, str(fusion_file))
    model = MTLModel(tiny_backbone("bert"))
    _load_adapters(model, tmp_path)
    load_adapterhub_fusion(model, tmp_path / "fusion")
    assert torch.equal(model.task_parameters("a0")["head.out.weight"], mine["heads.a0.4.weight"])
    assert torch.equal(model.task_parameters("a0_a1_a2")["fusions.1.ffn.key.bias"],
                       fusion["encoder.layer.1.output.adapter_fusion_layer.a0,a1,a2.key.bias"])
    # a head that is not named like this one is still an error
    save_file({**mine, "heads.b0.1.bias": torch.zeros(HIDDEN)}, str(head_file))
    with pytest.raises(MTLConfigError, match="tensor 'heads.b0.1.bias' is not a layer of head 'a0'"):
        load_adapterhub(model, tmp_path / "a0", task="again")


def _random_fusion(family: str, fusion: dict | str = "dynamic", adapter: dict | str = "pfeiffer") -> MTLModel:
    model = MTLModel(tiny_backbone(family))
    for i in range(3):
        model.add_task(f"t{i}", 3, adapter, pooling="cls", labels=LABELS)
    model.add_fusion("fz", ["t0", "t1", "t2"], 2, fusion, pooling="cls", labels=["no", "yes"])
    for i, task in enumerate(model.tasks):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_fusion_export_import_round_trip_is_bit_identical(tmp_path, family):
    model, batch = _random_fusion(family), tiny_batch()
    for task in ("t0", "t1", "t2"):
        save_adapterhub(model, task, tmp_path / "a" / task)
    first = save_adapterhub_fusion(model, "fz", tmp_path / "a" / "fz")
    assert sorted(p.name for p in first.iterdir()) == ["adapter_fusion_config.json", "head_config.json",
                                                       "model_adapter_fusion.safetensors", "model_head.safetensors"]
    saved = json.loads((first / "adapter_fusion_config.json").read_text())
    assert (saved["name"], saved["adapter_names"], saved["config"]) == ("fz", ["t0", "t1", "t2"], AH_FUSION["dynamic"])
    loaded = MTLModel(tiny_backbone(family))
    for task in ("t0", "t1", "t2"):
        load_adapterhub(loaded, tmp_path / "a" / task)
    assert load_adapterhub_fusion(loaded, first) == "fz"
    assert loaded.fusion_configs["fz"].to_dict() == model.fusion_configs["fz"].to_dict()
    for key, p in model.task_parameters("fz").items():
        assert torch.equal(loaded.task_parameters("fz")[key], p), key
    assert torch.equal(loaded(**batch, tasks="fz")["fz"], model(**batch, tasks="fz")["fz"])
    second = save_adapterhub_fusion(loaded, "fz", tmp_path / "b" / "fz")
    for file in first.iterdir():
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name


def test_fusion_export_writes_placeholders_where_adapterhub_has_unused_layers(tmp_path):
    model = _random_fusion("bert", "static", {"type": "houlsby", "drop_first": 1})
    out = save_adapterhub_fusion(model, "fz", tmp_path / "fz")
    tensors = load_file(str(out / "model_adapter_fusion.safetensors"))
    base = "bert.encoder.layer.0.{}.adapter_fusion_layer.fz."  # with the model prefix AdapterHub's loader needs
    for location in ("attention.output", "output"):  # layer 0 has no adapter: AdapterHub never runs this layer
        assert torch.equal(tensors[base.format(location) + "query.weight"], torch.zeros(HIDDEN, HIDDEN))
        assert base.format(location) + "value.weight" not in tensors  # static: no value matrix
    assert len(tensors) == LAYERS * 2 * 4
    loaded = MTLModel(tiny_backbone("bert"))
    for task in ("t0", "t1", "t2"):
        load_adapterhub(loaded, save_adapterhub(model, task, tmp_path / task))
    load_adapterhub_fusion(loaded, out)
    assert sorted(loaded.part_parameters(("fusion", "fz"))) == sorted(model.part_parameters(("fusion", "fz")))
    batch = tiny_batch()
    assert torch.equal(loaded(**batch, tasks="fz")["fz"], model(**batch, tasks="fz")["fz"])


def test_fusion_export_rules(tmp_path, capsys):
    model = _random_fusion("bert", {"type": "dynamic", "reg_weight": 0.1, "temperature": True})
    save_adapterhub_fusion(model, "fz", tmp_path / "fz")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reg_weight 0.1 (AdapterHub: 0.01)" in err[0] and "temperature schedule" in err[0]
    with pytest.raises(MTLConfigError, match="already exists"):
        save_adapterhub_fusion(model, "fz", tmp_path / "fz")
    with pytest.raises(MTLConfigError, match="'t0' is not a fusion; export it with save_adapterhub\(model"):
        save_adapterhub_fusion(model, "t0", tmp_path / "t0")
    with pytest.raises(MTLConfigError, match="'fz' is a fusion"):
        save_adapterhub(model, "fz", tmp_path / "t0")
    model.fusion_configs["fz"].temperature_end = 2.0
    with pytest.raises(MTLConfigError, match="temperature_end 2.0 is not expressible"):
        save_adapterhub_fusion(model, "fz", tmp_path / "hot")
    assert not (tmp_path / "hot").exists()
    mean = _random_fusion("bert")
    mean.add_fusion("fm", ["t0", "t1"], 2)  # mean pooling: AdapterHub's heads cannot express it
    out = save_adapterhub_fusion(mean, "fm", tmp_path / "fm")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_fusion_config.json", "model_adapter_fusion.safetensors"]
    assert "exported fusion 'fm' without its head" in capsys.readouterr().err


# ---- train.py import-adapterhub -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ah_dir(tiny_dir, tmp_path_factory) -> dict:
    """AdapterHub folders for the tiny CLI backbone (hidden 32): adapters a0, a1 (saved as save_all_adapters does, in
    one parent folder) and a fusion 'a0,a1' over them, each with its head; and the model that wrote them."""
    root = tmp_path_factory.mktemp("ah")
    model = MTLModel(str(tiny_dir))
    for name in ("a0", "a1"):
        model.add_task(name, 3, "pfeiffer", pooling="cls", labels=LABELS)
    model.add_fusion("fz", ["a0", "a1"], 2, "dynamic", pooling="cls", labels=["no", "yes"])
    for i, task in enumerate(model.tasks):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    for name in ("a0", "a1"):
        save_adapterhub(model, name, root / "adapters" / name)
    fusion = save_adapterhub_fusion(model, "fz", root / "fusion")
    # AdapterHub's default fusion name: the adapters' names joined by ','
    config = json.loads((fusion / "adapter_fusion_config.json").read_text())
    (fusion / "adapter_fusion_config.json").write_text(json.dumps({**config, "name": "a0,a1"}))
    head = json.loads((fusion / "head_config.json").read_text())
    (fusion / "head_config.json").write_text(json.dumps({**head, "name": "a0,a1"}))
    for file in ("model_adapter_fusion.safetensors", "model_head.safetensors"):
        tensors = load_file(str(fusion / file))
        save_file({k.replace(".fz.", ".a0,a1."): v for k, v in tensors.items()}, str(fusion / file))
    return {"root": root, "model": model.eval()}


def test_import_adapterhub_command_makes_a_run_folder(ah_dir, tiny_dir, task_dir, tmp_path, capsys):
    from tests.test_hardening import run_cli

    run = tmp_path / "run"
    code, lines = run_cli(["import-adapterhub", str(ah_dir["root"] / "adapters"), str(ah_dir["root"] / "fusion"),
                           "--backbone", str(tiny_dir), "--run_dir", str(run)], capsys)
    assert code == 0, lines
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["a0", "a1"]
    assert [p.name for p in (run / "fusions").iterdir()] == ["a0_a1"]
    # mtl's own format now: the same outputs as the model that wrote the AdapterHub folders
    loaded, source, batch = MTLModel.from_pretrained(run).eval(), ah_dir["model"], tiny_batch()
    assert loaded.target("a0_a1").fused == ("a0", "a1")
    for task, theirs in (("a0", "a0"), ("a1", "a1"), ("a0_a1", "fz")):
        assert torch.equal(loaded(**batch, tasks=task)[task], source(**batch, tasks=theirs)[theirs]), task
    # predict through the CLI: one row per text and task, labels from AdapterHub's label2id
    texts, out = tmp_path / "texts.txt", tmp_path / "pred.jsonl"
    texts.write_text("alpha beta river\nstone cloud green seven\n")
    code, lines = run_cli(["predict", "--model.backbone", str(tiny_dir), "--model.load_from", str(run),
                           "--model.run_dir", str(run), "--data.tasks", "[]", "--data.predict_file", str(texts),
                           "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
                           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                           "--trainer.callbacks+=mtl.predict.PredictionWriter", f"--trainer.callbacks.output={out}"],
                          capsys)
    assert code == 0, lines
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task"], r["index"]) for r in rows) == [(t, i) for t in ("a0", "a0_a1", "a1") for i in (0, 1)]
    assert {r["label"] for r in rows if r["task"] == "a0_a1"} <= {"no", "yes"}
    assert {r["label"] for r in rows if r["task"] == "a0"} <= set(LABELS)
    # fit a new fusion over the imported adapters (they stay frozen), exported beside them
    code, lines = run_cli(["fit", "--model.backbone", str(tiny_dir), "--model.load_from", str(run),
                           "--model.run_dir", str(run), "--data.tasks", "[keyword]", "--data.tasks_dir",
                           str(task_dir), "--data.cache_dir", str(tmp_path / "cache"), "--model.fusion.name", "kf",
                           "--model.fusion.adapters", "[a0, a1]", "--data.max_train_examples", "16",
                           "--trainer.max_epochs", "1", "--trainer.logger", "false",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                           "--trainer.default_root_dir", str(tmp_path / "lightning")], capsys)
    assert code == 0, lines
    refit = MTLModel.from_pretrained(run)
    assert refit.target("kf").fused == ("a0", "a1")
    assert torch.equal(refit.task_parameters("a0")["adapters.1.ffn.up.weight"],
                       loaded.task_parameters("a0")["adapters.1.ffn.up.weight"])


def test_import_adapterhub_adds_to_a_run_folder_and_renames(ah_dir, tiny_dir, tmp_path, capsys):
    from tests.test_hardening import run_cli

    run = tmp_path / "run"
    common = ["--backbone", str(tiny_dir), "--run_dir", str(run)]
    assert run_cli(["import-adapterhub", str(ah_dir["root"] / "adapters"), *common], capsys)[0] == 0
    code, lines = run_cli(["import-adapterhub", str(ah_dir["root"] / "fusion"), "--task", "fused", *common], capsys)
    assert code == 0, lines
    assert [p.name for p in (run / "fusions").iterdir()] == ["fused"]
    code, lines = run_cli(["import-adapterhub", str(ah_dir["root"] / "adapters" / "a0"), *common], capsys)
    assert code == 2 and lines == [f"error: {ah_dir['root'] / 'adapters' / 'a0'}: task 'a0' exists ({run} already "
                                   "has it); convert it with --task NEWNAME"]
    code, lines = run_cli(["import-adapterhub", str(ah_dir["root"] / "adapters" / "a0"), "--task", "b0", *common],
                          capsys)
    assert code == 0 and sorted(p.name for p in (run / "adapters").iterdir()) == ["a0", "a1", "b0"]


def _bad_folders(root: Path, ah_dir: dict, tiny_dir: Path) -> dict[str, tuple[list[str], str]]:
    """argv (after the command) -> the expected error, for inputs that must write nothing."""
    adapters = ah_dir["root"] / "adapters"
    (root / "empty").mkdir()
    (root / "mixed").mkdir()
    shutil.copytree(adapters / "a0", root / "mixed" / "a0")
    (root / "mixed" / "notes").mkdir()
    model = MTLModel(str(tiny_dir))
    model.add_task("mine", 2)
    model_files.save_task(model, "mine", root / "mtl")
    shutil.copytree(adapters / "a0", root / "headless")
    for file in ("head_config.json", "model_head.safetensors"):
        (root / "headless" / file).unlink()
    shutil.copytree(adapters / "a0", root / "phm")
    config = json.loads((root / "phm" / "adapter_config.json").read_text())
    (root / "phm" / "adapter_config.json").write_text(json.dumps({**config, "config": {**config["config"],
                                                                                       "phm_layer": True}}))
    backbone = ["--backbone", str(tiny_dir)]
    return {
        "empty": ([str(root / "empty"), *backbone], f"{root / 'empty'}: no adapter_config.json or "
                  "adapter_fusion_config.json; expected an AdapterHub save_adapter / save_adapter_fusion folder, or "
                  "a folder of them"),
        "stray subfolder": ([str(root / "mixed"), *backbone], "(subfolder notes has neither)"),
        "mtl export": ([str(root / "mtl" / "mine"), *backbone], "an mtl export, not AdapterHub's; use its run folder "
                       "with --model.load_from as it is"),
        "no backbone": ([str(adapters)], "import-adapterhub: the following arguments are required: --backbone"),
        "task with two": ([str(adapters), "--task", "x", *backbone], "--task names one imported part, but 2 folders"),
        "headless": ([str(root / "headless"), *backbone], "no head_config.json (saved without its head)"),
        "unsupported": ([str(root / "phm"), *backbone], f"{root / 'phm' / 'adapter_config.json'}: config.phm_layer"),
        "fusion alone": ([str(ah_dir["root"] / "fusion"), *backbone], "adapter_names: ['a0', 'a1'] not loaded"),
        "other backbone": ([str(adapters), "--backbone", "minilm-l6"], "hidden_size is 32 but the backbone has 384"),
    }


def test_import_adapterhub_bad_input_is_one_line_and_writes_nothing(ah_dir, tiny_dir, tmp_path, capsys):
    from tests.test_hardening import run_cli

    for case, (argv, expected) in _bad_folders(tmp_path, ah_dir, tiny_dir).items():
        run = tmp_path / "run"
        code, lines = run_cli(["import-adapterhub", *argv, "--run_dir", str(run)], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, lines)
        assert not run.exists(), case


# ---- question-answering heads (mtl's extractive_qa QAHead) ---------------------------------------------------------
def test_a_qa_head_exports_as_adapterhubs_and_imports_back_bit_identical(tmp_path):
    model, batch = MTLModel(tiny_backbone("bert")), tiny_batch()
    model.add_task("qa", 2, "pfeiffer", problem="extractive_qa", labels=[], head_dropout=0.1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.task_parameters("qa").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    first = save_adapterhub(model, "qa", tmp_path / "a" / "qa", with_head=True)
    # exactly the keys AdapterHub's QuestionAnsweringHead(model, name, **config) takes
    assert json.loads((first / "head_config.json").read_text())["config"] == {
        "head_type": "question_answering", "num_labels": 2, "layers": 1, "activation_function": "tanh",
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "dropout_prob": 0.1}  # AdapterHub's add_qa_head writes these names
    head = load_file(str(first / "model_head.safetensors"))
    assert sorted(head) == ["heads.qa.1.bias", "heads.qa.1.weight"] and head["heads.qa.1.weight"].shape == (2, HIDDEN)
    loaded = MTLModel(tiny_backbone("bert"))
    assert load_adapterhub(loaded, first) == "qa"
    assert loaded.heads["qa"].settings() == model.heads["qa"].settings() and not loaded.records["qa"].labels
    logits = loaded(**batch, tasks="qa")["qa"]
    assert torch.equal(logits, model(**batch, tasks="qa")["qa"])
    # AdapterHub's head: the same Linear on every token; mtl's gives padding the lowest logit (never an answer)
    with torch.no_grad():
        plain = F.linear(model.encode(batch["input_ids"], batch["attention_mask"], None,
                                      [(model.target("qa"), slice(None))]), head["heads.qa.1.weight"],
                         head["heads.qa.1.bias"])
    real = batch["attention_mask"].bool()
    assert torch.equal(logits[real], plain[real]) and (logits[~real] == torch.finfo(logits.dtype).min).all()
    second = save_adapterhub(loaded, "qa", tmp_path / "b" / "qa")
    for file in first.iterdir():
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name


# ---- multiple-choice heads (mtl's multiple_choice TaskHead with one output) ------------------------------------------
def test_a_choice_head_exports_as_adapterhubs_and_imports_back_bit_identical(tmp_path):
    model, batch = MTLModel(tiny_backbone("bert")), tiny_batch(rows=6)
    model.add_task("mc", 1, "pfeiffer", problem="multiple_choice", pooling="cls", labels=["A", "B", "C"],
                   head_dropout=0.1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.task_parameters("mc").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    first = save_adapterhub(model, "mc", tmp_path / "a" / "mc", with_head=True)
    # exactly the keys AdapterHub's MultipleChoiceHead(model, name, **config) takes
    assert json.loads((first / "head_config.json").read_text())["config"] == {
        "head_type": "multiple_choice", "num_choices": 3, "layers": 2, "activation_function": "tanh",
        "label2id": {"A": 0, "B": 1, "C": 2}, "use_pooler": False, "dropout_prob": 0.1}
    head = load_file(str(first / "model_head.safetensors"))
    assert sorted(head) == ["heads.mc.1.bias", "heads.mc.1.weight", "heads.mc.4.bias", "heads.mc.4.weight"]
    assert head["heads.mc.4.weight"].shape == (1, HIDDEN)
    loaded = MTLModel(tiny_backbone("bert"))
    assert load_adapterhub(loaded, first) == "mc"
    assert loaded.heads["mc"].settings() == model.heads["mc"].settings()
    assert loaded.records["mc"].labels == ["A", "B", "C"] and loaded.heads["mc"].problem == "multiple_choice"
    scores = loaded(**batch, tasks="mc")["mc"]
    assert scores.shape == (6, 1) and torch.equal(scores, model(**batch, tasks="mc")["mc"])
    second = save_adapterhub(loaded, "mc", tmp_path / "b" / "mc")
    for file in first.iterdir():
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name
    # a head without label names gets its positions' numbers; a head that is not AdapterHub's is refused
    config = json.loads((first / "head_config.json").read_text())
    config["config"]["label2id"] = None
    (first / "head_config.json").write_text(json.dumps(config))
    again = MTLModel(tiny_backbone("bert"))
    load_adapterhub(again, first)
    assert again.records["mc"].labels == ["0", "1", "2"]
    config["config"]["num_choices"] = 1
    (first / "head_config.json").write_text(json.dumps(config))
    with pytest.raises(MTLConfigError, match=r"head_config.json: config.num_choices is 1, expected an integer >= 2"):
        load_adapterhub(MTLModel(tiny_backbone("bert")), first)
