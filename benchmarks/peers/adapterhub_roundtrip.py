"""AdapterHub's adapter format both ways on MiniLM-L6: AdapterHub's saves load into mtl, mtl's exports into AdapterHub.

Run with mtl's own environment (AdapterHub runs this same file in a subprocess, in its separate venv, where mtl and
its transformers 5 are absent; the AdapterHub side never imports mtl):

    .venv/bin/python benchmarks/peers/adapterhub_roundtrip.py [--seed 0] [--batch 4] [--seq 16] [--tol 1e-5] \
        [--keep DIR]

1. ``ah-save`` (AdapterHub venv): for each preset, SeqBnConfig (pfeiffer), DoubleSeqBnConfig (houlsby) and ParBnConfig
   (parallel), ``AutoAdapterModel`` on MiniLM gets an adapter and a 3-label classification head (layers 2, tanh,
   CLS token), every adapter and head tensor plus N(0, 0.05) noise (so ParBn's zero up-projection is not zero), and
   ``save_adapter(folder, name, with_head=True, use_safetensors=True)``; the pfeiffer one is also saved in AdapterHub's
   default format (``pytorch_adapter.bin`` + ``pytorch_model_head.bin``). Its eval-mode last hidden state and logits on
   fixed inputs (last 3 tokens of row 0 masked) are dumped.
2. mtl: ``load_adapterhub(MTLModel("minilm-l6"), folder)`` for each folder; last hidden state (``encode``) and logits.
3. mtl: one random task per preset (``add_task(..., pooling="cls")`` + noise), ``save_adapterhub`` and its outputs.
4. ``ah-load`` (AdapterHub venv): ``load_adapter(folder, use_safetensors=True, set_active=True)`` for each mtl export;
   its outputs (and any missing / unexpected keys AdapterHub reports, which must be none).
Each folder imported in step 2 is also exported again by mtl: its adapter config must equal AdapterHub's, field for
field.

Fusion rows, both ways: in step 1 AdapterHub also adds three SeqBn adapters ``f0, f1, f2`` (each with a head), a
``DynamicAdapterFusionConfig`` ``Fuse(f0, f1, f2)`` and a 3-label head named like the fusion, adds the same noise
(query / key / value included) and saves each adapter with ``save_adapter`` and the fusion with
``save_adapter_fusion(folder, "f0,f1,f2", with_head=True, use_safetensors=True)`` (and once in its default .bin
format); its outputs with the fusion active are dumped. mtl loads the three adapter folders with ``load_adapterhub``
and the fusion with ``load_adapterhub_fusion``; re-exported with ``save_adapterhub_fusion``, the fusion config must
equal AdapterHub's. The other way, mtl builds three random Pfeiffer tasks ``m0, m1, m2`` and a random dynamic fusion
``mfz`` over them (cls-pooled heads), exports them with ``save_adapterhub`` / ``save_adapterhub_fusion``, and AdapterHub
loads them with ``load_adapter(..., use_safetensors=True)`` and ``load_adapter_fusion(folder, use_safetensors=True,
set_active=True)``; every AdapterHub fusion parameter must equal the file's tensor (none missing or left over).

Tagging rows, both ways: in step 1 AdapterHub also builds a SeqBn adapter ``ah_tagging`` with a tagging head
(``add_tagging_head(name, num_labels=9, id2label=CoNLL-2003's tags)``: one layer, a tag score per token), adds the
noise and saves it with ``save_adapter(..., with_head=True, use_safetensors=True)``; mtl imports it as a
token_classification task and re-exports it (adapter config and head config must equal AdapterHub's; its
``dropout_prob`` null is the backbone's hidden_dropout_prob, which mtl writes as a number). The other way, mtl adds a
random Pfeiffer tagger (``problem="token_classification"``), exports it with ``save_adapterhub`` and AdapterHub loads it
with ``load_adapter(folder, use_safetensors=True)`` (no missing or unexpected keys; a tagging head with mtl's tags).
Tagging logits are compared per token over the real tokens. Question-answering rows, both ways, are built the same way
(``add_qa_head(name)``: one layer, a start and an end logit per token; mtl's ``problem="extractive_qa"``), compared as
[rows, tokens, 2] (AdapterHub's start and end logits stacked) over the real tokens; so are multiple-choice rows
(``add_multiple_choice_head(name, num_choices=2, id2label=A, B)``: two layers on the first token, a score per row;
mtl's ``problem="multiple_choice"`` with cls pooling), mtl's score per row compared with AdapterHub's [rows / 2, 2].

Prints a markdown table of max |diff| (hidden state over real tokens, logits); exit status 1 if one exceeds ``--tol``
a config field differs, or a control (mtl's bare backbone against each AdapterHub output) is closer than 1e-3.
Without the AdapterHub venv it prints one "skipped" line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peer_venv import PEER_PYTHON, peer_work_dir  # this folder: run as a script from here

PRESETS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig", "parallel": "ParBnConfig"}
FUSED = ["f0", "f1", "f2"]  # AdapterHub's adapters under its fusion "f0,f1,f2"
MTL_FUSED = ["m0", "m1", "m2"]  # mtl's tasks under its fusion "mfz"
LABELS = {0: "neg", 1: "neu", 2: "pos"}
# CoNLL-2003's NER tags, as tasks/conll2003_ner.yaml orders them (the tagging rows)
TAGS = dict(enumerate(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]))
# the rows of the other kinds' heads: folder -> (AdapterHub's head adder and its labels, its head class, mtl's kind, the
# name of mtl's own random task of that kind); a multiple-choice head scores each row, AdapterHub's logits are the
# scores of each group of num_choices rows
TOKEN_HEADS = {"tagging": ("add_tagging_head", TAGS, "TaggingHead", "token_classification", "tagger"),
               "qa": ("add_qa_head", None, "QuestionAnsweringHead", "extractive_qa", "answerer"),
               "choice": ("add_multiple_choice_head", {0: "A", 1: "B"}, "MultipleChoiceHead", "multiple_choice",
                          "chooser")}
HEAD_LAYERS = {"multiple_choice": 2}  # AdapterHub's layers of each mtl kind's head (else 1)
NOISE = 0.05


def inputs(seed: int, batch: int, seq: int):
    """Fixed token ids in [1000, 30000) and a mask with the last 3 tokens of row 0 padded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return ids, mask


