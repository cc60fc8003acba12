"""Hostile but realistic user mistakes against ``train.py``: every case must end in one clear line, early.

Each case is a real CLI call (``python train.py ...``) on a tiny random BERT with the MiniLM tokenizer, in its own
copy of a sandbox that already holds a trained run (two adapters, a fusion, a Lightning checkpoint). The table shows
the exit code, the number of stderr lines, the error line, and the files the call wrote, changed or removed.
Goal: exit 2, at most 3 stderr lines, no traceback, nothing written and nothing changed.

    python benchmarks/bad_inputs.py                 # all cases, 2 at a time
    python benchmarks/bad_inputs.py -k ckpt -j 1    # cases whose name contains "ckpt"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven", "table"]
CKPT = "run/lightning/logs/version_0/checkpoints/best.ckpt"

BASE_CONFIG = """\
seed_everything: 0
model:
  backbone: backbone
  adapter: {type: pfeiffer, reduction_factor: 4}
  run_dir: run
data:
  tasks: [keyword, colour]
  cache_dir: cache
  batch_size: 16
trainer:
  max_epochs: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: ${model.run_dir}/lightning
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: "${model.run_dir}/lightning", name: logs}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/avg/score, mode: max, filename: best}
"""

FUSION_CONFIG = """\
seed_everything: 0
model:
  backbone: backbone
  load_from: run
  run_dir: run
  fusion: {name: mood, adapters: [keyword, colour]}
data:
  tasks: [mood]
  cache_dir: cache
trainer:
  max_epochs: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  enable_checkpointing: false
"""

CONTINUAL_CONFIG = """\
seed_everything: 0
continual: {order: [keyword, colour], strategy: per_task, run_dir: crun}
model: {backbone: backbone, adapter: {type: pfeiffer, reduction_factor: 4}}
data: {cache_dir: cache, batch_size: 16}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, logger: false,
          enable_checkpointing: false, limit_val_batches: 0}
"""


def keyword_task(folder: Path, name: str, labels: list[str], rows: int = 120, seed: int = 0, extra: str = "") -> None:
    """A CSV task whose label is the label word inside the sentence, and its spec."""
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        words = rng.sample(WORDS, 4)
        words.insert(rng.randrange(5), labels[i % len(labels)])
        lines.append(f"{' '.join(words)} {i},{labels[i % len(labels)]}")
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.yaml").write_text(f"source: {{type: files, train: {name}.csv}}\ntext_fields: [text]\n"
                                         f"label_field: label\nlabels: [{', '.join(labels)}]\nmax_length: 16\n{extra}")


def build_base(base: Path) -> None:
    """Backbone, tasks, configs, a trained run (adapters keyword + colour, fusion mood, best.ckpt), and a finished
    continual run (crun: keyword then colour)."""
    import torch
    from transformers import BertConfig, BertModel

    from mtl.backbone import load_tokenizer

    base.mkdir(parents=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(base / "backbone")
    load_tokenizer("minilm-l6").save_pretrained(base / "backbone")
    tasks = base / "tasks"
    tasks.mkdir()
    keyword_task(tasks, "keyword", ["bad", "good"])
    keyword_task(tasks, "colour", ["red", "blue", "pink"], seed=1)
    keyword_task(tasks, "mood", ["bad", "good"], seed=2)
    keyword_task(tasks, "fresh", ["green", "stone"], seed=3)  # never trained: the task the add-a-task cases add
    (base / "base.yaml").write_text(BASE_CONFIG)
    (base / "fusion.yaml").write_text(FUSION_CONFIG)
    (base / "continual.yaml").write_text(CONTINUAL_CONFIG)
    (base / "texts.txt").write_text("red alpha beta\ngood river stone\n")
    for args in (["fit", "--config", "base.yaml"], ["fit", "--config", "fusion.yaml"],
                 ["continual", "--config", "continual.yaml"]):
        done = subprocess.run([sys.executable, TRAIN, *args], cwd=base, capture_output=True, text=True,
                              env=_env(base))
        if done.returncode != 0:
            raise SystemExit(f"building the sandbox failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
    # third-party caches in ~ (matplotlib's font list, written on its first import) exist on any used machine
    shutil.rmtree(base / "home", ignore_errors=True)
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], env=_env(base), check=True)
    (base / ".complete").touch()


def _env(sandbox: Path) -> dict[str, str]:
    # a private HOME catches writes to ~ (e.g. the default token cache)
    return {**os.environ, "HOME": str(sandbox / "home"), "PYTHONWARNINGS": "ignore::DeprecationWarning"}


# ---- case setups: each edits the case's own sandbox copy --------------------------------------------------------
def write(rel: str, text: str) -> Callable[[Path], None]:
    """Setup: write a text file."""
    return lambda s: (s / rel).parent.mkdir(parents=True, exist_ok=True) or (s / rel).write_text(text)


def write_bytes(rel: str, data: bytes) -> Callable[[Path], None]:
    """Setup: write a binary file."""
    return lambda s: (s / rel).parent.mkdir(parents=True, exist_ok=True) or (s / rel).write_bytes(data)


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    """Setup: cut a file to a fraction of its size."""
    def run(s: Path) -> None:
        data = (s / rel).read_bytes()
        (s / rel).write_bytes(data[: int(len(data) * keep)])
    return run


def poison(rel: str, value: float = float("nan"), tensor: str | None = None) -> Callable[[Path], None]:
    """Setup: put ``value`` (NaN, inf) into one element of a safetensors file's tensor (default: the first in name
    order), keeping the file otherwise valid."""
    def run(s: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(s / rel))
        name = tensor or sorted(tensors)[0]
        tensors[name].view(-1)[0] = value
        save_file(tensors, str(s / rel))
    return run


def edit_json(rel: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Setup: change a JSON file in place (``edit`` changes the loaded object)."""
    def run(s: Path) -> None:
        import json

        data = json.loads((s / rel).read_text())
        edit(data)
        (s / rel).write_text(json.dumps(data))
    return run


