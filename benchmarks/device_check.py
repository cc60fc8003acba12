"""CUDA / bf16 check of the adapter path, for a machine with a GPU (not part of the test suite).

Usage: python benchmarks/device_check.py [--steps 20] [--batch 32 256] [--device cpu --smoke]

Uses a randomly initialised MiniLM-L6-shaped BERT (the real weights need not travel), and checks on the
GPU: fresh adapters are the identity, one multi-task forward equals separate forwards, a bf16-mixed
Lightning fit learns a synthetic task without touching the backbone, and the exported adapter gives the
same logits on the CPU. Then prints training samples/s (fp32 vs bf16 autocast, full fine-tuning vs
Pfeiffer) as a markdown table.

``--device cpu --smoke`` runs the same code on the CPU with a 2-layer, hidden-32 BERT and a few short steps, in
seconds: it checks the script's plumbing (tests/test_device_check.py), not the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from mtl.lit import AdapterTrainer
from mtl.kinds import kind_of
from mtl.model import MTLModel

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SMOKE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def keyword_batches(n: int, batch: int, seq: int, seed: int) -> list[dict]:
    """Synthetic task: label 1 iff token 2000 fills a quarter of the row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3000, 20000, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        ids[labels == 1, : seq // 4] = 2000
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "task": "kw"})
    return out


def check_correctness(folder: Path, steps: int, device: str = "cuda", shape: dict | None = None,
                      batch: int = 32, seq: int = 128) -> None:
    """Identity, multi-task equality, bf16 Lightning fit, CPU round trip (on ``device``, a ``shape`` BERT)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    BertModel(BertConfig(**(shape or MINILM)), add_pooling_layer=False).save_pretrained(folder / "backbone")
    ids = torch.randint(1000, 20000, (8, 64), device=dev)
    mask = torch.ones_like(ids)
    mask[4:, 40:] = 0
    model = MTLModel(str(folder / "backbone")).to(dev)
    bare = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    for preset in ("pfeiffer", "houlsby", "parallel"):
        model.add_task(preset, 3, preset)
        model.eval()  # a fresh adapter's dropout would otherwise perturb what must be exactly the backbone's output
        # hidden states, not logits: encode takes the task's route target (the forward returns only logits)
        got = model.encode(ids, mask, None, [(model.target(preset), slice(None))])
        print(f"identity on {dev.type}, {preset}: max |diff| = {(got - bare).abs().max().item():.3g}")
        assert torch.equal(got, bare)
    for task in model.tasks:
        with torch.no_grad():
            for p in model.task_parameters(task).values():
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()  # the heads' dropout (0.1) would make the two forwards differ by chance, not by a routing bug
    together = model(ids, mask, tasks=model.tasks)
    worst = max((together[t] - model(ids, mask, tasks=t)[t]).abs().max().item() for t in model.tasks)
    print(f"multi-task forward vs separate on {dev.type}: max |diff| = {worst:.3g}")
    assert worst < 1e-5

    (folder / "tasks").mkdir()
    (folder / "tasks" / "kw.yaml").write_text("source: {type: files, train: none.csv}\ntext_fields: [text]\n"
                                             "label_field: label\nlabels: [absent, present]\n")
    module = AdapterTrainer(["kw"], backbone=str(folder / "backbone"), tasks_dir=str(folder / "tasks"),
                            run_dir=str(folder / "run"), lr=2e-3)
    before = module.model.backbone_digest()
    trainer = L.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    train, val = keyword_batches(steps, batch, seq, 0), keyword_batches(8, 2 * batch, seq, 1)
    identity = lambda rows: rows[0]  # noqa: E731 - the batches are pre-built
    trainer.fit(module, DataLoader(train, batch_size=1, collate_fn=identity),
                DataLoader(val, batch_size=1, collate_fn=identity))
    acc = trainer.callback_metrics["val/kw/acc"].item()
    print(f"bf16-mixed Lightning fit, {steps} steps: val acc {acc:.3f} (chance 0.5); backbone unchanged: "
          f"{module.model.backbone_digest() == before}")
    assert module.model.backbone_digest() == before
    module.model.to(dev)  # Lightning hands the module back on the CPU after fit
    cpu = MTLModel.from_pretrained(folder / "run", backbone=str(folder / "backbone"))
    batch = val[0]
    module.model.eval()
    # the fit may have switched the kernel (model.attention auto: eager under bf16 on the CPU); compare like with like
    with torch.no_grad(), module.model.loaded_attention():
        want = module.model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), tasks="kw")["kw"].cpu()
        got = cpu(batch["input_ids"], batch["attention_mask"], tasks="kw")["kw"]
    worst = (want - got).abs().max().item()
    print(f"exported adapter on cpu vs {dev.type}: max |logit diff| = {worst:.3g}, "
          f"same predictions: {torch.equal(want.argmax(-1), got.argmax(-1))}")
    assert worst < 1e-3  # fp32 on both sides: only the kernels' summation order differs


def throughput(folder: Path, steps: int, batch: int, device: str = "cuda", seq: int = 128) -> None:
    """Training samples/s on ``device``, ``batch`` x ``seq`` tokens, with the backbone check_correctness saved."""
    dev = torch.device(device)
    # a no-op on the CPU, where every step has finished when it returns
    synchronize = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for name, preset in (("full fine-tuning", None), ("pfeiffer", "pfeiffer")):
        for bf16 in (False, True):
            model = MTLModel(str(folder / "backbone")).to(dev)
            if preset is None:  # a head on the bare backbone: mtl wants an adapter in some layer, so take it out
                model.add_task("t", 5, "pfeiffer")
                for slot in model.iter_slots():
                    if "t" in slot.adapters:
                        del slot.adapters["t"]
                for p in model.backbone.parameters():
                    p.requires_grad_(True)
                model.backbone_dropout = True
            else:
                model.add_task("t", 5, preset)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(1000, 20000, (batch, seq), device=dev)
            mask, labels = torch.ones_like(ids), torch.randint(0, 5, (batch,), device=dev)
            times = []
            for step in range(steps + 3):
                synchronize()
                start = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = kind_of(model.heads["t"].problem).loss(model(ids, mask, tasks="t")["t"].float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                synchronize()
                if step >= 3:
                    times.append(time.perf_counter() - start)
            rows.append((name, "bf16 autocast" if bf16 else "fp32", batch / statistics.median(times)))
    base = rows[0][2]
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"\n{where}, {model.num_layers} layers x hidden {model.hidden_size}, batch {batch}, seq {seq}, median of "
          f"{steps} steps\n")
    print("| variant | precision | samples/s | vs full FT fp32 |\n|---|---|---:|---:|")
    for name, precision, rate in rows:
        print(f"| {name} | {precision} | {rate:.0f} | {rate / base:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    """Run the checks, then the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny backbone and a few short steps (plumbing only)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check.py: no CUDA GPU here; --device cpu --smoke checks the script itself")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the fit's 4 steps cannot learn the task: only the plumbing and the assertions run
            check_correctness(Path(tmp), 4, args.device, SMOKE, batch=4, seq=16)
            throughput(Path(tmp), 2, 4, args.device, seq=16)
            return
        check_correctness(Path(tmp), max(args.steps, 60), args.device)
        for batch in args.batch:
            throughput(Path(tmp), args.steps, batch, args.device)


if __name__ == "__main__":
    main()