# ---- AdapterHub side (its venv; never imports mtl) -------------------------------------------------------------------
def ah_model():
    """MiniLM as AdapterHub's BertAdapterModel, quiet, in eval mode."""
    import logging

    from adapters import AutoAdapterModel
    from adapterhub_bench import model_dir  # same folder
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("adapters.model_mixin").addFilter(
        lambda record: "none are activated for the forward pass" not in record.getMessage())
    return AutoAdapterModel.from_pretrained(str(model_dir())).eval()


def ah_outputs(model, name: str, ids, mask, setup=None) -> dict:
    """Last hidden state and logits with ``setup`` (default: the adapter ``name``) active and head ``name``."""
    import torch

    model.set_active_adapters(setup or name)
    model.active_head = name
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # a question-answering head answers start and end logits: stacked as mtl's head gives them, [rows, tokens, 2]
    logits = out.logits if getattr(out, "logits", None) is not None else \
        torch.stack([out.start_logits, out.end_logits], -1)
    return {f"{name}.hidden": out.hidden_states[-1].contiguous(), f"{name}.logits": logits.contiguous()}


def ah_save(args: argparse.Namespace) -> None:
    """Random AdapterHub adapters + heads, saved by AdapterHub, with their outputs."""
    import adapters
    import torch
    from safetensors.torch import save_file

    ids, mask = inputs(args.seed, args.batch, args.seq)
    dumped = {"input_ids": ids, "attention_mask": mask}
    (args.dir / "ah").mkdir()  # AdapterHub's save_adapter makes one folder level only
    for i, (preset, config_class) in enumerate(PRESETS.items()):
        torch.manual_seed(args.seed + i)
        model, name = ah_model(), f"ah_{preset}"
        model.add_adapter(name, config=getattr(adapters, config_class)())
        model.add_classification_head(name, num_labels=3, id2label=LABELS)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".adapters.{name}." in key or key.startswith(f"heads.{name}."):
                    p.add_(torch.randn_like(p) * NOISE)
        dumped.update(ah_outputs(model, name, ids, mask))
        model.save_adapter(str(args.dir / "ah" / preset), name, with_head=True, use_safetensors=True)
        if preset == "pfeiffer":  # AdapterHub's default: pickled state dicts, read by mtl with weights_only=True
            model.save_adapter(str(args.dir / "ah" / "pfeiffer-bin"), name, with_head=True)
    dumped.update(ah_save_fusion(args, ids, mask))
    for n, folder in enumerate(TOKEN_HEADS):
        dumped.update(ah_save_token_head(args, folder, n, ids, mask))
    save_file(dumped, str(args.dir / "ah_outputs.safetensors"),
              metadata={"adapters": adapters.__version__, "torch": torch.__version__})


