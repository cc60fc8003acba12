"""AdapterHub AdapterFusion on MiniLM-L6: a reference dump for equivalence tests, and a speed benchmark.

Run with the separate environment made by setup_adapterhub.sh (never mtl's own; this script does not import mtl):

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_fusion.py dump \
        --out FILE.safetensors [--seed 0] [--adapters 2] [--batch 4] [--seq 16]
    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_fusion.py bench \
        [--rows "infer single" "infer fuse N=8" ...] [--steps 10] [--batch 32] [--seq 128] [--threads 2]

``dump`` builds the plain BertModel (``AutoModel`` + ``adapters.init``), adds N ``SeqBnConfig()`` adapters a0, a1, ...
(init_weights="bert": every Linear N(0, 0.02), zero bias, so the up-projections are non-zero) and a "dynamic"
``Fuse(a0, ..., aN-1)`` fusion whose value matrices get N(0, 0.02) noise on top of their near-identity init, activates
the fusion and writes to a safetensors file every adapter and fusion tensor under its AdapterHub state-dict name, plus
``input_ids``, ``attention_mask`` (last 3 tokens of row 0 masked) and the eval-mode ``last_hidden_state``. Metadata
(all strings): ``adapter_names`` (JSON list, in Fuse order), ``fusion_name``, ``fusion_config`` and ``adapter_config``
(JSON of AdapterHub's config dicts), ``adapters_version``, ``transformers_version``, ``torch_version``, ``seed``,
``fusion_T_before`` / ``fusion_T_after``.

``bench`` prints one JSON object per row, ``{"row": ..., "value": ..., "unit": ..., "steps": n}``, like
adapterhub_bench.py (random ids in [1000, 30000), attention mask all ones, median over ``--steps`` after 2 warm-up):

- ``infer single``: one SeqBn adapter active; ``infer fuse N=2|4|8``: N SeqBn adapters + dynamic Fuse over them.
  Bare model (no head), eval + inference_mode; rows/s = batch / median forward time.
- ``train single``: ``train_adapter("a0")``; ``train fuse N=8``: ``train_adapter_fusion(Fuse(...))`` (only the fusion
  layers train, the adapters stay frozen). Both with a Linear(384, 3) head on the masked mean of the last hidden state,
  cross-entropy on random labels (+ ``get_fusion_regularization_loss()`` for fuse, added in the same step, where
  AdapterHub's trainer adds it one step late in a callback), backward, AdamW(lr 1e-3) step; backbone in eval mode,
  adapter / fusion modules and head in train mode. samples/s = batch / median step time.

Tensor names and the math (state-dict names of the plain BertModel, so no ``bert.`` prefix; l = layer 0..5, H = 384,
r = H / reduction_factor 16 = 24). Everything sits in ``BertOutput`` (the FFN output sub-block): with x the attention
sub-block's output (the FFN input and its residual, ``input_tensor``), h = ``output.dense(GELU(intermediate.dense(x)))``
(dropout is identity in eval) and LN = the layer's own ``encoder.layer.l.output.LayerNorm``, the plain layer computes
LN(h + x). SeqBnConfig (Pfeiffer) has original_ln_before=True, residual_before_ln=True, original_ln_after=True,
ln_before/ln_after=False, scaling=1.0 (a float, not a parameter), dropout 0.0, non_linearity "relu":

- ``encoder.layer.l.output.adapters.<a>.adapter_down.0.weight`` [r, H] / ``.bias`` [r]: the down Linear;
  ``adapter_down.1`` is the ReLU (no parameters). ``encoder.layer.l.output.adapters.<a>.adapter_up.weight`` [H, r] /
  ``.bias`` [H]: the up Linear. With z = LN(h + x) (the adapter input, after the original LayerNorm):
  up_a = scaling * (ReLU(z W_down^T + b_down) W_up^T + b_up). The adapter's residual is h (taken *before* adding x,
  residual_before_ln=True), and a single active adapter gives y = LN(up_a + h + x), i.e. LN is applied twice with the
  same parameters (once to form z, once to the output).
- ``encoder.layer.l.output.adapter_fusion_layer.<f>.query.weight`` [H, H] / ``.bias`` [H],
  ``...key.weight`` [H, H] / ``.bias`` [H], ``...value.weight`` [H, H] (no bias), with <f> the fusion name
  ",".join(adapter names), e.g. ``a0,a1``. Dynamic config: query/key/value on, value_before_softmax=True,
  residual_before=False, query_before_ln=False, temperature=False. The fusion runs the last adapter's pre-forward, so
  every fused adapter gets the same z = LN(h + x) and only its up_i is used (not its own residual output). Then
  q = z Wq^T + bq; k_i = up_i Wk^T + bk; v_i = up_i Wv^T; s_i = q . k_i (no 1/sqrt(H) scaling; dropout with
  p = attention_probs_dropout_prob = 0.1 is applied to s in train mode, before the softmax); p = softmax_i(s / T)
  with T = 1.0; c = sum_i p_i v_i + h; y = LN(c + x) = LN(x + h + sum_i p_i up_i Wv^T).
  Init: query/key N(0, 0.02) weights and zero bias; value 1.0 on the diagonal, 1e-6 elsewhere.
  ``get_fusion_regularization_loss()`` = sum over layers of 0.01 * ||I - Wv||_F^2 (only while Wv requires grad).
- Temperature: ``BertFusion.forward`` sets T = max(T - T0 / 1000, 1.0) on *every* call, training or eval. With the
  dynamic config (temperature=False) T starts at 1.0 and so never moves; with temperature=True it starts at 50 and
  also decays during eval forwards (``dump`` prints both to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# same folder, same venv: the shared timing and loading helpers
from adapterhub_bench import inputs, log, median_time, model_dir  # noqa: E402

HIDDEN = 384
NUM_LABELS = 3
INFER_ROWS = {"infer single": 0, "infer fuse N=2": 2, "infer fuse N=4": 4, "infer fuse N=8": 8}
TRAIN_ROWS = {"train fuse N=8": 8, "train single": 0}
ROWS = [*INFER_ROWS, *TRAIN_ROWS]


def quiet_logs() -> None:
    """Silence loading notices and one spurious adapters warning, unless TRANSFORMERS_VERBOSITY is set."""
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        # adapters 1.3.0 logs this from set_active_adapters() -> reset_adapter() before the new setup is active
        logging.getLogger("adapters.model_mixin").addFilter(
            lambda record: "none are activated for the forward pass" not in record.getMessage())


def load_model() -> tuple[nn.Module, list[str]]:
    """Plain MiniLM BertModel with AdapterHub's mixins; also returns its state-dict keys before adapters exist."""
    import adapters
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()))
    backbone_keys = list(model.state_dict())
    adapters.init(model)
    return model, backbone_keys


