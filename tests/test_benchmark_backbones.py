"""benchmarks/backbones: every shipped shape builds its family, a shrunken copy builds a model, and both throughput
scripts run their argparse path in-process on a shrunken random backbone (tiny sizes: this checks the plumbing and
the printed table, never the speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHAPES = sorted((BENCHMARKS / "backbones").glob("*.json"))
EXPECTED = {"bert-base": ("bert", 12, 768), "deberta-v3-base": ("deberta-v2", 12, 768),
            "modernbert-base": ("modernbert", 22, 768)}


@pytest.fixture()
def bench(monkeypatch):
    """The benchmarks folder first on sys.path, as when a script there runs; its modules imported afresh; torch's
    thread count (the scripts set it) restored afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("backbones", "train_throughput", "multitask_inference"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import backbones

    threads = torch.get_num_threads()
    yield backbones
    torch.set_num_threads(threads)


def tiny_shape(bench, name: str, tmp_path: Path) -> Path:
    """``name`` shrunk to 2 layers, hidden 64, 2 heads, intermediate 128, vocab 256, written as a shape file."""
    fields, notes = bench.load_shape(name)
    path = tmp_path / f"{name}-tiny.json"
    path.write_text(json.dumps({"_source": f"{name} shrunk", **bench.shrink(fields)}))
    return path


def test_every_shape_parses_and_builds_its_family(bench):
    assert {p.stem for p in SHAPES} >= set(EXPECTED)
    for path in SHAPES:
        raw = json.loads(path.read_text())
        assert "_source" in raw, f"{path.name}: say which public config it mirrors"
        fields, notes = bench.load_shape(path.stem)
        assert not any(k.startswith("_") for k in fields)
        config = bench.build_config(fields)
        assert config.model_type == raw["model_type"]
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            assert getattr(config, key) == raw[key], (path.name, key)
        if path.stem in EXPECTED:
            assert (config.model_type, config.num_hidden_layers, config.hidden_size) == EXPECTED[path.stem]
        low, high = bench.token_range(config)
        assert 0 <= low < high <= config.vocab_size


def test_shape_details_survive_into_the_config(bench):
    deberta = bench.build_config(bench.load_shape("deberta-v3-base")[0])
    assert (deberta.relative_attention, deberta.position_buckets, deberta.norm_rel_ebd, deberta.share_att_key,
            list(deberta.pos_att_type), deberta.position_biased_input, deberta.type_vocab_size) == \
        (True, 256, "layer_norm", True, ["p2c", "c2p"], False, 0)
    modern = bench.build_config(bench.load_shape("modernbert-base")[0])
    assert (modern.global_attn_every_n_layers, modern.local_attention, modern.norm_bias, modern.mlp_bias,
            modern.attention_bias, modern.pad_token_id) == (3, 128, False, False, False, 50283)
    rope = getattr(modern, "rope_parameters", None)
    if rope is not None:  # transformers 5 keeps the two thetas here
        assert rope["full_attention"]["rope_theta"] == 160000.0 and rope["sliding_attention"]["rope_theta"] == 10000.0


@pytest.mark.parametrize("name", [p.stem for p in SHAPES])
def test_shrunken_copy_builds_a_seeded_model(bench, name):
    small = bench.shrink(bench.load_shape(name)[0])
    model = bench.build_backbone(small, seed=3)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 256)
    for key in bench.TOKEN_ID_KEYS:  # ModernBERT's specials moved inside the small vocabulary
        value = getattr(config, key, None)
        assert value is None or 0 <= value < 256, (key, value)
    state = torch.get_rng_state()
    again = bench.build_backbone(small, seed=3)
    assert torch.equal(state, torch.get_rng_state()), "building must not move the caller's random stream"
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    ids = bench.random_ids(config, 2, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < config.vocab_size
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (2, 8, 64)
    assert name.split("-")[0] in bench.describe(model)


def test_a_bad_shape_is_one_line(bench, tmp_path):
    with pytest.raises(bench.ShapeError, match="neither a shape name"):
        bench.load_shape("no-such-shape")
    (tmp_path / "x.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(bench.ShapeError, match="model_type"):
        bench.load_shape(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"model_type": "not-a-family"}))
    with pytest.raises(bench.ShapeError, match="not-a-family"):
        bench.build_config(bench.load_shape(tmp_path / "y.json")[0])