def ah_save_fusion(args: argparse.Namespace, ids, mask) -> dict:
    """Three random SeqBn adapters and a dynamic fusion over them with its head, saved by AdapterHub; outputs."""
    import torch
    from adapters import DynamicAdapterFusionConfig, SeqBnConfig
    from adapters.composition import Fuse

    torch.manual_seed(args.seed + 10)
    model, name = ah_model(), ",".join(FUSED)
    for adapter in FUSED:
        model.add_adapter(adapter, config=SeqBnConfig())
        model.add_classification_head(adapter, num_labels=3, id2label=LABELS)
    model.add_adapter_fusion(Fuse(*FUSED), DynamicAdapterFusionConfig())
    model.add_classification_head(name, num_labels=3, id2label=LABELS)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if any(f".adapters.{a}." in key for a in FUSED) or f"adapter_fusion_layer.{name}." in key \
                    or key.startswith("heads."):
                p.add_(torch.randn_like(p) * NOISE)
    out = ah_outputs(model, name, ids, mask, Fuse(*FUSED))
    for adapter in FUSED:
        model.save_adapter(str(args.dir / "ah" / adapter), adapter, with_head=True, use_safetensors=True)
    model.save_adapter_fusion(str(args.dir / "ah" / "fusion"), name, with_head=True, use_safetensors=True)
    model.save_adapter_fusion(str(args.dir / "ah" / "fusion-bin"), name, with_head=True)  # AdapterHub's default
    return out


def ah_save_token_head(args: argparse.Namespace, folder: str, n: int, ids, mask) -> dict:
    """A random SeqBn adapter with a head on every token (tagging: a tag score; qa: a start and an end logit), saved
    by AdapterHub; its outputs."""
    import torch
    from adapters import SeqBnConfig

    torch.manual_seed(args.seed + 20 + n)
    model, name = ah_model(), f"ah_{folder}"
    adder, labels = TOKEN_HEADS[folder][:2]
    model.add_adapter(name, config=SeqBnConfig())
    if labels is None:
        getattr(model, adder)(name)
    elif folder == "choice":
        getattr(model, adder)(name, num_choices=len(labels), id2label=labels)
    else:
        getattr(model, adder)(name, num_labels=len(labels), id2label=labels)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".adapters.{name}." in key or key.startswith(f"heads.{name}."):
                p.add_(torch.randn_like(p) * NOISE)
    out = ah_outputs(model, name, ids, mask)
    model.save_adapter(str(args.dir / "ah" / folder), name, with_head=True, use_safetensors=True)
    return out


