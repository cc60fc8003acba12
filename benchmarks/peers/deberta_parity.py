"""mtl's adapters against AdapterHub's on tiny random DeBERTa-v2 and ModernBERT backbones (last hidden state).

Run with mtl's own environment (the AdapterHub step runs this same file in a subprocess, in its separate venv, where
mtl and its transformers 5 are absent; that side never imports mtl):

    .venv/bin/python benchmarks/peers/deberta_parity.py [--families deberta-v2 modernbert] [--seed 0] [--batch 4] \
        [--seq 16] [--tol 1e-5] [--keep DIR]

1. mtl (this venv): for each family, a tiny random backbone from benchmarks/backbones/ (``deberta-v3-base`` or
   ``modernbert-base`` shrunk to 2 layers, hidden 64, 2 heads, intermediate 128, vocab 256; DeBERTa with
   ``position_buckets`` 16, so relative attention (p2c|c2p, layer-normed relative embeddings, shared keys) is bucketed
   at this length; ModernBERT with ``local_attention`` 8, so its second layer's sliding window is narrower than the
   input), weights drawn under ``--seed``, then N(0, 0.1) added to every norm's weight and bias (a random init
   leaves them all ones / zeros, which would hide an adapter reading the wrong norm). Its config fields go to
   ``fields.json`` and its state dict (before mtl wraps any sub-layer) to ``backbone.safetensors``. ``MTLModel`` on
   it gets one task per preset (pfeiffer, houlsby, parallel) with N(0, 0.05) noise on every adapter tensor (so no
   up-projection is zero), and ``save_adapterhub`` exports each adapter (no head). Its last hidden states
   (``encode``) on fixed inputs with padding (row 0: last 3 tokens masked, row 1: last 5) are dumped, with the bare
   backbone's.
2. ``ah-run`` (AdapterHub venv): the same config fields through ``AutoConfig.for_model`` + ``AutoModel.from_config``,
   the saved state dict loaded strictly, ``adapters.init(model)``, then for each preset
   ``model.load_adapter(folder, use_safetensors=True, set_active=True)`` (missing or unexpected keys are failures)
   and its last hidden state; errors are caught and reported with their text. Parameters ``adapters.init`` adds to
   the backbone itself (AdapterHub 1.3.0 gives ModernBERT a random ``attn.Wqkv.bias`` per layer, see README.md) are
   reported with how far they move the bare output, then zeroed (``--keep-init-params`` leaves them).
3. mtl compares over the real (unmasked) tokens: each preset, and the bare backbones of the two environments (else a
   difference could be the transformers versions' rather than the adapters'). A control (mtl's bare backbone
   against each AdapterHub adapter output) must differ by > 1e-3, or the comparison proves nothing.

Prints a markdown table (max |diff| per family and preset); exit status 1 if one exceeds ``--tol``, a step failed,
or a control is too close. Without the AdapterHub venv it prints one "skipped" line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

from peer_venv import PEER_PYTHON, PEERS, peer_work_dir  # this folder: run as a script from here

BENCHMARKS = PEERS.parent
PRESETS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig", "parallel": "ParBnConfig"}
# family -> (shape in benchmarks/backbones/, fields changed beyond the common shrink)
FAMILIES = {"deberta-v2": ("deberta-v3-base", {"position_buckets": 16}),
            "modernbert": ("modernbert-base", {"local_attention": 8})}
NOISE = 0.05
NORM_NOISE = 0.1
CONTROL = 1e-3


def shapes():
    """benchmarks/backbones (works in either venv: it needs transformers only)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import backbones

    return backbones


