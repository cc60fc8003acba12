"""Numerical parity of mtl's AdapterFusion with AdapterHub's dynamic ``Fuse`` over two Pfeiffer adapters on MiniLM-L6.

Run with mtl's own environment (AdapterHub runs in a subprocess, in its separate venv):

    .venv/bin/python benchmarks/peers/fusion_parity.py [--seed 0] [--batch 4] [--seq 16] [--tol 1e-5] [--dump FILE]

Steps: ``adapterhub_fusion.py dump`` (in ``benchmarks/peers/.venv-adapterhub``, HF_HUB_OFFLINE=1) writes AdapterHub's
adapter and fusion tensors, the inputs and its fused last hidden state to a temporary safetensors file (``--dump FILE``
reuses an existing dump instead). This script builds ``MTLModel("minilm-l6")`` with two Pfeiffer tasks named like the
dumped adapters and a dynamic fusion ``fz`` over them, copies every tensor across (each dumped adapter / fusion tensor
used exactly once, each mtl parameter filled exactly once), runs ``encode`` routed to the fusion and compares the last
hidden state over the real (unmasked) tokens, for the fast and the naive fusion path, and for a0 alone when the dump
holds a single-adapter reference. It also compares the shared field names of AdapterHub's fusion / adapter configs with
mtl's ``FusionConfig("dynamic")`` / ``AdapterConfig(type="pfeiffer")``.

Exit status: 0 when every compared max |diff| is <= ``--tol`` and the configs agree (or when the AdapterHub venv is
missing: skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from peer_venv import PEER_PYTHON, PEERS, peer_work_dir  # this folder: run as a script from here

DUMP_SCRIPT = PEERS / "adapterhub_fusion.py"
FUSION = "fz"
# fields of AdapterHub's AdapterFusionConfig that mtl's FusionConfig must reproduce (the brief's list; the check below
# compares every shared name, and requires these to be among them)
FUSION_FIELDS = ("query", "key", "value", "value_initialized", "regularization", "temperature", "residual_before",
                 "value_before_softmax", "query_before_ln")
ADAPTER_RE = re.compile(r"^encoder\.layer\.(\d+)\.output\.adapters\.([^.]+)\.(adapter_down\.0|adapter_up)\.(weight|bias)$")
FUSION_RE = re.compile(r"^encoder\.layer\.(\d+)\.output\.adapter_fusion_layer\.([^.]+)\.(query|key|value)\.(weight|bias)$")
# a single-adapter reference is optional in the dump; accept the names a future dump would most likely use
SINGLE_KEYS = ("last_hidden_state_{a}", "last_hidden_state.{a}", "single_last_hidden_state", "last_hidden_state_single")


def run_dump(out: Path, args: argparse.Namespace) -> None:
    """Runs AdapterHub's dump in its own venv; relays its sanity-check line, or all of stderr on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(PEER_PYTHON), str(DUMP_SCRIPT), "dump", "--out", str(out), "--seed", str(args.seed),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"AdapterHub dump failed (exit {proc.returncode}): {' '.join(cmd)}")
    for line in proc.stderr.splitlines():
        if line.startswith("sanity check"):
            print(f"AdapterHub {line}")