def ah_load(args: argparse.Namespace) -> None:
    """Loads every mtl export with AdapterHub and dumps its outputs and loading report."""
    import torch
    from safetensors.torch import load_file, save_file

    inp = load_file(str(args.dir / "ah_outputs.safetensors"))
    dumped, report = {}, {}
    for preset in [*PRESETS, *(row[4] for row in TOKEN_HEADS.values())]:
        model, info = ah_model(), {}
        name = model.load_adapter(str(args.dir / "mtl" / preset), use_safetensors=True, set_active=True,
                                  loading_info=info)
        report[preset] = {"name": name, "missing": info.get("missing_keys", []),
                          "unexpected": info.get("unexpected_keys", []),
                          "config": model.adapters_config.get(name).to_dict(), "head": model.heads[name].config,
                          "head_class": type(model.heads[name]).__name__}
        with torch.no_grad():
            dumped.update(ah_outputs(model, name, inp["input_ids"], inp["attention_mask"]))
    dumped.update(ah_load_fusion(args, inp, report))
    save_file(dumped, str(args.dir / "ah_loaded.safetensors"))
    (args.dir / "ah_loaded.json").write_text(json.dumps(report, indent=2, default=str))


def ah_load_fusion(args: argparse.Namespace, inp: dict, report: dict) -> dict:
    """mtl's exported adapters and fusion loaded by AdapterHub's public calls; its outputs, and a parameter check
    (load_adapter_fusion reports no missing keys, so every fusion parameter is compared with the file here)."""
    import torch
    from adapters.composition import Fuse
    from safetensors.torch import load_file

    model = ah_model()
    for task in MTL_FUSED:
        model.load_adapter(str(args.dir / "mtl" / task), use_safetensors=True)
    folder = args.dir / "mtl" / "mfz"
    model.load_adapter_fusion(str(folder), use_safetensors=True, set_active=True)
    saved = load_file(str(folder / "model_adapter_fusion.safetensors"))
    params = {k: p for k, p in model.named_parameters() if "adapter_fusion_layer.mfz." in k}
    report["mfz"] = {"name": "mfz", "missing": sorted(set(params) - set(saved)),
                     "unexpected": sorted(set(saved) - set(params)),
                     "differ": sorted(k for k in set(params) & set(saved) if not torch.equal(params[k], saved[k])),
                     "config": model.adapters_config.get_fusion("mfz")[0].to_dict(), "head": model.heads["mfz"].config}
    with torch.no_grad():
        return ah_outputs(model, "mfz", inp["input_ids"], inp["attention_mask"], Fuse(*MTL_FUSED, name="mfz"))


# ---- mtl side ----------------------------------------------------------------------------------------------------
def run_peer(command: str, args: argparse.Namespace) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(PEER_PYTHON), str(Path(__file__).resolve()), command, "--dir", str(args.dir), "--seed", str(args.seed),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"AdapterHub step failed (exit {proc.returncode}): {' '.join(cmd)}")


def mtl_outputs(model, task: str, ids, mask) -> tuple:
    import torch

    with torch.no_grad():
        hidden = model.encode(ids, mask, None, [(model.target(task), slice(None))])
        return hidden, model(ids, mask, tasks=task)[task]


