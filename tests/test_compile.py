"""``model.compile``: a compiled fit trains the same adapter as the plain one (up to the compiler's rounding),
and keeps the plain parameter names in its checkpoint and export."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from torch._dynamo.utils import counters

from mtl import storage
from mtl.cli import main
from tests.test_fit_output import assert_export_is, best_weights, quickstart


def test_a_compiled_fit_trains_the_plain_fits_adapter_and_exports_plain_names(tiny_dir, task_dir, tmp_path):
    exports = {}
    for flag in ("false", "true"):
        root = tmp_path / flag
        torch._dynamo.reset()
        counters.clear()
        main(["fit", *quickstart(tiny_dir, task_dir, root, "--trainer.enable_progress_bar", "false",
                                 "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
                                 # dropout off: a compiled graph draws its masks differently from eager code
                                 "--model.head_dropout", "0.0", "--model.compile", flag)])
        assert (counters["stats"]["unique_graphs"] > 0) is (flag == "true")  # compiled only when asked
        best = next((root / "run").rglob("best.ckpt"))
        state = storage.read_checkpoint(best)["state_dict"]
        assert not any("_orig_mod" in k for k in state)  # compiled in place: the plain module's names
        assert_export_is(best_weights(tiny_dir, task_dir, best, root), root / "run")
        exports[flag] = load_file(root / "run" / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS)
    plain, compiled = exports["false"], exports["true"]
    assert plain.keys() == compiled.keys()
    # the up-projections start at zero (identity adapters): training moved them well beyond the tolerance below
    assert min(plain[k].abs().max().item() for k in plain if ".up." in k) > 1e-3
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], atol=1e-4, rtol=1e-4)