def inputs(config, seed: int, batch: int, seq: int):
    """Fixed token ids inside the vocabulary and a mask with padding at the end of rows 0 and 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = shapes().random_ids(config, batch, seq, generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    if batch > 1:
        mask[1, -5:] = 0
    return ids, mask


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


# ---- AdapterHub side (its venv; never imports mtl) -------------------------------------------------------------------
def ah_run(args: argparse.Namespace) -> None:
    """Loads each family's backbone and mtl's exported adapters with AdapterHub; dumps outputs and a report."""
    import logging

    import adapters
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("adapters.model_mixin").addFilter(
        lambda record: "none are activated for the forward pass" not in record.getMessage())
    report = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}}
    dumped = {}
    for family in args.families:
        folder = args.dir / family
        if not (folder / "fields.json").is_file():
            continue  # the mtl side could not build it; it says why
        entry = report[family] = {"presets": {}}
        try:
            fields = json.loads((folder / "fields.json").read_text())
            model = AutoModel.from_config(shapes().build_config(fields)).eval()
            entry["model_class"] = type(model).__name__
            entry["attn_implementation"] = model.config._attn_implementation
            result = model.load_state_dict(load_file(str(folder / "backbone.safetensors")), strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RuntimeError(f"backbone weights: missing {result.missing_keys[:3]}, "
                                   f"unexpected {result.unexpected_keys[:3]}")
            inp = load_file(str(folder / "inputs.safetensors"))
            own = {k for k, _ in model.named_parameters()}
            with torch.no_grad():
                dumped[f"{family}.bare"] = model(**inp).last_hidden_state.contiguous()
                adapters.init(model)
                # parameters adapters.init adds to the backbone itself (no adapter exists yet)
                extra = {k: p for k, p in model.named_parameters() if k not in own}
                entry["init_added"] = {k: float(p.abs().max()) for k, p in extra.items()}
                if extra:
                    dumped[f"{family}.bare_init"] = model(**inp).last_hidden_state.contiguous()
                    if not args.keep_init_params:
                        for p in extra.values():
                            p.zero_()
                        dumped[f"{family}.bare_zeroed"] = model(**inp).last_hidden_state.contiguous()
        except Exception as err:  # the report carries the text; the mtl side prints it
            entry["error"] = one_line(err)
            entry["traceback"] = traceback.format_exc(limit=4)
            continue
        for preset in PRESETS:
            info, loading = {}, {}
            entry["presets"][preset] = info
            try:
                name = model.load_adapter(str(folder / "mtl" / preset), use_safetensors=True, set_active=True,
                                          loading_info=loading)
                info.update(name=name, missing=loading.get("missing_keys", []),
                            unexpected=loading.get("unexpected_keys", []),
                            config=model.adapters_config.get(name).to_dict())
                info["parameters"] = sum(p.numel() for k, p in model.named_parameters() if f".{name}." in k)
                with torch.no_grad():
                    dumped[f"{family}.{preset}"] = model(**inp).last_hidden_state.contiguous()
                model.set_active_adapters(None)
                model.delete_adapter(name)
            except Exception as err:
                info["error"] = one_line(err)
                info["traceback"] = traceback.format_exc(limit=4)
    save_file(dumped, str(args.dir / "ah_outputs.safetensors"))
    (args.dir / "ah_report.json").write_text(json.dumps(report, indent=2, default=str))


# ---- mtl side ----------------------------------------------------------------------------------------------------
def mtl_save(args: argparse.Namespace) -> dict[str, str]:
    """Step 1 for every family; returns family -> error line for the families mtl could not build."""
    import torch
    from safetensors.torch import save_file

    from mtl.interop.adapterhub import save_adapterhub
    from mtl.model import MTLModel

    bench, failed = shapes(), {}
    for family in args.families:
        shape, extra = FAMILIES[family]
        folder = args.dir / family
        folder.mkdir(parents=True)
        fields = {**bench.shrink(bench.load_shape(shape)[0]), **extra}
        try:
            backbone = bench.build_backbone(fields, seed=args.seed)
            gen = torch.Generator().manual_seed(args.seed + 1)
            with torch.no_grad():  # random init leaves every norm at ones / zeros, which would hide a wrong norm
                for key, p in backbone.named_parameters():
                    if "norm" in key.lower():
                        p.add_(torch.randn(p.shape, generator=gen) * NORM_NOISE)
            state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
            ids, mask = inputs(backbone.config, args.seed, args.batch, args.seq)
            model = MTLModel(backbone).eval()
        except Exception as err:
            failed[family] = f"mtl cannot build it: {one_line(err)}"
            continue
        (folder / "fields.json").write_text(json.dumps(fields, indent=2))
        save_file(state, str(folder / "backbone.safetensors"))
        save_file({"input_ids": ids, "attention_mask": mask}, str(folder / "inputs.safetensors"))
        dumped = {}
        with torch.no_grad():
            dumped["bare"] = model.encode(ids, mask, None, [])
        torch.manual_seed(args.seed)  # add_task's fresh down-projections come from the global generator
        for i, preset in enumerate(PRESETS):
            model.add_task(preset, 3, preset, pooling="cls")
            gen = torch.Generator().manual_seed(args.seed + 100 + i)
            with torch.no_grad():
                for p in model.part_parameters(("adapter", preset)).values():
                    p.add_(torch.randn(p.shape, generator=gen) * NOISE)
                dumped[preset] = model.encode(ids, mask, None, [(model.target(preset), slice(None))])
            save_adapterhub(model, preset, folder / "mtl" / preset, with_head=False)
        save_file({k: v.contiguous() for k, v in dumped.items()}, str(folder / "mtl_outputs.safetensors"))
    return failed


def run_peer(args: argparse.Namespace) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(PEER_PYTHON), str(Path(__file__).resolve()), "ah-run", "--dir", str(args.dir), "--threads",
           str(args.threads), "--families", *args.families] + (["--keep-init-params"] if args.keep_init_params else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"AdapterHub step failed (exit {proc.returncode}): {' '.join(cmd)}")


def compare(args: argparse.Namespace) -> int:
    """Steps 1-3 and the table; returns the exit status."""
    from safetensors.torch import load_file

    failed = mtl_save(args)
    run_peer(args)
    report = json.loads((args.dir / "ah_report.json").read_text())
    theirs = load_file(str(args.dir / "ah_outputs.safetensors"))
    versions = report["versions"]
    status = 0
    print(f"| family | adapter (AdapterHub config) | max abs diff, last hidden state (real tokens) | status |")
    print("|---|---|---|---|")

    def row(family: str, label: str, value: str, ok: bool) -> None:
        nonlocal status
        status |= 0 if ok else 1
        print(f"| {family} | {label} | {value} | {'OK' if ok else 'FAIL'} |")

    for family in args.families:
        if family in failed:
            row(family, "-", failed[family], False)
            continue
        entry = report.get(family, {})
        if "error" in entry:
            row(family, "-", f"AdapterHub {versions['adapters']} cannot run it: {entry['error']}", False)
            continue
        ours = load_file(str(args.dir / family / "mtl_outputs.safetensors"))
        real = load_file(str(args.dir / family / "inputs.safetensors"))["attention_mask"].bool()
        bare = (ours["bare"] - theirs[f"{family}.bare"]).abs()[real].max().item()
        row(family, f"none: bare {entry['model_class']} ({entry['attn_implementation']} attention), transformers "
            f"{versions['transformers']} vs mtl's", f"{bare:.2e}", bare <= args.tol)
        added = entry.get("init_added", {})
        if added:  # AdapterHub's init changed the backbone: shown, and (by default) undone for the adapter rows
            init = (ours["bare"] - theirs[f"{family}.bare_init"]).abs()[real].max().item()
            names = ", ".join(f"{k} (largest magnitude {v:.2g})" for k, v in added.items())
            print(f"| {family} | none, after adapters.init: it added {names} to the backbone | {init:.2e} | "
                  f"{'AdapterHub changes the backbone' if init > args.tol else 'OK'} |")
            if not args.keep_init_params:
                zeroed = (ours["bare"] - theirs[f"{family}.bare_zeroed"]).abs()[real].max().item()
                row(family, "none, after adapters.init with those parameters zeroed (as for every row below)",
                    f"{zeroed:.2e}", zeroed <= args.tol)
        controls = []
        for preset, config_class in PRESETS.items():
            info = entry["presets"].get(preset, {})
            label = f"{preset} ({config_class})"
            if "error" in info:
                row(family, label, f"AdapterHub load_adapter failed: {info['error']}", False)
                continue
            if info.get("missing") or info.get("unexpected"):
                row(family, label, f"AdapterHub reported missing {info['missing'][:3]} / unexpected "
                    f"{info['unexpected'][:3]} keys", False)
                continue
            diff = (ours[preset] - theirs[f"{family}.{preset}"]).abs()[real].max().item()
            controls.append((ours["bare"] - theirs[f"{family}.{preset}"]).abs()[real].max().item())
            row(family, f"{label}, {info['parameters']:,} adapter parameters", f"{diff:.2e}", diff <= args.tol)
        if controls:
            row(family, "control: mtl's bare backbone vs each AdapterHub adapter output (smallest)",
                f"{min(controls):.2e}", min(controls) > CONTROL)
    print(f"{'FAIL' if status else 'OK'}: inputs ({args.batch}, {args.seq}) with padding, seed {args.seed}, tolerance "
          f"{args.tol:g}; AdapterHub adapters {versions['adapters']}, transformers {versions['transformers']}")
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="check", choices=["check", "ah-run"])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--dir", type=Path, help="(AdapterHub step) the shared work folder")
    parser.add_argument("--keep", type=Path, help="keep the folders and dumps here (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--keep-init-params", action="store_true",
                        help="leave the parameters adapters.init adds to the backbone as AdapterHub initialises them "
                             "(default: zero them, so the adapter rows compare adapters, not that change)")
    args = parser.parse_args()
    if args.batch < 2 or args.seq < 6:
        parser.error("--batch at least 2 and --seq at least 6 (rows 0 and 1 carry 3 and 5 padded tokens)")
    import torch

    torch.set_num_threads(args.threads)
    if args.command == "ah-run":
        ah_run(args)
        return
    with peer_work_dir(args.keep, "deberta_parity_") as args.dir:
        status = compare(args)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
