"""The backbone's attention kernel (``model.attention``): what ``auto`` picks, that both kernels compute the same
layer loop for every family, and that a bf16 fit on the CPU switches to eager while fp32 keeps SDPA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtl.cli import main
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.precision import EAGER_MAX_TOKENS, attention_kernel, check_attention
from tests.conftest import tiny_backbone
from tests.test_fit_output import quickstart
from tests.test_hardening import error_line, run_cli


def fake_backbone(kernel: str, sdpa: bool = True) -> SimpleNamespace:
    """What `check_attention` reads of a backbone."""
    return SimpleNamespace(config=SimpleNamespace(_attn_implementation=kernel, model_type="fake"), _supports_sdpa=sdpa)


@pytest.mark.parametrize("requested, precision, device, loaded, want", [
    ("auto", "bf16-mixed", "cpu", "sdpa", "eager"),
    ("auto", "bf16-true", "cpu", "sdpa", "eager"),
    ("auto", "32-true", "cpu", "sdpa", "sdpa"),
    ("auto", 32, "cpu", "sdpa", "sdpa"),
    ("auto", "bf16-mixed", "cuda", "sdpa", "sdpa"),  # CUDA keeps its fused kernels
    ("auto", "bf16-mixed", "cpu", "eager", "eager"),  # DeBERTa: eager is all it has
    ("auto", "bf16-mixed", "cpu", "flash_attention_2", "flash_attention_2"),  # a kernel the user loaded with
    ("sdpa", "bf16-mixed", "cpu", "eager", "sdpa"),  # an explicit choice wins
    ("eager", "32-true", "cuda", "sdpa", "eager"),
])
def test_auto_picks_eager_only_under_bf16_on_the_cpu(requested, precision, device, loaded, want):
    # only the kernel the backbone was loaded with counts: an fp32 stage after a bf16 one returns to SDPA
    assert attention_kernel(requested, precision, device, loaded) == want


@pytest.mark.parametrize("longest, want", [(None, "eager"), (32, "eager"), (EAGER_MAX_TOKENS, "eager"),
                                           (EAGER_MAX_TOKENS + 1, "sdpa"), (384, "sdpa")])
def test_auto_keeps_sdpa_for_rows_longer_than_the_plain_kernel_pays_for(longest, want):
    assert attention_kernel("auto", "bf16-mixed", "cpu", "sdpa", longest) == want
    assert attention_kernel("eager", "bf16-mixed", "cpu", "sdpa", longest) == "eager"  # an explicit choice wins


def test_a_fit_picks_the_kernel_for_its_tasks_longest_rows(tiny_dir, task_dir, tmp_path):
    import lightning as L

    from mtl.data.module import TaskDataModule
    from mtl.lit import AdapterTrainer

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for file in ("keyword.csv", "keyword.yaml"):
        (tasks_dir / file).write_bytes((task_dir / file).read_bytes())
    # the keyword task again, allowed 200 tokens a row
    (tasks_dir / "long.yaml").write_text((task_dir / "keyword.yaml").read_text().replace("max_length: 16",
                                                                                         "max_length: 200"))
    kernels = {}
    for name, tasks in (("short", ["keyword"]), ("long", ["keyword", "long"])):
        module = AdapterTrainer(tasks, backbone=str(tiny_dir), tasks_dir=str(tasks_dir), run_dir=str(tmp_path / name))
        data = TaskDataModule(tasks, backbone=str(tiny_dir), tasks_dir=str(tasks_dir), cache_dir=str(tmp_path / "c"))
        L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed",
                  use_distributed_sampler=False).fit(module, datamodule=data)
        kernels[name] = module.model.backbone.config._attn_implementation
    assert kernels == {"short": "eager", "long": "sdpa"}


def test_a_bad_attention_value_or_sdpa_without_the_kernel_is_one_line():
    with pytest.raises(MTLConfigError, match=r"^model.attention: got 'flash', expected one of auto, sdpa, eager$"):
        check_attention("flash")
    with pytest.raises(MTLConfigError, match=r"^model.attention: sdpa, but the fake backbone has no SDPA kernel"):
        check_attention("sdpa", fake_backbone("eager", sdpa=False))
    check_attention("eager", fake_backbone("eager", sdpa=False))
    check_attention("sdpa", fake_backbone("sdpa"))


def test_eager_and_sdpa_compute_the_same_layer_loop(family):
    if family == "deberta-v2":
        pytest.skip("DeBERTa-v2/v3 has only the eager kernel in transformers")
    torch.manual_seed(1)
    model = MTLModel(tiny_backbone(family))
    model.add_task("a", 3, "pfeiffer")
    model.eval()
    ids = torch.randint(5, 200, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0  # padding changes the mask each kernel is given
    out = {}
    for kernel in ("sdpa", "eager"):
        model.backbone.set_attn_implementation(kernel)
        with torch.no_grad():
            out[kernel] = model(ids, mask, tasks="a")["a"]
    assert out["sdpa"].abs().max() > 0.01  # the comparison below is not between two near-zero outputs
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("precision, kernel, said", [("bf16-mixed", "eager", True), ("32-true", "sdpa", False),
                                                      ("bf16-mixed", "sdpa", False)])
def test_a_fit_runs_the_kernel_auto_picks_and_says_so_only_when_it_switched(tiny_dir, task_dir, tmp_path, capfd,
                                                                           monkeypatch, precision, kernel, said):
    seen = []
    monkeypatch.setattr(MTLModel, "forward", _recording(MTLModel.forward, seen))
    extra = ["--model.attention", "sdpa"] if kernel == "sdpa" and precision.startswith("bf16") else []
    main(["fit", *quickstart(tiny_dir, task_dir, tmp_path, "--trainer.enable_progress_bar", "false",
                             "--trainer.max_epochs", "1", "--model.test_after_fit", "false",
                             "--trainer.precision", precision, *extra)])
    assert seen and set(seen) == {kernel}  # every forward of the fit, validation included
    assert ("attention: eager (faster under bf16-mixed" in capfd.readouterr().out) is said


def _recording(forward, seen: list[str]):
    """``MTLModel.forward`` that notes the backbone's attention kernel at each call."""
    def record(self, *args, **kwargs):
        seen.append(self.backbone.config._attn_implementation)
        return forward(self, *args, **kwargs)
    return record


def test_a_bad_attention_value_fails_before_any_work(tiny_dir, task_dir, tmp_path, capsys):
    code, lines = run_cli(["fit", *quickstart(tiny_dir, task_dir, tmp_path, "--model.attention", "flash")], capsys)
    assert code == 2 and "model.attention: got 'flash', expected one of auto, sdpa, eager" in error_line(lines)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_loaded_attention_runs_the_kernel_the_backbone_came_with_then_restores_the_current_one():
    model = MTLModel(tiny_backbone("bert"))
    assert model.loaded_kernel == "sdpa"
    model.backbone.set_attn_implementation("eager")
    with model.loaded_attention():
        assert model.backbone.config._attn_implementation == "sdpa"
    assert model.backbone.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError), model.loaded_attention():
        raise RuntimeError("restored on the way out too")
    assert model.backbone.config._attn_implementation == "eager"