def add_adapters(model: nn.Module, n: int, fuse: bool):
    """Adds SeqBn adapters a0..a{n-1} (and a dynamic fusion over them if ``fuse``); returns (names, Fuse or None)."""
    from adapters import SeqBnConfig
    from adapters.composition import Fuse

    names = [f"a{i}" for i in range(n)]
    for name in names:
        model.add_adapter(name, config=SeqBnConfig())
    if not fuse:
        return names, None
    setup = Fuse(*names)
    model.add_adapter_fusion(setup, "dynamic")
    return names, setup


def fusion_modules(model: nn.Module) -> list[nn.Module]:
    """All AdapterFusion (BertFusion) blocks, one per layer and fusion."""
    from adapters.methods.modeling import BertFusion

    return [m for m in model.modules() if isinstance(m, BertFusion)]


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """All bottleneck Adapter blocks, one per layer and adapter."""
    from adapters.methods.modeling import Adapter

    return [m for m in model.modules() if isinstance(m, Adapter)]


def temperature_demo() -> tuple[float, float]:
    """T of a temperature=True BertFusion before/after one eval-mode forward (the decay ignores train/eval)."""
    from adapters import AdapterFusionConfig
    from adapters.methods.modeling import BertFusion

    fusion = BertFusion(AdapterFusionConfig.load("dynamic", temperature=True), 8, 0.1).eval()
    before = fusion.T
    with torch.no_grad():
        up = torch.randn(1, 2, 3, 8)
        fusion(torch.randn(1, 2, 8), up, up.clone(), torch.randn(1, 2, 8))
    return before, fusion.T