def test_train_throughput_prints_its_table(bench, tmp_path, capsys):
    import train_throughput

    shape = tiny_shape(bench, "bert-base", tmp_path)
    train_throughput.main(["--backbone-config", str(shape), "--steps", "1", "--batch", "2", "--seq", "16",
                           "--in-process", "--threads", "1"])
    out = capsys.readouterr().out
    assert "Backbone: random bert 'bert-base-tiny'" in out and "2 layers, hidden 64" in out
    assert "| variant | trainable params | samples/s | vs full fine-tuning | peak RSS (MB) |" in out
    for name in train_throughput.VARIANTS:
        assert f"| {name} |" in out
    assert "Pfeiffer vs full fine-tuning:" in out
    assert "AdapterDrop k=1 of L=2 vs Pfeiffer k=0:" in out and "of the limit" in out


def test_train_throughput_one_variant_as_json(bench, tmp_path, capsys):
    import train_throughput

    shape = tiny_shape(bench, "bert-base", tmp_path)
    train_throughput.main(["--backbone-config", str(shape), "--steps", "1", "--batch", "2", "--seq", "16",
                           "--threads", "1", "--one", "pfeiffer"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["name"] == "pfeiffer" and row["layers"] == 2 and row["peak_rss_mb"] > 0
    assert row["forward_s"] > 0 and row["backward_s"] > 0


def test_multitask_inference_prints_its_table(bench, tmp_path, capsys):
    import multitask_inference

    shape = tiny_shape(bench, "bert-base", tmp_path)
    multitask_inference.main(["--backbone-config", str(shape), "--tasks", "1", "8", "--batch", "2", "--seq", "16",
                              "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "Backbone: random bert 'bert-base-tiny'" in out
    assert "| 0 | 8 |" in out and "| 1 | 8 |" in out  # default leave-out: 0 and L/2
    assert "8 tasks, k=0 of L=2: one forward" in out and "8 tasks, k=1 of L=2" in out
    assert "peak RSS:" in out
    for line in out.splitlines():
        if line.startswith("| 0 |") or line.startswith("| 1 |"):
            assert float(line.rstrip(" |").split("|")[-1]) <= 1e-5  # one forward == separate forwards


def test_scripts_refuse_an_unknown_shape(bench, capsys):
    import multitask_inference
    import train_throughput

    for main in (train_throughput.main, multitask_inference.main):
        with pytest.raises(SystemExit) as exc:
            main(["--backbone-config", "no-such-shape", "--steps" if main is train_throughput.main else "--repeats",
                  "1"])
        assert exc.value.code == 2
        assert "neither a shape name (bert-base" in capsys.readouterr().err


def _mtl_supports(model_type: str) -> bool:
    from mtl.arch import ARCHS

    return model_type in ARCHS


@pytest.mark.parametrize("name", ["deberta-v3-base", "modernbert-base"])
def test_both_scripts_on_the_newer_families(bench, tmp_path, capsys, name):
    model_type = EXPECTED[name][0]
    if not _mtl_supports(model_type):
        pytest.skip(f"mtl.arch has no '{model_type}' entry yet")
    import multitask_inference
    import train_throughput

    shape = tiny_shape(bench, name, tmp_path)
    train_throughput.main(["--backbone-config", str(shape), "--steps", "1", "--batch", "2", "--seq", "16",
                           "--in-process", "--threads", "1", "--variants", "full fine-tuning", "pfeiffer",
                           "pfeiffer + AdapterDrop k=L/2"])
    out = capsys.readouterr().out
    assert f"Backbone: random {model_type} '{name}-tiny'" in out
    assert "Pfeiffer vs full fine-tuning:" in out and "AdapterDrop k=1 of L=2 vs Pfeiffer k=0:" in out
    multitask_inference.main(["--backbone-config", str(shape), "--tasks", "8", "--batch", "2", "--seq", "16",
                              "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert f"Backbone: random {model_type} '{name}-tiny'" in out and "8 tasks, k=0 of L=2: one forward" in out
