"""`PredictionWriter`: a Lightning callback that writes ``predict`` results to JSONL or CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from mtl.errors import MTLConfigError
from mtl.atomic import write_text_atomic
from mtl.preflight import writable_folder

FIELDS = ["task", "index", "label", "score", "text"]


class PredictionWriter(BasePredictionWriter):
    """Write one row per example and task (task, index, label, score, text) when prediction ends.

    Args:
        output: file to write; ``.jsonl`` or ``.csv`` (by suffix). Written atomically.
        overwrite: replace an existing file.
    """

    def __init__(self, output: str = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)
        if self.output.suffix not in (".jsonl", ".csv"):
            raise MTLConfigError(f"PredictionWriter.output: '{output}' must end in .jsonl or .csv")
        self.overwrite = overwrite

    def check_before(self, stage: str) -> None:
        """Refuse an existing output (unless overwrite) and an output folder that cannot be written."""
        if stage != "predict":
            return
        if self.output.exists() and not self.overwrite:
            raise MTLConfigError(f"{self.output}: already exists (set overwrite: true on the PredictionWriter)")
        writable_folder(self.output.parent, "PredictionWriter.output")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_before("predict")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        """Flatten every loader's batches into rows and write them."""
        if not trainer.is_global_zero:
            return
        per_loader = predictions if predictions and isinstance(predictions[0], list) and predictions[0] \
            and isinstance(predictions[0][0], list) else [predictions]
        rows = [row for loader in per_loader for batch in loader for row in batch]
        write_rows(self.output, rows)
        print(f"wrote {len(rows)} predictions -> {self.output}")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL or CSV, atomically."""
    buffer = io.StringIO()
    if path.suffix == ".csv":
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())