def dump(args: argparse.Namespace) -> None:
    """Writes adapter + fusion tensors, inputs and the fused last hidden state to a safetensors file."""
    import adapters
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    model, backbone_keys = load_model()
    names, setup = add_adapters(model, args.adapters, fuse=True)
    ups = [m.adapter_up.weight.abs().max().item() for m in adapter_modules(model)]
    if len(ups) != 6 * args.adapters or min(ups) == 0.0:
        raise SystemExit(f"expected {6 * args.adapters} adapter blocks with non-zero up-projections, got {ups}")
    fusions = fusion_modules(model)
    with torch.no_grad():
        # the value matrix starts at ~identity; noise makes it take part in the comparison
        for fusion in fusions:
            fusion.value.weight.add_(torch.randn_like(fusion.value.weight) * 0.02)
    model.set_active_adapters(setup)
    model.eval()

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    t_before = [f.T for f in fusions]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        t_after = [f.T for f in fusions]
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_active_adapters("a0")
        single = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_active_adapters(setup)
    repeat = (again - hidden).abs().max().item()
    moved = (single - hidden).abs().max().item()
    log(f"fusion temperature T, {len(fusions)} layers: before forward {sorted(set(t_before))}, after eval forward "
        f"{sorted(set(t_after))}")
    demo = temperature_demo()
    log(f"  (a temperature=True fusion goes from T={demo[0]} to T={demo[1]:.3f} in one *eval* forward: AdapterHub "
        f"decays T on every call; the dynamic config has temperature=False, T stays 1.0)")
    status = "OK" if repeat == 0.0 and moved > 1e-4 else "MISMATCH"
    log(f"sanity check: fused vs only a0 active, max |diff| of last hidden state = {moved:.3e}; "
        f"fused forward repeated: {repeat:.1e} [{status}]")
    if status != "OK":
        raise SystemExit("sanity check failed: the fusion is not in the forward path, or eval is not deterministic")

    fusion_name = setup.name
    state = model.state_dict()
    prefixes = tuple(f".adapters.{n}." for n in names) + (f".adapter_fusion_layer.{fusion_name}.",)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if any(p in k for p in prefixes)}
    # adapters.init also registers prompt_tuning.base_model_embeddings, an alias of the word embeddings: not ours
    backbone_ptrs = {state[k].data_ptr() for k in backbone_keys}
    added = {k for k in set(state) - set(backbone_keys) if state[k].data_ptr() not in backbone_ptrs}
    if added != set(tensors):
        raise SystemExit(f"state-dict keys added by adapters not matched by name: {sorted(added ^ set(tensors))}")
    configs = {json.dumps(model.adapters_config.get(n).to_dict(), sort_keys=True) for n in names}
    if len(configs) != 1:
        raise SystemExit(f"adapters have different configs: {configs}")
    fusion_config, fused = model.adapters_config.get_fusion(fusion_name)
    if list(fused) != names:
        raise SystemExit(f"fusion {fusion_name!r} fuses {fused}, expected {names}")
    log(f"{len(tensors)} adapter/fusion tensors:")
    for key, value in tensors.items():
        log(f"  {key} {tuple(value.shape)}")
    tensors.update(input_ids=ids, attention_mask=mask, last_hidden_state=hidden.contiguous())
    metadata = {
        "adapter_names": json.dumps(names),
        "fusion_name": fusion_name,
        "fusion_config": json.dumps(fusion_config.to_dict(), sort_keys=True),
        "adapter_config": configs.pop(),
        "adapters_version": adapters.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": str(args.seed),
        "fusion_T_before": json.dumps(t_before[0]),
        "fusion_T_after": json.dumps(t_after[0]),
    }
    save_file(tensors, args.out, metadata=metadata)
    log(f"wrote {args.out}: {len(tensors)} tensors; metadata:")
    for key, value in metadata.items():
        log(f"  {key}: {value}")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the unmasked tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def infer_row(n: int, args: argparse.Namespace) -> float:
    """Rows/s of the bare model's eval forward with one adapter (n=0) or a fusion over n adapters."""
    torch.manual_seed(0)
    model, _ = load_model()
    names, setup = add_adapters(model, max(n, 1), fuse=n > 0)
    model.set_active_adapters(setup if n else names[0])
    model.eval()
    log(f"  active: {model.active_adapters}; fusion layers: {len(fusion_modules(model))}")
    ids, mask = inputs(args.batch, args.seq)
    with torch.inference_mode():
        seconds = median_time(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, args.steps)
    return args.batch / seconds


