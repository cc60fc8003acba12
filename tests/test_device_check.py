"""benchmarks/device_check.py on the CPU (--device cpu --smoke): the GPU check's own code runs end to end on a tiny
random BERT, so an API change that breaks it fails here instead of on the next GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def device_check(monkeypatch):
    """The script as a module, imported as when it runs from benchmarks/."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "device_check", raising=False)
    import device_check

    return device_check


def test_the_smoke_run_checks_everything_and_prints_the_table(device_check, capsys):
    device_check.main(["--device", "cpu", "--smoke"])
    out = capsys.readouterr().out
    for preset in ("pfeiffer", "houlsby", "parallel"):
        assert f"identity on cpu, {preset}: max |diff| = 0\n" in out  # a fresh adapter changes nothing, exactly
    assert "multi-task forward vs separate on cpu: max |diff| = 0\n" in out
    assert "bf16-mixed Lightning fit, 4 steps: val acc " in out and "backbone unchanged: True" in out
    assert "exported adapter on cpu vs cpu: max |logit diff| = 0, same predictions: True" in out
    assert "CPU, 2 layers x hidden 32, batch 4, seq 16, median of 2 steps" in out
    table = [line.split(" | ")[:2] for line in out.splitlines() if line.startswith("| ") and "samples/s" not in line]
    assert table == [["| full fine-tuning", "fp32"], ["| full fine-tuning", "bf16 autocast"], ["| pfeiffer", "fp32"],
                     ["| pfeiffer", "bf16 autocast"]]


def test_without_a_gpu_the_full_check_says_how_to_run_the_smoke_one(device_check, monkeypatch):
    monkeypatch.setattr(device_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here; --device cpu --smoke checks the script itself"):
        device_check.main([])