def compare(args: argparse.Namespace) -> int:
    """Steps 2-4 and the table; returns the exit status."""
    import torch
    from safetensors.torch import load_file, save_file

    from mtl.interop.adapterhub import load_adapterhub, save_adapterhub
    from mtl.interop.adapterhub_fusion import load_adapterhub_fusion, save_adapterhub_fusion
    from mtl.model import MTLModel

    ref = load_file(str(args.dir / "ah_outputs.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    real = mask.bool()
    rows, problems = [], []

    def row(direction: str, label: str, hidden, logits, ref_hidden, ref_logits) -> None:
        # a multiple-choice score per row against AdapterHub's [questions, choices]: the same numbers
        diff = (logits - ref_logits.reshape(logits.shape)).abs()
        rows.append((direction, label, (hidden - ref_hidden).abs()[real].max().item(),
                     (diff[real] if diff.dim() == 3 else diff).max().item()))  # a tagger's: per real token

    imported = MTLModel("minilm-l6").eval()
    for folder in ("pfeiffer", "houlsby", "parallel", "pfeiffer-bin"):
        preset = folder.split("-")[0]
        task = load_adapterhub(imported, args.dir / "ah" / folder, task=folder.replace("-", "_"))
        files = " + ".join(sorted(p.name for p in (args.dir / "ah" / folder).iterdir() if "config" not in p.name))
        row("AdapterHub -> mtl", f"{preset} ({files})", *mtl_outputs(imported, task, ids, mask),
            ref[f"ah_{preset}.hidden"], ref[f"ah_{preset}.logits"])
        # exported again, AdapterHub's own config must come back field for field
        theirs = json.loads((args.dir / "ah" / folder / "adapter_config.json").read_text())["config"]
        ours = json.loads((save_adapterhub(imported, task, args.dir / "again" / folder) / "adapter_config.json")
                          .read_text())["config"]
        problems += [f"{folder}: config.{k} AdapterHub {theirs.get(k)!r} != re-exported {ours.get(k)!r}"
                     for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    for adapter in FUSED:
        load_adapterhub(imported, args.dir / "ah" / adapter)
    for folder in ("fusion", "fusion-bin"):
        task = load_adapterhub_fusion(imported, args.dir / "ah" / folder, task=folder.replace("-", "_"))
        files = " + ".join(sorted(p.name for p in (args.dir / "ah" / folder).iterdir() if "config" not in p.name))
        row("AdapterHub -> mtl", f"dynamic fusion over 3 SeqBn ({files})", *mtl_outputs(imported, task, ids, mask),
            ref["f0,f1,f2.hidden"], ref["f0,f1,f2.logits"])
        theirs = json.loads((args.dir / "ah" / folder / "adapter_fusion_config.json").read_text())["config"]
        ours = json.loads((save_adapterhub_fusion(imported, task, args.dir / "again" / folder)
                           / "adapter_fusion_config.json").read_text())["config"]
        problems += [f"{folder}: config.{k} AdapterHub {theirs.get(k)!r} != re-exported {ours.get(k)!r}"
                     for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    for folder in TOKEN_HEADS:
        problems += compare_token_head_import(args, folder, imported, row)
    with torch.no_grad():
        bare = imported.encode(ids, mask, None, [])
    # the references against the bare backbone: far apart, or the comparisons prove nothing
    controls = [(bare - ref[f"{p}.hidden"]).abs()[real].max().item()
                for p in [f"ah_{p}" for p in [*PRESETS, *TOKEN_HEADS]] + [",".join(FUSED)]]

    torch.manual_seed(args.seed)  # add_task's fresh down-projections come from the global generator
    exported, dumped = MTLModel("minilm-l6").eval(), {}
    for i, preset in enumerate(PRESETS):
        exported.add_task(preset, 3, preset, pooling="cls", labels=list(LABELS.values()))
        gen = torch.Generator().manual_seed(args.seed + 100 + i)
        with torch.no_grad():
            for p in exported.task_parameters(preset).values():
                p.add_(torch.randn(p.shape, generator=gen) * NOISE)
        dumped[f"{preset}.hidden"], dumped[f"{preset}.logits"] = mtl_outputs(exported, preset, ids, mask)
        save_adapterhub(exported, preset, args.dir / "mtl" / preset, with_head=True)
    fused = MTLModel("minilm-l6").eval()
    for task in MTL_FUSED:
        fused.add_task(task, 3, "pfeiffer", pooling="cls", labels=list(LABELS.values()))
    fused.add_fusion("mfz", MTL_FUSED, 3, "dynamic", pooling="cls", labels=list(LABELS.values()))
    for i, task in enumerate(fused.tasks):
        gen = torch.Generator().manual_seed(args.seed + 200 + i)
        with torch.no_grad():
            for p in fused.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=gen) * NOISE)
        if task == "mfz":
            save_adapterhub_fusion(fused, task, args.dir / "mtl" / task, with_head=True)
        else:
            save_adapterhub(fused, task, args.dir / "mtl" / task, with_head=True)
    dumped["mfz.hidden"], dumped["mfz.logits"] = mtl_outputs(fused, "mfz", ids, mask)
    for n, (_, labels, _, problem, task) in enumerate(TOKEN_HEADS.values()):
        model = MTLModel("minilm-l6").eval()
        outputs = 1 if problem == "multiple_choice" else len(labels) if labels else 2
        model.add_task(task, outputs, "pfeiffer", problem=problem, labels=list(labels.values()) if labels else [],
                       **({"pooling": "cls"} if problem == "multiple_choice" else {}))
        gen = torch.Generator().manual_seed(args.seed + 300 + n)
        with torch.no_grad():
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=gen) * NOISE)
        dumped[f"{task}.hidden"], dumped[f"{task}.logits"] = mtl_outputs(model, task, ids, mask)
        save_adapterhub(model, task, args.dir / "mtl" / task, with_head=True)
    save_file(dumped, str(args.dir / "mtl_outputs.safetensors"))
    run_peer("ah-load", args)
    loaded = load_file(str(args.dir / "ah_loaded.safetensors"))
    report = json.loads((args.dir / "ah_loaded.json").read_text())
    for preset in [*PRESETS, "mfz", *(row[4] for row in TOKEN_HEADS.values())]:
        info = report[preset]
        if info["missing"] or info["unexpected"] or info.get("differ"):
            problems.append(f"{preset}: AdapterHub reported missing {info['missing'][:3]} / unexpected "
                            f"{info['unexpected'][:3]} keys / differing values {info.get('differ', [])[:3]}")
        name = info["name"]
        label = {"mfz": "dynamic fusion over 3 Pfeiffer tasks (model_adapter_fusion.safetensors + "
                        "model_head.safetensors)",
                 "tagger": "pfeiffer + tagging head, 9 tags; logits per real token (adapter.safetensors + "
                           "model_head.safetensors)",
                 "answerer": "pfeiffer + question-answering head; start and end logits per real token "
                             "(adapter.safetensors + model_head.safetensors)",
                 "chooser": "pfeiffer + multiple-choice head, 2 choices; a score per row (adapter.safetensors + "
                            "model_head.safetensors)"}.get(preset, f"{preset} (adapter.safetensors + "
                                                                   "model_head.safetensors)")
        row("mtl -> AdapterHub", label, loaded[f"{name}.hidden"], loaded[f"{name}.logits"],
            dumped[f"{preset}.hidden"], dumped[f"{preset}.logits"])
        controls.append((bare - loaded[f"{name}.hidden"]).abs()[real].max().item())
    # exported by mtl, the fusion config AdapterHub loaded must be the one mtl wrote
    written = json.loads((args.dir / "mtl" / "mfz" / "adapter_fusion_config.json").read_text())["config"]
    problems += [f"mfz: config.{k} written {written.get(k)!r} != AdapterHub's {report['mfz']['config'].get(k)!r}"
                 for k in sorted(set(written) | set(report["mfz"]["config"]))
                 if written.get(k) != report["mfz"]["config"].get(k)]

    for _, labels, head_class, problem, task in TOKEN_HEADS.values():  # AdapterHub built each from mtl's head_config
        head, layers = report[task]["head"], HEAD_LAYERS.get(problem, 1)
        label2id = {tag: i for i, tag in labels.items()} if labels else {"LABEL_0": 0, "LABEL_1": 1}  # QA's default
        if (report[task]["head_class"], head.get("layers"), head.get("label2id")) != (head_class, layers, label2id):
            problems.append(f"{task}: AdapterHub built {report[task]['head_class']} with layers {head.get('layers')} "
                            f"and label2id {head.get('label2id')}, expected {head_class}, {layers} and {label2id}")

    control = min(controls)
    failed = bool(problems) or control <= 1e-3
    print("| direction | adapter or fusion | max abs diff, last hidden state (real tokens) | max abs diff, logits | status |")
    print("|---|---|---|---|---|")
    for direction, label, hidden, logits in rows:
        ok = hidden <= args.tol and logits <= args.tol
        failed |= not ok
        print(f"| {direction} | {label} | {hidden:.2e} | {logits:.2e} | {'OK' if ok else f'FAIL (> {args.tol:g})'} |")
    print(f"| control | mtl bare backbone vs each AdapterHub output above (smallest) | {control:.2e} | - | "
          f"{'OK (differs)' if control > 1e-3 else 'FAIL (too close)'} |")
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{'FAIL' if failed else 'OK'}: inputs {tuple(ids.shape)}, seed {args.seed}, tolerance {args.tol:g}")
    return 1 if failed else 0