def nudge(rel: str) -> Callable[[Path], None]:
    """Setup: change one adapter weight of a safetensors file a little (still finite, still a valid file)."""
    def run(s: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(s / rel))
        tensors[sorted(k for k in tensors if not k.startswith("head"))[0]].view(-1)[0] += 0.5
        save_file(tensors, str(s / rel))
    return run


def link(rel: str, target: str) -> Callable[[Path], None]:
    """Setup: ``rel`` becomes a symlink to ``target`` (a folder no user can write, such as /proc)."""
    def run(sandbox: Path) -> None:
        (sandbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / rel).symlink_to(target)
    return run


def steps(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    """Setup: several steps in order."""
    return lambda s: [f(s) for f in fns] and None


def other_checkpoint(args: list[str]) -> Callable[[Path], None]:
    """Setup: train another run (``other/``) with changed settings, for checkpoint-mismatch cases."""
    def run(s: Path) -> None:
        cmd = [sys.executable, TRAIN, "fit", "--config", "base.yaml", "--model.run_dir", "other", *args]
        done = subprocess.run(cmd, cwd=s, capture_output=True, text=True, env=_env(s))
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
    return run


# a folder nobody can create anything in, root included (chmod 555 does not stop root)
READ_ONLY = "/proc/mtl-read-only"
OTHER_CKPT = "other/lightning/logs/version_0/checkpoints/best.ckpt"
FIT = ["fit", "--config", "base.yaml", "--model.run_dir", "new"]
TEST = ["test", "--config", "base.yaml", "--ckpt_path", CKPT]
PREDICT = ["predict", "--config", "base.yaml", "--model.load_from", "run", "--model.run_dir", "run",
           "--data.tasks", "[]", "--data.predict_file", "texts.txt", "--trainer.logger", "false"]
ADD = ["fit", "--config", "base.yaml", "--model.load_from", "run", "--model.run_dir", "run", "--data.tasks", "[fresh]"]
CONTINUAL = ["continual", "--config", "continual.yaml", "--continual.run_dir", "cnew"]
TAGS = ("source: {{type: files, train: {file}{src}}}\ntext_fields: [tokens]\nlabel_field: tags\n"
        "labels: [O, B-KEY, I-KEY]\nproblem: token_classification\nmax_length: 16\n{extra}")
GOOD_ROW = '{"tokens": ["alpha", "good"], "tags": ["O", "B-KEY"]}\n'
TAG_FIT = FIT + ["--data.tasks", "[tagbad]"]


def tagging(data: str, text: str, src: str = "", extra: str = "") -> Callable[[Path], None]:
    """Setup: a tagging task ``tasks/tagbad.yaml`` reading ``tasks/<data>`` (written with ``text``)."""
    return steps(write(f"tasks/{data}", text), write("tasks/tagbad.yaml", TAGS.format(file=data, src=src, extra=extra)))
QA = ("source: {{type: files, train: {file}}}\ntext_fields: [question, context]\nlabel_field: answers\n"
      "problem: extractive_qa\nmax_length: 24\ndoc_stride: 6\n{extra}")
QA_FIT = FIT + ["--data.tasks", "[qabad]"]


def qa_row(n: int, question: str = "which colour?", context: str = "alpha red stone", start: int = 6,
           text: str = "red") -> str:
    """One JSONL row of a QA task (``n`` makes its context unique)."""
    return json.dumps({"question": question, "context": f"{context} {n}",
                       "answers": [{"text": text, "answer_start": start}]}) + "\n"


def question_answering(rows: str, extra: str = "") -> Callable[[Path], None]:
    """Setup: a QA task ``tasks/qabad.yaml`` reading ``tasks/q.jsonl`` (twenty good rows, then ``rows``)."""
    return steps(write("tasks/q.jsonl", "".join(qa_row(n) for n in range(20)) + rows),
                 write("tasks/qabad.yaml", QA.format(file="q.jsonl", extra=extra)))


MC = ("source: {{type: files, train: {file}}}\ntext_fields: [context, question, choices]\nlabel_field: label\n"
      "labels: [A, B, C]\nproblem: multiple_choice\nmax_length: 24\n{extra}")
MC_FIT = FIT + ["--data.tasks", "[mcbad]"]


def mc_row(n: int, choices: list | None = None, label: object = 1, question: str = "which colour?") -> str:
    """One JSONL row of a multiple-choice task (``n`` makes its context unique)."""
    return json.dumps({"context": f"a stone {n}", "question": question,
                       "choices": ["table", "red", "cloud"] if choices is None else choices, "label": label}) + "\n"


def multiple_choice(rows: str, extra: str = "") -> Callable[[Path], None]:
    """Setup: a multiple-choice task ``tasks/mcbad.yaml`` reading ``tasks/m.jsonl`` (twenty good rows, then ``rows``)."""
    return steps(write("tasks/m.jsonl", "".join(mc_row(n) for n in range(20)) + rows),
                 write("tasks/mcbad.yaml", MC.format(file="m.jsonl", extra=extra)))


RESUME = ["continual", "--config", "continual.yaml"]


class Pwn:
    """Unpickling this creates a folder ``pwned``: the harness then sees a file written."""

    def __reduce__(self):
        return (os.mkdir, ("pwned",))


@dataclass
class Case:
    """One bad input: a name, the class of mistake, a setup of the sandbox, and the CLI arguments."""

    name: str
    kind: str
    args: list[str]
    setup: Callable[[Path], None] | None = None


CASES = [
    # 5. the command line
    Case("yaml-syntax-error", "cli", ["fit", "--config", "bad.yaml"], write("bad.yaml", "model:\n  lr: [1,\n data: x\n")),
    Case("unknown-top-key", "cli", ["fit", "--config", "base.yaml", "--config", "bad.yaml"], write("bad.yaml", "modle:\n  lr: 0.1\n")),
    Case("unknown-model-key", "cli", ["fit", "--config", "bad.yaml"], lambda s: (s / "bad.yaml").write_text(
        (s / "base.yaml").read_text().replace("  run_dir: run", "  run_dir: run\n  learning_rate: 0.1"))),
    Case("abbreviated-option", "cli", FIT + ["--data.max_train", "10"]),
    Case("unknown-option", "cli", FIT + ["--model.lrr", "0.1"]),
    Case("wrong-type-option", "cli", FIT + ["--model.lr", "fast"]),
    Case("interpolation-unknown", "cli", ["fit", "--config", "bad.yaml"], lambda s: (s / "bad.yaml").write_text(
        (s / "base.yaml").read_text().replace("${model.run_dir}/lightning", "${model.rundir}/lightning"))),
    Case("config-not-found", "cli", ["fit", "--config", "nope.yaml"]),
    Case("unknown-subcommand", "cli", ["fitt", "--config", "base.yaml"]),
    Case("adapter-type-unknown", "cli", FIT + ["--model.adapter.type", "lora"]),
    Case("reduction-factor-zero", "cli", FIT + ["--model.adapter.reduction_factor", "0"]),
    Case("batch-size-zero", "cli", FIT + ["--data.batch_size", "0"]),
    Case("sampling-unknown", "cli", FIT + ["--data.sampling", "random"]),
    Case("backbone-missing", "cli", FIT + ["--model.backbone", "./no-such-model"]),
    Case("backbone-hub-name", "cli", FIT + ["--model.backbone", "bert-base-uncased"]),
    Case("trainer-option-bad", "cli", FIT + ["--trainer.max_epochs", "-5"]),
    # 3. found before the work
    Case("task-unknown", "early", FIT + ["--data.tasks", "[keywrd]"]),
    Case("task-twice", "early", FIT + ["--data.tasks", "[keyword, keyword]"]),
    Case("two-specs-same-name", "early", FIT + ["--data.tasks", "[keyword, tasks/copy.yaml]"],
         lambda s: (s / "tasks/copy.yaml").write_text((s / "tasks/keyword.yaml").read_text() + "name: keyword\n")),
    Case("max-length-too-long", "early", FIT + ["--data.tasks", "[long]"], lambda s: (s / "tasks/long.yaml").write_text(
        (s / "tasks/keyword.yaml").read_text().replace("max_length: 16", "max_length: 4096").replace(
            "train: keyword.csv", "train: keyword.csv"))),
    Case("predict-max-length-too-long", "early", PREDICT + ["--data.predict_max_length", "4096"]),
    Case("single-class-train", "early", FIT + ["--data.tasks", "[one]"], steps(
        write("tasks/one.csv", "text,label\n" + "".join(f"good words {i},good\n" for i in range(40))),
        write("tasks/one.yaml", "source: {type: files, train: one.csv}\ntext_fields: [text]\nlabel_field: label\n"
                                "labels: [bad, good]\nmax_length: 16\n"))),
    Case("eval-label-unseen-in-train", "early", FIT + ["--data.tasks", "[unseen]"], steps(
        write("tasks/unseen_train.csv", "text,label\n" + "".join(f"w {i},{'bad' if i % 2 else 'good'}\n" for i in range(40))),
        write("tasks/unseen_val.csv", "text,label\n" + "".join(f"v {i},{'ugly' if i % 2 else 'good'}\n" for i in range(10))),
        write("tasks/unseen.yaml", "source: {type: files, train: unseen_train.csv, validation: unseen_val.csv}\n"
                                   "text_fields: [text]\nlabel_field: label\nlabels: [bad, good, ugly]\nmax_length: 16\n"))),
    Case("leave-out-every-layer", "early", FIT + ["--model.adapter.leave_out", "[0, 1]"]),
    Case("label-not-in-labels", "early", FIT + ["--data.tasks", "[odd]"], steps(
        write("tasks/odd.csv", "text,label\na b,good\nc d,weird\n"),
        write("tasks/odd.yaml", "source: {type: files, train: odd.csv}\ntext_fields: [text]\nlabel_field: label\n"
                                "labels: [bad, good]\nmax_length: 16\n"))),
    Case("label-field-missing", "early", FIT + ["--data.tasks", "[nofield]"], write(
        "tasks/nofield.yaml", "source: {type: files, train: keyword.csv}\ntext_fields: [text]\nlabel_field: topic\n"
                              "labels: [bad, good]\nmax_length: 16\n")),
    Case("data-file-missing", "early", FIT + ["--data.tasks", "[gone]"], write(
        "tasks/gone.yaml", "source: {type: files, train: gone.csv}\ntext_fields: [text]\nlabel_field: label\n"
                           "labels: [bad, good]\nmax_length: 16\n")),
    Case("data-file-binary", "early", FIT + ["--data.tasks", "[binary]"], steps(
        write_bytes("tasks/binary.csv", bytes(range(256)) * 8),
        write("tasks/binary.yaml", "source: {type: files, train: binary.csv}\ntext_fields: [text]\n"
                                   "label_field: label\nlabels: [bad, good]\nmax_length: 16\n"))),
    Case("spec-yaml-error", "early", FIT + ["--data.tasks", "[broken]"], write("tasks/broken.yaml", "source: {type: files\n")),
    Case("run-dir-read-only", "early", FIT[:-1] + [READ_ONLY + "/run"]),
    Case("run-dir-is-a-file", "early", FIT[:-1] + ["afile"], write("afile", "not a folder\n")),
    Case("adapters-folder-read-only", "early", FIT, link("new/adapters", "/proc")),
    Case("logger-folder-read-only", "early", FIT, link("new/lightning/logs", "/proc")),
    Case("cache-dir-read-only", "early", FIT + ["--data.cache_dir", READ_ONLY + "/cache"]),
    Case("predictions-read-only", "early", PREDICT + ["--trainer.callbacks+=mtl.predict.PredictionWriter",
                                                      "--trainer.callbacks.output", READ_ONLY + "/p.jsonl"]),
    Case("prefix-cache-not-exact", "early", FIT + ["--model.cache_frozen_prefix", "true"]),
    Case("prefix-cache-dtype", "early", FIT + ["--model.cache_frozen_prefix", "true", "--model.adapter.drop_first", "1",
                                               "--model.cache_dtype", "int8"]),
    Case("export-exists", "early", ["fit", "--config", "base.yaml"]),
    Case("overwrite-fused-adapter", "early", ["fit", "--config", "base.yaml", "--model.overwrite", "true",
                                              "--data.tasks", "[keyword]"]),
    Case("overwrite-fused-adapter-loaded", "early", ADD[:-1] + ["[keyword]", "--model.overwrite", "true"]),
    Case("eval-task-not-loaded", "early", ADD + ["--data.eval_tasks", "[ghost]"],
         write("tasks/ghost.yaml", "source: {type: files, train: keyword.csv}\ntext_fields: [text]\n"
                                   "label_field: label\nlabels: [bad, good]\nmax_length: 16\n")),
    Case("load-from-missing", "early", ADD[:4] + ["no-run"] + ADD[5:]),
    Case("fusion-adapter-unknown", "early", ["fit", "--config", "fusion.yaml", "--model.fusion.adapters",
                                             "[keyword, ghost]", "--model.fusion.name", "mood2"]),
    # 4. every file mtl reads
    Case("adapter-truncated", "files", PREDICT, truncate("run/adapters/keyword/adapter.safetensors")),
    Case("adapter-is-pickle", "files", PREDICT, write_bytes("run/adapters/keyword/adapter.safetensors",
                                                            pickle.dumps({"a": 1}))),
    Case("adapter-config-list", "files", PREDICT, write("run/adapters/keyword/adapter_config.json", "[1, 2]\n")),
    Case("adapter-config-wrong-types", "files", PREDICT, lambda s: (s / "run/adapters/keyword/adapter_config.json")
         .write_text((s / "run/adapters/keyword/adapter_config.json").read_text()
                     .replace('"labels": [', '"labels": 7, "x": [', 1))),
    Case("adapter-config-truncated", "files", PREDICT, truncate("run/adapters/keyword/adapter_config.json")),
    Case("fusion-config-truncated", "files", PREDICT, truncate("run/fusions/mood/fusion_config.json")),
    Case("fusion-weights-truncated", "files", PREDICT, truncate("run/fusions/mood/fusion.safetensors")),
    Case("adapter-tensor-nan", "files", PREDICT, poison("run/adapters/keyword/adapter.safetensors")),
    Case("head-tensor-inf", "files", PREDICT, poison("run/adapters/colour/adapter.safetensors", float("inf"),
                                                     "head.out.weight")),
    Case("fusion-tensor-nan", "files", PREDICT, poison("run/fusions/mood/fusion.safetensors")),
    Case("router-tensor-nan", "files", PREDICT[:4] + ["crun/steps/02-colour"] + PREDICT[5:] + ["--model.router", "auto"],
         poison("crun/steps/02-colour/router/router.safetensors", tensor="means")),
    Case("continual-resume-adapter-nan", "continual", RESUME,
         poison("crun/steps/02-colour/adapters/keyword/adapter.safetensors", float("-inf"))),
    Case("predict-router-missing", "files", PREDICT + ["--model.router", "nope"]),
    Case("predict-task-auto-without-router", "files", PREDICT + ["--model.router", "auto"]),
    Case("import-adapterhub-mtl-folder", "files", ["import-adapterhub", "run/adapters/keyword", "--backbone",
                                                   "backbone", "--run_dir", "imported"]),
    Case("import-adapterhub-not-a-folder", "files", ["import-adapterhub", "texts.txt", "--backbone", "backbone",
                                                     "--run_dir", "imported"]),
    Case("serve-store-missing", "files", ["serve", "--serve.store", "nowhere"]),
    Case("serve-store-without-exports", "files", ["serve", "--serve.store", "run/lightning"]),
    Case("serve-port-out-of-range", "cli", ["serve", "--serve.store", "run", "--serve.port", "80"]),
    Case("serve-host-not-bindable", "cli", ["serve", "--serve.store", "run", "--serve.host", "10.1.2.3"]),
    Case("serve-unknown-key", "cli", ["serve", "--serve.store", "run", "--serve.max_resdent", "4"]),
    # weights are read at first load now (a truncated file is that part's 503, tests/test_serving_store_hostile.py);
    # a store whose every part is refused at indexing still ends before anything starts
    Case("serve-adapter-configs-broken", "files", ["serve", "--serve.store", "run"],
         steps(*(write(f"run/{part}", "{not json") for part in ("adapters/keyword/adapter_config.json",
                                                                "adapters/colour/adapter_config.json",
                                                                "fusions/mood/fusion_config.json")))),
    Case("predict-file-missing", "files", PREDICT[:-3] + ["nope.txt"] + PREDICT[-2:]),
    Case("predict-file-binary", "files", PREDICT, write_bytes("texts.txt", b"\xff\xfe\x00bad" * 10)),
    Case("predict-file-lone-surrogate", "files", PREDICT[:-3] + ["texts.jsonl"] + PREDICT[-2:],
         write("texts.jsonl", '{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')),
    Case("task-text-lone-surrogate", "early", FIT + ["--data.tasks", "[lonely]"], steps(
        write("tasks/lonely.jsonl", "".join(f'{{"text": "w {i}{chr(92) + "udc00" if i == 5 else ""}", '
                                          f'"label": "{"bad" if i % 2 else "good"}"}}\n' for i in range(40))),
        write("tasks/lonely.yaml", "source: {type: files, train: lonely.jsonl}\ntext_fields: [text]\n"
                                 "label_field: label\nlabels: [bad, good]\nmax_length: 16\n"))),
    Case("ckpt-missing", "files", TEST[:-1] + ["nope.ckpt"]),
    Case("ckpt-is-pickle", "files", TEST, write_bytes(CKPT, pickle.dumps({"state_dict": {}}))),
    Case("ckpt-malicious-pickle", "files", TEST, lambda s: (s / CKPT).write_bytes(pickle.dumps(Pwn()))),
    Case("ckpt-truncated", "files", TEST, truncate(CKPT)),
    Case("ckpt-is-text", "files", TEST, write(CKPT, "hello\n")),
    Case("ckpt-not-mtl", "files", TEST, lambda s: __import__("torch").save({"weights": [1, 2]}, s / CKPT)),
    # 1. a checkpoint never silently replaces the configuration
    Case("ckpt-other-reduction", "checkpoint", TEST[:-1] + [OTHER_CKPT],
         other_checkpoint(["--model.adapter.reduction_factor", "8"])),
    Case("ckpt-other-tasks", "checkpoint", TEST[:-1] + [OTHER_CKPT], other_checkpoint(["--data.tasks", "[keyword]"])),
    Case("ckpt-other-adapter-type", "checkpoint", TEST[:-1] + [OTHER_CKPT],
         other_checkpoint(["--model.adapter.type", "houlsby"])),
    Case("ckpt-other-head-pooling", "checkpoint", TEST[:-1] + [OTHER_CKPT],
         other_checkpoint(["--model.head_pooling", "cls"])),
    # ---- continual runs: the sequence, the strategy, resuming with other settings, compare
    Case("continual-empty-order", "continual", CONTINUAL + ["--continual.order", "[]"]),
    Case("continual-one-task", "continual", CONTINUAL + ["--continual.order", "[keyword]"]),
    Case("continual-task-twice", "continual", CONTINUAL + ["--continual.order", "[keyword, colour, keyword]"]),
    Case("continual-unknown-strategy", "continual", CONTINUAL + ["--continual.strategy", "lwf"]),
    Case("continual-replay-size-negative", "continual", CONTINUAL + ["--continual.strategy", "replay",
                                                                     "--continual.replay_size", "-10"]),
    Case("continual-ewc-lambda-negative", "continual", CONTINUAL + ["--continual.strategy", "ewc",
                                                                    "--continual.ewc_lambda", "-1"]),
    Case("continual-fusion-one-task", "continual", CONTINUAL + ["--continual.strategy", "fusion",
                                                                "--continual.order", "[keyword]"]),
    Case("continual-fusion-unknown-setting", "continual", CONTINUAL + ["--continual.strategy", "fusion",
                                                                       "--continual.fusion", "{type: wide}"]),
    Case("continual-unknown-router", "continual", CONTINUAL + ["--continual.routers", "[knn]"]),
    Case("continual-missing-spec", "continual", CONTINUAL + ["--continual.order", "[keyword, nosuch]"]),
    Case("continual-runner-key", "continual", CONTINUAL + ["--model.load_from", "run"]),
    Case("continual-ddp", "continual", CONTINUAL + ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                                    "--trainer.accelerator", "cpu"]),
    Case("continual-two-devices", "continual", CONTINUAL + ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]),
    Case("continual-runner-key-in-yaml", "continual", CONTINUAL + ["--config", "bad.yaml"],
         write("bad.yaml", "data:\n  tasks: [keyword]\n")),
    Case("continual-run-dir-holds-a-fit-run", "continual", CONTINUAL + ["--continual.run_dir", "run"]),
    Case("continual-steps-folder-read-only", "continual", CONTINUAL, link("cnew/steps", "/proc")),
    Case("continual-resume-other-order", "continual", RESUME + ["--continual.order", "[colour, keyword]"]),
    Case("continual-resume-other-strategy", "continual", RESUME + ["--continual.strategy", "shared"]),
    Case("continual-resume-changed-spec", "continual", RESUME,
         lambda s: (s / "tasks/colour.yaml").write_text((s / "tasks/colour.yaml").read_text().replace(
             "max_length: 16", "max_length: 12"))),
    Case("continual-state-corrupt", "continual", RESUME, truncate("crun/state.json")),
    Case("continual-state-completed-too-big", "continual", RESUME,
         edit_json("crun/state.json", lambda d: d.update(completed=7))),
    Case("continual-state-step-outside", "continual", RESUME,
         edit_json("crun/state.json", lambda d: d["steps"].__setitem__(2, "../run"))),
    Case("continual-state-fingerprint-missing", "continual", RESUME,
         edit_json("crun/state.json", lambda d: d["strategy_state"]["fingerprints"].pop("keyword"))),
    Case("continual-final-stage-changed", "continual", RESUME,
         nudge("crun/steps/02-colour/adapters/keyword/adapter.safetensors")),
    # tagging (token classification) data: the file, the line and the field
    Case("tagging-word-tag-count-differs", "tagging", TAG_FIT, tagging("t.jsonl", GOOD_ROW * 3 +
                                                                       '{"tokens": ["a", "b"], "tags": ["O"]}\n')),
    Case("tagging-empty-sentence", "tagging", TAG_FIT, tagging("t.jsonl", GOOD_ROW * 3 + '{"tokens": [], "tags": []}\n')),
    Case("tagging-word-not-a-string", "tagging", TAG_FIT, tagging("t.jsonl", GOOD_ROW * 3 +
                                                                  '{"tokens": ["a", 7], "tags": ["O", "O"]}\n')),
    Case("tagging-tag-outside-labels", "tagging", TAG_FIT, tagging("t.txt", "alpha O\ngood B-KEY\n\nbeta O\n"
                                                                   "river I-KYE\n")),
    Case("tagging-conll-too-few-columns", "tagging", TAG_FIT, tagging("t.txt", "alpha X O\ngood B-KEY\n",
                                                                      ", tag_column: 2")),
    Case("tagging-conllu-wrong-column-count", "tagging", TAG_FIT, tagging(
        "t.conllu", "1\talpha\t_\tX\t_\t_\t0\troot\t_\n2\tgood\t_\tADJ\t_\t_\t1\tamod\n")),
    Case("tagging-doc-stride-too-big", "tagging", TAG_FIT, tagging("t.jsonl", GOOD_ROW, "", "doc_stride: 20\n")),
    Case("conll-format-for-a-classifier", "tagging", TAG_FIT, steps(tagging("t.txt", "alpha O\n", ", format: conll"),
                                                                    lambda s: (s / "tasks/tagbad.yaml").write_text(
        (s / "tasks/tagbad.yaml").read_text().replace("token_classification", "classification")))),
    # extractive QA data: the file and the row
    Case("qa-answer-not-in-context", "qa", QA_FIT, question_answering(qa_row(9, start=0))),
    Case("qa-empty-question", "qa", QA_FIT, question_answering(qa_row(9, question=" "))),
    Case("qa-answer-without-start", "qa", QA_FIT, question_answering(
        '{"question": "q", "context": "red 9", "answers": [{"text": "red"}]}\n')),
    Case("qa-question-leaves-no-room", "qa", QA_FIT, question_answering(qa_row(9, question="which " * 30))),
    Case("qa-labels-given", "qa", QA_FIT, question_answering("", "labels: [a, b]\n")),
    # multiple-choice data: the file and the row
    Case("mc-one-choice", "mc", MC_FIT, multiple_choice(mc_row(9, choices=["red"]))),
    Case("mc-fewer-choices-than-labels", "mc", MC_FIT, multiple_choice(mc_row(9, choices=["red", "cloud"]))),
    Case("mc-label-out-of-range", "mc", MC_FIT, multiple_choice(mc_row(9, label=3))),
    Case("mc-label-not-a-choice", "mc", MC_FIT, multiple_choice(mc_row(9, label="green"))),
    Case("mc-empty-question", "mc", MC_FIT, multiple_choice(mc_row(9, question=""))),
    Case("mc-one-choice-position", "mc", MC_FIT, steps(multiple_choice(""), lambda s: (s / "tasks/mcbad.yaml")
                                                     .write_text(MC.format(file="m.jsonl", extra="")
                                                                 .replace("[A, B, C]", "[A]")))),
    Case("compare-run-missing", "continual", ["compare", "crun", "nope"]),
    Case("compare-results-corrupt", "continual", ["compare", "crun"], truncate("crun/results.json")),
]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``root``: mode and content hash (folders: '')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel + "/"] = (0, "")
        else:
            out[rel] = (path.stat().st_mode & 0o777, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_case(case: Case, base: Path, work: Path) -> dict[str, object]:
    """Copy the sandbox, apply the setup, run the CLI, and diff the sandbox."""
    sandbox = work / case.name
    shutil.rmtree(sandbox, ignore_errors=True)
    shutil.copytree(base, sandbox)
    if case.setup is not None:
        case.setup(sandbox)
    before = snapshot(sandbox)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, TRAIN, *case.args], cwd=sandbox, capture_output=True, text=True,
                          env=_env(sandbox), timeout=600)
    wall = time.perf_counter() - start
    after = snapshot(sandbox)
    written = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    removed = sorted(set(before) - set(after))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    ok = (done.returncode == 2 and len(lines) <= 3 and "Traceback" not in done.stderr
          and not written and not changed and not removed)
    return {"case": case.name, "kind": case.kind, "rc": done.returncode, "lines": len(lines),
            "error": next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")[:200], "traceback": "Traceback" in done.stderr,
            "written": written, "changed": changed, "removed": removed, "ok": ok, "wall": wall,
            "stderr": done.stderr}


