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
    for name in ("backbones", "train_throughput", "multitask_inference", "base_size"):
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


def _fake_train(name: str, samples_s: float, rss: float, layers: int = 12, k: int = 0, forward_s: float = 1.0,
                backward_s: float = 1.4, trainable: int = 1000) -> dict:
    """A row as ``train_throughput.py --one NAME`` prints it."""
    return {"name": name, "trainable": trainable, "step_s": 8 / samples_s, "forward_s": forward_s,
            "backward_s": backward_s, "samples_s": samples_s, "peak_rss_mb": rss, "layers": layers, "k": k,
            "backbone": "random bert 'bert-base' (seed 0; mirrors x): 12 layers"}


def _fake_multitask(k: int, ratio: float, limit: float, layers: int = 12) -> dict:
    return {"n": 8, "k": k, "layers": layers, "ratio": ratio, "one_rows_s": 8.0 * ratio, "sep_rows_s": 8.0,
            "limit": limit, "line": "..."}


def test_base_size_tables_on_fake_rows(bench):
    """benchmarks/base_size.py: the ratios and both tables from fake rows (no subprocess): Pfeiffer is the median of
    its rounds, its RSS and forward/backward split come from the median round, AdapterDrop sits beside its limit,
    AdapterHub's median beside mtl's, and failed or missing rows print as '-' with a note."""
    import base_size

    bert = {"shape": "bert-base", "spec": "bert-base", "wall_s": 600.0,
            "full": _fake_train("full fine-tuning", 2.0, 2000.0, trainable=109_486_085),
            "pfeiffer": [_fake_train("pfeiffer", 3.0, 900.0, forward_s=9.0),
                         _fake_train("pfeiffer", 4.0, 1100.0, forward_s=9.0),
                         _fake_train("pfeiffer", 3.5, 1000.0, trainable=1_489_925)],
            "adapterdrop": _fake_train("pfeiffer + AdapterDrop k=L/2", 4.2, 950.0, k=6),
            "multitask": {"lines": [_fake_multitask(6, 1.6, 1.85), _fake_multitask(0, 0.98, 1.0)],
                          "peak_rss_mb": 800.0},
            "peer": {"check": {"row": "sanity check", "status": "OK", "note": None},
                     "rounds": [{"row": "train pfeiffer k=0", "value": v, "trainable": 1_489_925,
                                 "backbone": "BertAdapterModel.from_config: ...", "note": None}
                                for v in (3.0, 2.8, 3.2)]}}
    d = base_size.derive(bert)
    assert d["pf_samples_s"] == 3.5 and d["pf_rss_mb"] == 1000.0 and d["pf_vs_full"] == pytest.approx(1.75)
    assert d["ad_limit"] == pytest.approx(2.4 / 1.7)  # L(f+b)/(Lf+(L-k)b), f=1.0, b=1.4 of the median round
    assert d["ad_ratio"] == pytest.approx(1.2) and d["mtl_vs_peer"] == pytest.approx(3.5 / 3.0)
    modern = {"shape": "modernbert-base", "spec": "modernbert-base",
              "full": {"error": "exit 1: RuntimeError: boom"},
              "pfeiffer": [_fake_train("pfeiffer", 5.0, 700.0, layers=22)],
              "adapterdrop": _fake_train("pfeiffer + AdapterDrop k=L/2", 6.0, 650.0, layers=22, k=11),
              "multitask": {"error": "exit 1: x"},
              "peer": {"check": {"row": "sanity check", "status": "OK", "note": "adapters.init added a bias"},
                       "rounds": [{"row": "train pfeiffer k=0", "value": 4.0, "note": "adapters.init added a bias"}]}}
    deberta = {"shape": "deberta-v3-base", "spec": "deberta-v3-base", "peer": None,
               "full": _fake_train("full fine-tuning", 1.0, 3000.0),
               "pfeiffer": [_fake_train("pfeiffer", 2.0, 1500.0)],
               "adapterdrop": _fake_train("pfeiffer + AdapterDrop k=L/2", 2.5, 1400.0, k=6),
               "multitask": {"lines": [_fake_multitask(0, 1.0, 1.0), _fake_multitask(6, 1.5, 1.85)]}}
    table = base_size.summary_table([bert, modern, deberta])
    lines = table.splitlines()
    assert lines[0].startswith("| shape | Pfeiffer samples/s | vs full FT | peak RSS Pfeiffer / full (MB) |")
    assert lines[0].endswith("| AdapterHub Pfeiffer samples/s | mtl / AdapterHub |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[:5])
    assert lines[2] == ("| bert-base | 3.50 | 1.75x | 1000 / 2000 (0.50x) | k=6: 1.20x of limit 1.41x (85%) "
                        "| 0.98x (limit 1.00x, 98%) | 1.60x (limit 1.85x, 86%) | 3.00 | 1.17x |")
    assert lines[3] == ("| modernbert-base | 5.00 | - | 700 / - | k=11: 1.20x of limit 1.41x (85%) | - | - "
                        "| 4.00 [1] | 1.25x |")
    assert lines[4].startswith("| deberta-v3-base | 2.00 | 2.00x |") and lines[4].endswith("| not run | - |")
    assert "[1] modernbert-base: adapters.init added a bias." in table
    assert "modernbert-base: 2 mtl measurement(s) failed" in table
    settings = {"steps": 3, "batch": 8, "seq": 128, "threads": 2, "infer_batch": 4, "repeats": 3, "peer_rounds": 3}
    shape = base_size.shape_table(bert, settings)
    assert shape.startswith("### bert-base\n\nBackbone: random bert 'bert-base'")
    assert "| Pfeiffer vs full fine-tuning, training samples/s (Pfeiffer: median of 3) | 3.50 | 2.00 | 1.75x |" in shape
    assert "| peak RSS (MB), Pfeiffer vs full fine-tuning | 1000 | 2000 | 0.50x | - | - |" in shape
    assert ("| AdapterDrop k=6 of L=12 vs Pfeiffer k=0, training samples/s | 4.20 | 3.50 | 1.20x | 1.41x | 85% |"
            in shape)
    rows = [line for line in shape.splitlines() if line.startswith("| one 8-task forward")]
    assert [r.split(",")[1].strip().split(" ")[0] for r in rows] == ["k=0", "k=6"]  # k=0 first
    assert "| 1.60x | 1.85x | 86% |" in rows[1]
    assert ("| mtl Pfeiffer vs AdapterHub `train pfeiffer k=0`, training samples/s (medians of 3 alternating rounds) "
            "| 3.50 | 3.00 | 1.17x | - | - |") in shape
    assert "Pfeiffer rounds (samples/s): mtl 3.00, 4.00, 3.50; AdapterHub 3.00, 2.80, 3.20." in shape
    assert "zero-adapter sanity check OK" in shape and "Wall time for this shape: 10.0 min." in shape
    broken = base_size.shape_table(modern, settings)
    assert "FAILED full fine-tuning: exit 1: RuntimeError: boom" in broken
    assert "FAILED multitask_inference: exit 1: x" in broken
    assert "AdapterHub note: adapters.init added a bias." in broken
    assert "| one 8-task forward vs 8 separate forwards | - | - | - | - | - |" in broken


def test_base_size_reads_what_the_scripts_print(bench, tmp_path, capsys):
    """The driver parses train_throughput's --one row and multitask_inference's summary lines (both run in-process
    here on a tiny BERT, as the driver's subprocesses would print them)."""
    import base_size
    import multitask_inference
    import train_throughput

    shape = tiny_shape(bench, "bert-base", tmp_path)
    common = ["--backbone-config", str(shape), "--seq", "16", "--threads", "1"]
    rows = {}
    for name in ("full fine-tuning", "pfeiffer", "pfeiffer + AdapterDrop k=L/2"):
        train_throughput.main([*common, "--steps", "1", "--batch", "2", "--one", name])
        rows[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    multitask_inference.main([*common, "--tasks", "8", "--batch", "2", "--repeats", "1"])
    parsed = base_size.parse_multitask(capsys.readouterr().out)
    assert [(line["n"], line["k"], line["layers"]) for line in parsed["lines"]] == [(8, 0, 2), (8, 1, 2)]
    assert parsed["peak_rss_mb"] > 0 and all(line["limit"] > 0 for line in parsed["lines"])
    result = {"shape": "bert-base-tiny", "full": rows["full fine-tuning"], "pfeiffer": [rows["pfeiffer"]],
              "adapterdrop": rows["pfeiffer + AdapterDrop k=L/2"], "multitask": parsed, "peer": None}
    d = base_size.derive(result)
    assert d["errors"] == [] and d["ad_k"] == 1 and "ad_of_limit" in d and d["mt"]["high"]["k"] == 1
    assert "| bert-base-tiny |" in base_size.summary_table([result])
