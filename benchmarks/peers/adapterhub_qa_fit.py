"""Peer QA fit: AdapterHub's own training of a Pfeiffer adapter + question-answering head on an extractive QA task, on
the rows mtl reads, scored as mtl scores QA.

Run with the separate environment made by setup_adapterhub.sh (never mtl's own), from the repository root:

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_qa_fit.py --rows ROWS.json [--seed 0] \
        [--epochs 10] [--batch-size 16] [--eval-batch 64] [--lr 5e-3] [--warmup 0.1] [--threads 2] \
        [--precision auto] [--max-length 384] [--doc-stride 128] [--max-answer-length 30] [--no-backbone-dropout] [--max-train N]

``ROWS.json``: ``{split: [{question, context, answers: [{text, answer_start}]}]}``, the rows mtl's
``load_task_dataset`` gives for the task (benchmarks/kind_accuracy.py writes it), so both systems read the same rows.

What it does, in AdapterHub's idiom: ``AutoAdapterModel.from_pretrained`` on the MiniLM folder,
``add_adapter(task, config=SeqBnConfig(reduction_factor=16))``, ``add_qa_head(task)`` (one layer: a start and an end
logit per token), ``train_adapter(task)``. Each (question, context) is tokenised as Hugging Face's ``run_qa.py``
example does: ``truncation="only_second"``, ``max_length``, ``stride`` = ``doc_stride``, overflowing windows with the
offset mapping; a window is labelled with the first answer's start and end tokens, or with token 0 ([CLS]) where the
answer is not wholly inside it. ``DataCollatorWithPadding`` pads each batch; shuffled batches; ``torch.optim.AdamW``
(weight decay 0.01) with ``get_linear_schedule_with_warmup``; the loss is the one the head returns for
``start_positions`` / ``end_positions``. Evaluation: per window the best span over its context tokens with
start <= end < start + ``--max-answer-length`` tokens by start + end logit, per example the best over its windows (mtl's rule, re-done
here), its text from the offsets; exact match and F1 by mtl's own ``mtl/kinds/answer_match.py`` (pure Python, loaded by
file path). The best epoch by validation F1 is restored and scored on the test split. ``--precision auto``: bf16
autocast where the CPU computes bf16 natively, as mtl's rule.

Stdout: one JSON line (seed, test scores, wall seconds per phase, settings). Progress goes to stderr.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the start-up phase counts from here

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from adapterhub_fit import Clock, log, model_dir  # noqa: E402  (this folder: run as a script from here)
from peer_training import adapter_model, fit_arguments, fit_best, start, train_mode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_matching():
    """mtl's SQuAD answer matching (mtl/kinds/answer_match.py, pure Python), loaded by file path."""
    spec = importlib.util.spec_from_file_location("mtl_answer_match", ROOT / "mtl" / "kinds" / "answer_match.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def windows(tokenizer, rows: list[dict], max_length: int, stride: int) -> list[dict]:
    """Every example's windows: inputs, start / end labels of the first answer, offsets (None outside the context),
    the example's position."""
    enc = tokenizer([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        sequence = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence)]
        start = end = 0
        answers = rows[example]["answers"]
        if answers:
            first, last = answers[0]["answer_start"], answers[0]["answer_start"] + len(answers[0]["text"])
            tokens = [t for t, o in enumerate(offsets) if o is not None and o[1] > o[0]]
            if tokens and offsets[tokens[0]][0] <= first and offsets[tokens[-1]][1] >= last:
                start = next(t for t in tokens if offsets[t][1] > first)
                end = next(t for t in reversed(tokens) if offsets[t][0] < last)
        item = {k: enc[k][w] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out.append({**item, "start_positions": start, "end_positions": end, "offsets": offsets, "example": example})
    return out


def best_span(start: list[float], end: list[float], offsets: list, longest: int) -> tuple[float, int, int]:
    """(start + end logit, first character, end character) of a window's best span over its context tokens, at most
    ``longest`` tokens long."""
    best = (float("-inf"), 0, 0)
    for s in range(len(offsets)):
        if offsets[s] is None:
            continue
        for e in range(s, min(s + longest, len(offsets))):
            if offsets[e] is not None and start[s] + end[e] > best[0]:
                best = (start[s] + end[e], offsets[s][0], offsets[e][1])
    return best


def main() -> None:
    parser = fit_arguments(__doc__.splitlines()[0], "population_spans", epochs=10, lr=5e-3, max_length=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-answer-length", type=int, default=30, help="tokens; the task spec's (SQuAD's is 30)")
    args = parser.parse_args()
    clock = Clock()
    bf16, autocast = start(args)

    import adapters
    import transformers
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    model = adapter_model(args.task, lambda m: m.add_qa_head(args.task))
    train_mode(model, not args.no_backbone_dropout)
    clock.phases["startup"] = time.time() - STARTED
    log(f"adapterhub_qa_fit: adapters {adapters.__version__}, transformers {transformers.__version__}; {args.task}; "
        f"{'bf16 autocast' if bf16 else 'fp32'}; start-up {clock.phases['startup']:.1f} s")

    with clock("data"):
        rows = json.loads(args.rows.read_text())
        if args.max_train:
            rows["train"] = rows["train"][:args.max_train]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        splits = {split: windows(tokenizer, r, args.max_length, args.doc_stride) for split, r in rows.items()}
        pad = DataCollatorWithPadding(tokenizer)

        def collate(items: list[dict]) -> dict:
            batch = pad([{k: v for k, v in i.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                         for i in items])
            for key in ("start_positions", "end_positions"):
                batch[key] = torch.tensor([i[key] for i in items])
            return batch

        generator = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True,
                                                   generator=generator, collate_fn=collate)
    log(f"  data: {', '.join(f'{s} {len(rows[s])} examples, {len(v)} windows' for s, v in splits.items())}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    total = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * args.warmup), total)
    matching = load_matching()

    def score(split: str) -> dict[str, float]:
        """SQuAD exact match and F1 of each example's best span over its windows."""
        model.eval()
        best: dict[int, tuple[float, int, int]] = {}
        items = splits[split]
        with torch.inference_mode(), autocast():
            for at in range(0, len(items), args.eval_batch):
                chunk = items[at:at + args.eval_batch]
                batch = collate(chunk)
                batch.pop("start_positions"), batch.pop("end_positions")
                out = model(**batch)
                for item, s, e in zip(chunk, out.start_logits.float().tolist(), out.end_logits.float().tolist()):
                    span = best_span(s, e, item["offsets"], args.max_answer_length)
                    if item["example"] not in best or span[0] > best[item["example"]][0]:
                        best[item["example"]] = span
        train_mode(model, not args.no_backbone_dropout)
        exact = f1 = 0.0
        for example, (_, a, b) in best.items():
            row = rows[split][example]
            golds = [x["text"] for x in row["answers"]]
            exact += matching.exact_match(row["context"][a:b], golds)
            f1 += matching.f1_score(row["context"][a:b], golds)
        return {"exact": exact / len(best), "f1": f1 / len(best)}

    best_epoch, best_f1, val_f1s = fit_best(model, train_loader, optimizer, scheduler, args.epochs, autocast, clock,
                                            lambda: score("validation")["f1"], log)
    with clock("test"):
        test = score("test")
    total_s = time.time() - STARTED
    log(f"  best epoch {best_epoch} (val f1 {best_f1:.4f}); test f1 {test['f1']:.4f} exact {test['exact']:.4f}; "
        f"{total_s:.1f} s")
    print(json.dumps({
        "system": "adapterhub", "task": args.task, "seed": args.seed, "test_f1": test["f1"],
        "test_exact": test["exact"], "phases": {k: round(v, 3) for k, v in clock.phases.items()},
        "total_s": round(total_s, 3), "best_epoch": best_epoch, "val_f1": val_f1s, "steps": total,
        "settings": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "warmup": args.warmup,
                     "max_length": args.max_length, "doc_stride": args.doc_stride,
                     "max_answer_length": args.max_answer_length, "max_train": args.max_train,
                     "precision": "bf16 autocast" if bf16 else "fp32",
                     "backbone_dropout": not args.no_backbone_dropout, "adapters": adapters.__version__},
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