def main() -> None:
    """Build the sandbox once, run the cases, print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("-j", type=int, default=2, help="cases run at once")
    parser.add_argument("--work", type=Path, default=None, help="folder for the sandbox (default: a temp folder)")
    parser.add_argument("--show", action="store_true", help="print the full stderr of failing cases")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mtl-bad-inputs-"))
    base = work / "base"
    if not (base / ".complete").is_file():
        print(f"building the sandbox in {base} ...", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        build_base(base)
    cases = [c for c in CASES if args.k in c.name]
    with ThreadPoolExecutor(args.j) as pool:
        results = list(pool.map(lambda c: run_case(c, base, work / "cases"), cases))
    print("| case | kind | exit | stderr lines | error line (first stderr line if none) | written / changed / removed "
          "| ok |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        files = ", ".join(r["written"][:2] + r["changed"][:2] + r["removed"][:2])
        n = len(r["written"]) + len(r["changed"]) + len(r["removed"])
        first = r["error"].replace("|", "\\|")
        print(f"| {r['case']} | {r['kind']} | {r['rc']} | {r['lines']}{' (traceback)' if r['traceback'] else ''} | "
              f"{first} | {n}{': ' + files if n else ''} | {'yes' if r['ok'] else 'NO'} |")
    if args.show:
        for r in results:
            if not r["ok"]:
                print(f"\n===== {r['case']} =====\n{r['stderr'][-4000:]}")
    good = sum(r["ok"] for r in results)
    print(f"\n{good}/{len(results)} cases met every expectation (exit 2, <= 3 stderr lines, no traceback, "
          f"nothing written or changed)")
    shutil.rmtree(work / "cases", ignore_errors=True)


if __name__ == "__main__":
    main()