def load_dump(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and string metadata of a dump file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def mtl_key(ah_key: str, adapters: list[str], fusion_name: str) -> tuple[tuple[str, str], str] | None:
    """(mtl part, parameter name) for an AdapterHub adapter/fusion tensor name; None if it is neither."""
    match = ADAPTER_RE.match(ah_key)
    if match:
        layer, name, proj, kind = match.groups()
        if name not in adapters:
            raise SystemExit(f"{ah_key}: adapter {name!r} is not one of the fused adapters {adapters}")
        return ("adapter", name), f"adapters.{layer}.ffn.{'down' if proj.startswith('adapter_down') else 'up'}.{kind}"
    match = FUSION_RE.match(ah_key)
    if match:
        layer, name, proj, kind = match.groups()
        if name != fusion_name:
            raise SystemExit(f"{ah_key}: fusion {name!r}, expected {fusion_name!r}")
        return ("fusion", FUSION), f"fusions.{layer}.ffn.{proj}.{kind}"
    return None


def copy_weights(model: Any, tensors: dict[str, Any], adapters: list[str], fusion_name: str) -> int:
    """Copies every AdapterHub adapter/fusion tensor into mtl; each is used once and every mtl parameter filled once."""
    import torch

    params = {(part, key): p for part in [("adapter", a) for a in adapters] + [("fusion", FUSION)]
              for key, p in model.part_parameters(part).items()}
    filled: dict[tuple[tuple[str, str], str], str] = {}
    # names that look like adapter/fusion weights must all map; inputs and reference outputs are the only others
    weight_keys = [k for k in tensors if ".adapters." in k or ".adapter_fusion_layer." in k]
    with torch.no_grad():
        for ah_key in weight_keys:
            target = mtl_key(ah_key, adapters, fusion_name)
            if target is None:
                raise SystemExit(f"dumped tensor {ah_key} has no mtl counterpart")
            if target not in params:
                raise SystemExit(f"dumped tensor {ah_key} -> {target}: no such mtl parameter")
            if target in filled:
                raise SystemExit(f"{target} filled twice: from {filled[target]} and {ah_key}")
            param, value = params[target], tensors[ah_key]
            if param.shape != value.shape or param.dtype != value.dtype:
                raise SystemExit(f"{ah_key} {tuple(value.shape)} {value.dtype} -> {target} "
                                 f"{tuple(param.shape)} {param.dtype}: shape or dtype differs")
            param.copy_(value)
            filled[target] = ah_key
    missing = sorted(set(params) - set(filled))
    if missing:
        raise SystemExit(f"{len(missing)} mtl parameters not filled from the dump, e.g. {missing[:4]}")
    return len(filled)


def compare_configs(label: str, theirs: dict[str, Any], ours: dict[str, Any], required: tuple[str, ...]) -> list[str]:
    """Mismatches on the field names both configs share (and required names missing from either side)."""
    problems = [f"{label}.{name}: missing in {'AdapterHub' if name not in theirs else 'mtl'}"
                for name in required if name not in theirs or name not in ours]
    shared = sorted(set(theirs) & set(ours))
    # AdapterHub keeps reduction_factor an int (16), mtl a float (16.0): compare values, not types
    problems += [f"{label}.{name}: AdapterHub {theirs[name]!r} != mtl {ours[name]!r}"
                 for name in shared if theirs[name] != ours[name]]
    print(f"{label} config, shared fields: {', '.join(f'{n}={ours[n]!r}' for n in shared)}")
    return problems


def max_diffs(ours: Any, ref: Any, mask: Any) -> tuple[float, float, float]:
    """Max |diff| over real tokens, mean |diff| over real tokens, and max |diff| over all tokens (pads included)."""
    diff = (ours - ref).abs()
    real = diff[mask.bool()]
    return real.max().item(), real.mean().item(), diff.max().item()


def parity(args: argparse.Namespace, dump_path: Path) -> int:
    """Loads the dump into mtl, compares hidden states and configs, prints a table; returns the exit status."""
    import torch

    from mtl.adapters.config import AdapterConfig
    from mtl.adapters.inject import Routing, Target
    from mtl.fusion.config import FusionConfig
    from mtl.model import MTLModel

    torch.set_num_threads(args.threads)
    tensors, meta = load_dump(dump_path)
    adapters = json.loads(meta["adapter_names"])
    fusion_name = meta["fusion_name"]
    if len(adapters) != 2:
        raise SystemExit(f"expected a dump with two fused adapters, got {adapters} (use --adapters 2)")
    print(f"AdapterHub: adapters {meta.get('adapters_version')}, transformers {meta.get('transformers_version')}, "
          f"torch {meta.get('torch_version')}, seed {meta.get('seed')}, fusion {fusion_name!r} over {adapters}, "
          f"T before/after forward {meta.get('fusion_T_before')}/{meta.get('fusion_T_after')}")

    model = MTLModel("minilm-l6").eval()
    adapter_config = AdapterConfig(type="pfeiffer")
    for name in adapters:
        model.add_task(name, 2, adapter_config)
    model.add_fusion(FUSION, adapters, num_outputs=2, config="dynamic")
    used = copy_weights(model, tensors, adapters, fusion_name)
    print(f"copied {used} adapter/fusion tensors; every mtl adapter and fusion parameter filled once")

    problems = compare_configs("fusion", json.loads(meta["fusion_config"]), FusionConfig("dynamic").to_dict(),
                               FUSION_FIELDS)
    problems += compare_configs("adapter", json.loads(meta["adapter_config"]), adapter_config.to_dict(), ())
    temperature = model.fusion_temperatures(None)[FUSION]
    if float(meta.get("fusion_T_after", temperature)) != temperature:
        problems.append(f"fusion temperature: AdapterHub {meta['fusion_T_after']} != mtl {temperature}")

    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    # the dump calls BertModel without token_type_ids, i.e. its all-zero buffer; None makes mtl's embed do the same
    token_types = tensors.get("token_type_ids")
    print(f"inputs: {tuple(ids.shape)}, {int(mask.sum())} real tokens of {mask.numel()}, token_type_ids "
          f"{'from the dump' if token_types is not None else 'None (zeros)'}; mtl temperature {temperature}")

    def encode(target: Any, fast: bool) -> Any:
        """mtl's last hidden state with every row routed to ``target``; routing built the way forward() builds it."""
        model.fast_fusion = fast
        routing = Routing(temperatures=model.fusion_temperatures(None), fast_fusion=model.fast_fusion)
        groups = [(target, slice(None))] if target is not None else []
        with torch.inference_mode():
            return model.encode(ids, mask, token_types, groups, routing=routing)

    fused = Target(FUSION, tuple(adapters))
    rows: list[tuple[str, tuple[float, float, float] | None, str]] = []
    for label, fast in (("fusion, fast path (fast_fusion=True)", True), ("fusion, naive path (fast_fusion=False)", False)):
        rows.append((label, max_diffs(encode(fused, fast), tensors["last_hidden_state"], mask), "parity"))
    model.fast_fusion = True
    single = next((tensors[k.format(a=adapters[0])] for k in SINGLE_KEYS if k.format(a=adapters[0]) in tensors), None)
    if single is not None:
        rows.append((f"single adapter {adapters[0]}", max_diffs(encode(Target(adapters[0]), True), single, mask),
                     "parity"))
    else:
        rows.append((f"single adapter {adapters[0]}", None, "skipped: the dump has no single-adapter reference"))
    # the same reference vs mtl with no adapter: must be far apart, or the comparison above proves nothing
    rows.append(("bare backbone (control, must differ)",
                 max_diffs(encode(None, True), tensors["last_hidden_state"], mask), "control"))

    failed = False
    print()
    print("| mtl vs AdapterHub | max abs diff (real tokens) | mean abs diff (real) | max abs diff (all tokens) | status |")
    print("|---|---|---|---|---|")
    for label, diffs, kind in rows:
        if diffs is None:
            print(f"| {label} | - | - | - | {kind} |")
            continue
        worst, mean, everywhere = diffs
        ok = worst <= args.tol if kind == "parity" else worst > 1e-3
        failed |= not ok
        status = ("OK" if ok else f"FAIL (> {args.tol:g})") if kind == "parity" else ("OK" if ok else "FAIL (too close)")
        print(f"| {label} | {worst:.3e} | {mean:.3e} | {everywhere:.3e} | {status} |")
    print()
    for problem in problems:
        print(f"config mismatch: {problem}")
    if problems:
        failed = True
    print(f"{'FAIL' if failed else 'OK'}: tolerance {args.tol:g} on real tokens; "
          f"{len(problems)} config mismatch(es)")
    return 1 if failed else 0


def main() -> None:
    """Parses arguments, skips without the AdapterHub venv, otherwise dumps and compares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-5, help="max |diff| allowed on real tokens")
    parser.add_argument("--dump", type=Path, help="compare against this existing dump instead of making one")
    args = parser.parse_args()
    if args.dump is not None:
        raise SystemExit(parity(args, args.dump))
    with peer_work_dir(None, "fusion_parity_") as tmp:
        dump_path = tmp / "adapterhub_fusion.safetensors"
        run_dump(dump_path, args)
        status = parity(args, dump_path)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