def train_row(n: int, args: argparse.Namespace) -> float:
    """Samples/s of training one adapter (n=0) or the fusion over n frozen adapters, with a small mean-pool head."""
    torch.manual_seed(0)
    model, _ = load_model()
    names, setup = add_adapters(model, max(n, 1), fuse=n > 0)
    if n:
        model.train_adapter_fusion(setup)  # freezes backbone and adapters, unfreezes the fusion layers, activates
    else:
        model.train_adapter(names[0])
    head = nn.Linear(HIDDEN, NUM_LABELS)
    # as adapterhub_bench.py: frozen backbone without dropout, only the trained parts in train mode
    model.eval()
    for module in adapter_modules(model) + fusion_modules(model):
        module.train()
    head.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    log(f"  active: {model.active_adapters}; trainable parameters: {sum(p.numel() for p in params):,} "
        f"(head {sum(p.numel() for p in head.parameters()):,})")
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids, mask = inputs(args.batch, args.seq)
    labels = torch.randint(0, NUM_LABELS, (args.batch,))

    def step() -> None:
        """Forward, loss (+ fusion regularisation), backward, optimizer step."""
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = F.cross_entropy(head(masked_mean(hidden, mask)), labels)
        if n:
            loss = loss + model.get_fusion_regularization_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return args.batch / median_time(step, args.steps)


def bench(args: argparse.Namespace) -> None:
    """Runs the chosen rows and prints one JSON line per row."""
    import adapters
    import transformers

    torch.set_num_threads(args.threads)
    log(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
        f"MiniLM from {model_dir()}; batch {args.batch}, seq {args.seq}, {args.threads} threads, "
        f"median of {args.steps} steps after 2 warm-up")
    for row in args.rows:
        log(f"{row} ...")
        if row in TRAIN_ROWS:
            value, unit = train_row(TRAIN_ROWS[row], args), "samples/s"
        else:
            value, unit = infer_row(INFER_ROWS[row], args), "rows/s"
        log(f"  {value:.1f} {unit}")
        print(json.dumps({"row": row, "value": round(value, 2), "unit": unit, "steps": args.steps}), flush=True)


def main() -> None:
    """Parses the sub-command and runs it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_dump = sub.add_parser("dump", help="write a reference safetensors file")
    p_dump.add_argument("--out", required=True, help="output .safetensors path")
    p_dump.add_argument("--seed", type=int, default=0)
    p_dump.add_argument("--adapters", type=int, default=2, help="number of fused SeqBn adapters")
    p_dump.add_argument("--batch", type=int, default=4)
    p_dump.add_argument("--seq", type=int, default=16)
    p_dump.add_argument("--threads", type=int, default=2)
    p_bench = sub.add_parser("bench", help="time inference / training rows")
    p_bench.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                         help=f"subset of rows, run in the given order (default: all): "
                              f"{', '.join(repr(r) for r in ROWS)}")
    p_bench.add_argument("--steps", type=int, default=10, help="measured steps (after 2 warm-up steps)")
    p_bench.add_argument("--batch", type=int, default=32)
    p_bench.add_argument("--seq", type=int, default=128)
    p_bench.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "dump" and args.seq < 4:
        parser.error("--seq must be at least 4 (the last 3 tokens of row 0 are masked)")
    torch.set_num_threads(args.threads)
    quiet_logs()
    if args.command == "dump":
        dump(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
