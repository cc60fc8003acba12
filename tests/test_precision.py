"""The precision an unset ``trainer.precision`` resolves to (both branches of the hardware check, monkeypatched), and
what bf16 training does to exports and predictions (float32 files and scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from mtl import precision as precision_module
from mtl import storage
from mtl.cli import main
from mtl.precision import auto_precision, cpu_features, resolve_precision
from tests.test_fit_output import assert_export_is, best_weights, cli_for, quickstart


@pytest.mark.parametrize("features, want", [
    ({"avx2", "avx512f", "avx512_bf16"}, ("bf16-mixed", "CPU has AVX512-BF16")),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, ("bf16-mixed", "CPU has AMX-BF16")),
    ({"avx2", "avx512f", "avx512_vnni"}, ("32-true", "CPU without AVX512-BF16 or AMX-BF16")),
    (set(), ("32-true", "CPU without AVX512-BF16 or AMX-BF16")),
])
def test_auto_precision_on_the_cpu(monkeypatch, features, want):
    monkeypatch.setattr(precision_module, "cpu_features", lambda: features)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_precision("auto") == auto_precision("cpu") == want


@pytest.mark.parametrize("capability, native, want", [
    ((9, 0), True, ("bf16-mixed", "GPU NVIDIA H200, compute capability 9.0")),
    ((8, 0), True, ("bf16-mixed", "GPU NVIDIA H200, compute capability 8.0")),
    ((8, 0), False, ("32-true", "GPU without native bf16 (compute capability < 8.0)")),
    ((7, 5), True, ("32-true", "GPU without native bf16 (compute capability < 8.0)")),
])
def test_auto_precision_on_a_cuda_gpu(monkeypatch, capability, native, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    # emulated bf16 (older GPUs) counts only with including_emulation=True, which mtl does not ask for
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx512_bf16"})
    assert auto_precision("auto") == auto_precision("gpu") == want
    assert auto_precision("cpu") == ("bf16-mixed", "CPU has AVX512-BF16")  # the CPU rule when asked for the CPU


def test_an_explicit_precision_wins_and_other_accelerators_stay_fp32(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx512_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision({"precision": "32-true"}) == ("32-true", "precision: 32-true (trainer.precision)")
    assert resolve_precision({"precision": None, "accelerator": "cpu"})[0] == "bf16-mixed"
    assert auto_precision("mps")[0] == auto_precision("gpu")[0] == "32-true"  # no CUDA here: no bf16 rule
    assert auto_precision(CPUAccelerator()) == ("bf16-mixed", "CPU has AVX512-BF16")  # trainer.accelerator class_path


def test_cpu_features_read_proc_cpuinfo_without_torch_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_features(info) and "avx2" in cpu_features(info)
    assert cpu_features(tmp_path / "missing") == set()


def test_the_cli_builds_the_trainer_with_the_resolved_precision(tiny_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx512_bf16"})
    assert cli_for(tiny_dir, task_dir, tmp_path).trainer.precision == "bf16-mixed"
    assert cli_for(tiny_dir, task_dir, tmp_path, "--trainer.precision", "32-true").trainer.precision == "32-true"
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx2"})
    assert cli_for(tiny_dir, task_dir, tmp_path).trainer.precision == "32-true"


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_exports_float32_adapters_equal_to_the_best_checkpoint(tiny_dir, task_dir, tmp_path, capfd,
                                                                            precision):
    main(["fit", *quickstart(tiny_dir, task_dir, tmp_path, "--trainer.enable_progress_bar", "false",
                             "--trainer.precision", precision)])
    assert f"precision: {precision} (trainer.precision)" in capfd.readouterr().out
    best = next((tmp_path / "run").rglob("best.ckpt"))
    trained = storage.read_checkpoint(best)["state_dict"]
    # bf16-mixed keeps float32 parameters (autocast); bf16-true trains them in bf16
    assert {v.dtype for v in trained.values()} == {torch.float32 if precision == "bf16-mixed" else torch.bfloat16}
    assert_export_is(best_weights(tiny_dir, task_dir, best, tmp_path), tmp_path / "run")  # upcasting bf16 is exact


def test_bf16_predict_scores_are_float32_softmax(tiny_dir, task_dir, tmp_path):
    main(["fit", *quickstart(tiny_dir, task_dir, tmp_path, "--trainer.enable_progress_bar", "false",
                             "--model.test_after_fit", "false", "--trainer.precision", "32-true")])
    (tmp_path / "texts.txt").write_text("".join(f"alpha {w} stone river {i}\n" for i, w in
                                               enumerate(["good", "bad", "green", "seven"] * 4)))
    rows = {}
    for precision in ("bf16-mixed", "32-true"):
        (tmp_path / "predict.yaml").write_text(
            "trainer:\n  logger: false\n  callbacks:\n    - class_path: mtl.predict.PredictionWriter\n"
            f"      init_args: {{output: '{tmp_path / precision}.jsonl'}}\n")
        main(["predict", "--config", str(tmp_path / "predict.yaml"), "--model.backbone", str(tiny_dir),
              "--model.load_from", str(tmp_path / "run"), "--model.run_dir", str(tmp_path / "run"),
              "--data.tasks", "[]", "--data.tasks_dir", str(task_dir), "--data.predict_file", str(tmp_path / "texts.txt"),
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.precision", precision])
        rows[precision] = [json.loads(line) for line in (tmp_path / f"{precision}.jsonl").read_text().splitlines()]
    bf16, fp32 = rows["bf16-mixed"], rows["32-true"]
    assert len(bf16) == len(fp32) == 16
    assert max(abs(a["score"] - b["score"]) for a, b in zip(bf16, fp32)) < 0.02
    # softmax in float32 over the bf16 logits: scores off bf16's 8-bit grid (a bf16 softmax gives only grid values)
    assert any(float(torch.tensor(r["score"]).bfloat16()) != r["score"] for r in bf16)
