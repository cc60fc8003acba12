"""Can AdapterHub `adapters` add its bottleneck presets to tiny random DeBERTa-v2 and ModernBERT models?

Run with the AdapterHub venv (never imports mtl):

    benchmarks/peers/.venv-adapterhub/bin/python benchmarks/peers/adapterhub_families.py \
        [--families deberta-v2 modernbert]

For each family: a random ``AutoModel`` of the shrunken shape from benchmarks/backbones/ (2 layers, hidden 64, 2 heads,
intermediate 128, vocab 256; seed 0), ``adapters.init(model)``, then for each of ``SeqBnConfig``, ``DoubleSeqBnConfig``
and ``ParBnConfig``: ``add_adapter``, N(0, 0.05) noise on its tensors, ``set_active_adapters`` and a forward with
padding. One line per step: OK with where the adapter sits and how far it moves the output, or the exception's exact
text. Also reports parameters that ``adapters.init`` adds to the backbone itself and how much they change its output
(AdapterHub 1.3.0 on ModernBERT: a random ``attn.Wqkv.bias`` per layer; see README.md). Exit status 1 if a step failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
SHAPES = {"deberta-v2": "deberta-v3-base", "modernbert": "modernbert-base"}
PRESETS = ("SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    sys.path.insert(0, str(BENCHMARKS))
    import adapters
    import backbones
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("adapters.model_mixin").addFilter(
        lambda record: "none are activated for the forward pass" not in record.getMessage())
    print(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    failed = False
    for family in args.families:
        fields = backbones.shrink(backbones.load_shape(SHAPES[family])[0])
        model = backbones.build_backbone(fields, seed=0)
        ids = backbones.random_ids(model.config, 2, 12, generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        real = mask.bool()
        own = {k for k, _ in model.named_parameters()}
        with torch.no_grad():
            bare = model(input_ids=ids, attention_mask=mask).last_hidden_state
        try:
            adapters.init(model)
        except Exception as err:
            print(f"{family} ({type(model).__name__}): adapters.init FAILED: {type(err).__name__}: {err}")
            failed = True
            continue
        added = [k for k, _ in model.named_parameters() if k not in own]
        with torch.no_grad():
            moved = (model(input_ids=ids, attention_mask=mask).last_hidden_state - bare).abs()[real].max().item()
        print(f"{family} ({type(model).__name__}): adapters.init OK; parameters it added to the backbone: "
              f"{added or 'none'}; bare output moved by {moved:.2e}")
        for preset in PRESETS:
            try:
                model.add_adapter(preset, config=getattr(adapters, preset)())
                tensors = {k: p for k, p in model.named_parameters() if f".{preset}." in k}
                with torch.no_grad():
                    for p in tensors.values():
                        p.add_(torch.randn_like(p) * 0.05)
                    model.set_active_adapters(preset)
                    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                model.set_active_adapters(None)
                where = sorted({k.split(f".{preset}.")[0].rsplit(".adapters", 1)[0] for k in tensors})
                print(f"  {preset}: OK, {sum(p.numel() for p in tensors.values()):,} parameters at {where}; "
                      f"output moved by {(out - bare).abs()[real].max().item():.2e}")
            except Exception as err:
                print(f"  {preset}: FAILED: {type(err).__name__}: {err}")
                failed = True
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
