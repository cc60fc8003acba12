"""Peer multiple-choice fit: AdapterHub's own training of a Pfeiffer adapter + multiple-choice head, on the rows mtl
reads, scored as mtl scores multiple choice (accuracy).

Run with the separate environment made by setup_adapterhub.sh (never mtl's own), from the repository root:

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_mc_fit.py --rows ROWS.json [--seed 0] \
        [--epochs 5] [--batch-size 16] [--eval-batch 64] [--lr 1e-3] [--warmup 0.1] [--threads 2] \
        [--precision auto] [--max-length 128] [--no-backbone-dropout] [--max-train N]

``ROWS.json``: ``{split: [{context, question, choices: [...], label: index}]}``, the rows mtl's ``load_task_dataset``
gives for the task (benchmarks/kind_accuracy.py writes it), so both systems read the same rows.

What it does, in AdapterHub's idiom: ``AutoAdapterModel.from_pretrained`` on the MiniLM folder,
``add_adapter(task, config=SeqBnConfig(reduction_factor=16))``, ``add_multiple_choice_head(task, num_choices=C)``
(two layers on the first token, a score per (question, choice) sequence, a softmax over an item's C choices),
``train_adapter(task)``. Each choice is one sequence, paired as mtl pairs them: (context, question + " " + choice),
or (question, choice) without a context, cut at ``max_length`` from the longest segment. A batch is
``batch_size`` items, [items, choices, tokens] padded to its longest sequence (AdapterHub's model flattens it);
shuffled batches; ``torch.optim.AdamW`` (weight decay 0.01) with ``get_linear_schedule_with_warmup``; the loss is the
one the head returns for ``labels``. The best epoch by validation accuracy is restored and scored on the test split.
``--precision auto``: bf16 autocast where the CPU computes bf16 natively, as mtl's rule.

Stdout: one JSON line (seed, test accuracy, wall seconds per phase, settings). Progress goes to stderr.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the start-up phase counts from here

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from adapterhub_fit import Clock, log, model_dir  # noqa: E402  (this folder: run as a script from here)
from peer_training import adapter_model, fit_arguments, fit_best, start, train_mode  # noqa: E402


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Each item as its choices' encodings and its label."""
    out = []
    for row in rows:
        if row.get("context"):
            first, second = [row["context"]] * len(row["choices"]), [f"{row['question']} {c}" for c in row["choices"]]
        else:
            first, second = [row["question"]] * len(row["choices"]), list(row["choices"])
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        out.append({"choices": [{k: enc[k][c] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
                                for c in range(len(first))], "label": row["label"]})
    return out


def main() -> None:
    args = fit_arguments(__doc__.splitlines()[0], "social_iqa", epochs=5, lr=1e-3, max_length=128).parse_args()
    clock = Clock()
    bf16, autocast = start(args)

    import adapters
    import transformers
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    rows = json.loads(args.rows.read_text())
    choices = len(rows["train"][0]["choices"])
    model = adapter_model(args.task, lambda m: m.add_multiple_choice_head(args.task, num_choices=choices))
    train_mode(model, not args.no_backbone_dropout)
    clock.phases["startup"] = time.time() - STARTED
    log(f"adapterhub_mc_fit: adapters {adapters.__version__}, transformers {transformers.__version__}; {args.task}; "
        f"{choices} choices; {'bf16 autocast' if bf16 else 'fp32'}; start-up {clock.phases['startup']:.1f} s")

    with clock("data"):
        if args.max_train:
            rows["train"] = rows["train"][:args.max_train]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        splits = {split: encode(tokenizer, r, args.max_length) for split, r in rows.items()}
        pad = DataCollatorWithPadding(tokenizer)

        def collate(items: list[dict]) -> dict:
            flat = pad([c for item in items for c in item["choices"]])
            batch = {k: v.view(len(items), choices, -1) for k, v in flat.items()}
            batch["labels"] = torch.tensor([item["label"] for item in items])
            return batch

        generator = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True,
                                                   generator=generator, collate_fn=collate)
    log(f"  data: {', '.join(f'{s} {len(v)} items' for s, v in splits.items())}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    total = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * args.warmup), total)

    def accuracy(split: str) -> float:
        """The share of items whose highest-scored choice is the right one."""
        model.eval()
        right = 0
        items = splits[split]
        with torch.inference_mode(), autocast():
            for at in range(0, len(items), args.eval_batch):
                batch = collate(items[at:at + args.eval_batch])
                labels = batch.pop("labels")
                right += int((model(**batch).logits.float().argmax(-1) == labels).sum())
        train_mode(model, not args.no_backbone_dropout)
        return right / len(items)

    best_epoch, best_acc, val_accs = fit_best(model, train_loader, optimizer, scheduler, args.epochs, autocast, clock,
                                              lambda: accuracy("validation"), log)
    with clock("test"):
        test = accuracy("test")
    total_s = time.time() - STARTED
    log(f"  best epoch {best_epoch} (val acc {best_acc:.4f}); test acc {test:.4f}; {total_s:.1f} s")
    print(json.dumps({
        "system": "adapterhub", "task": args.task, "seed": args.seed, "test_acc": test,
        "phases": {k: round(v, 3) for k, v in clock.phases.items()}, "total_s": round(total_s, 3),
        "best_epoch": best_epoch, "val_acc": val_accs, "steps": total,
        "settings": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "warmup": args.warmup,
                     "max_length": args.max_length, "max_train": args.max_train, "choices": choices,
                     "precision": "bf16 autocast" if bf16 else "fp32",
                     "backbone_dropout": not args.no_backbone_dropout, "adapters": adapters.__version__},
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