def compare_token_head_import(args: argparse.Namespace, folder: str, imported, row) -> list[str]:
    """AdapterHub's tagger or question answerer into mtl: a table row and the config / label differences (re-exported
    by mtl)."""
    from safetensors.torch import load_file

    from mtl.interop.adapterhub import load_adapterhub, save_adapterhub

    ref = load_file(str(args.dir / "ah_outputs.safetensors"))
    _, labels, _, problem, _ = TOKEN_HEADS[folder]
    path = args.dir / "ah" / folder
    task = load_adapterhub(imported, path, task=folder)
    problems = []
    names = list(labels.values()) if labels else None
    if imported.heads[task].problem != problem or (labels and imported.records[task].labels != names):
        problems.append(f"{folder}: imported as {imported.heads[task].problem} with labels "
                        f"{imported.records[task].labels}, expected {problem} with {names}")
    files = " + ".join(sorted(p.name for p in path.iterdir() if "config" not in p.name))
    what = {"tagging": "tagging head, 9 tags; logits", "qa": "question-answering head, start and end; logits",
            "choice": "multiple-choice head, 2 choices; a score"}[folder]
    row("AdapterHub -> mtl", f"pfeiffer + {what} per real token ({files})" if folder != "choice" else
        f"pfeiffer + {what} per row ({files})",
        *mtl_outputs(imported, task, ref["input_ids"], ref["attention_mask"]), ref[f"ah_{folder}.hidden"],
        ref[f"ah_{folder}.logits"])
    again = save_adapterhub(imported, task, args.dir / "again" / folder)
    for config_file in ("adapter_config.json", "head_config.json"):
        theirs = json.loads((path / config_file).read_text())["config"]
        ours = json.loads((again / config_file).read_text())["config"]
        if config_file == "head_config.json" and theirs.get("dropout_prob") is None:
            # add_tagging_head leaves it null: the backbone's hidden_dropout_prob, which mtl resolves and writes
            theirs["dropout_prob"] = imported.backbone.config.hidden_dropout_prob
        problems += [f"{folder}: {config_file} config.{k} AdapterHub {theirs.get(k)!r} != re-exported "
                     f"{ours.get(k)!r}" for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="check", choices=["check", "ah-save", "ah-load"])
    parser.add_argument("--dir", type=Path, help="(AdapterHub steps) the shared work folder")
    parser.add_argument("--keep", type=Path, help="keep the folders and dumps here (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.command != "check":
        (ah_save if args.command == "ah-save" else ah_load)(args)
        return
    with peer_work_dir(args.keep, "adapterhub_roundtrip_") as args.dir:
        run_peer("ah-save", args)
        status = compare(args)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
