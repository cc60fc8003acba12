"""`PredictionWriter`: a Lightning callback that streams ``predict`` results to JSONL or CSV."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from mtl.atomic import fsync_dir
from mtl.errors import MTLConfigError, warn
from mtl.preflight import writable_folder

FIELDS = ["task", "index", "label", "score", "text"]
# rows carry their own index; Lightning's batch indices (which a streamed IterableDataset cannot give) are never used
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")


class RowFile:
    """Rows appended to a hidden temporary file beside ``path``; `commit` fsyncs it and renames it onto ``path``.

    Until then ``path`` is untouched, so a crash never leaves half a file under that name.
    """

    def __init__(self, path: Path) -> None:
        """Create the temporary file (and ``path``'s folder); a CSV gets its header now."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # the naming of mtl.atomic's temporaries; "x" creates it with the umask's modes and never reuses a name
        self.tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        # newline="": CSV rows end in "\r\n" and JSONL rows in "\n", as the csv and json modules write them
        self.file = open(self.tmp, "x", encoding="utf-8", newline="")
        self.csv = None
        if path.suffix == ".csv":
            self.csv = csv.DictWriter(self.file, fieldnames=FIELDS, extrasaction="ignore")
            self.csv.writeheader()
        self.count = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (written through to the temporary file, so memory holds at most one batch of them)."""
        if self.csv is not None:  # a tagger's lists (a tag and a score per word) go in a cell as JSON
            self.csv.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                for k, v in row.items()} for row in rows)
        else:
            self.file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self.file.flush()
        self.count += len(rows)

    def commit(self) -> None:
        """Fsync the temporary file and rename it onto ``path`` (replacing what is there)."""
        try:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)  # the rename itself must survive a crash
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is left as it was."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> None:
    """Delete temporary files that a killed run left beside ``path`` (one warning line each)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+\.tmp")
    for tmp in path.parent.iterdir() if path.parent.is_dir() else []:
        if pattern.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
            warn(f"{tmp}: left over from an interrupted prediction run; removing it")
            tmp.unlink(missing_ok=True)


class PredictionWriter(BasePredictionWriter):
    """Write one row per example and task (task, index, label, score, text) as each batch is predicted.

    Rows go to a temporary file beside ``output``, renamed onto it when prediction ends (removed if it fails), so
    memory does not grow with the input. The rows are not also kept for ``trainer.predict`` to return (it returns
    None with this writer). Only global rank 0 writes (``predict`` runs on one device).

    Args:
        output: file to write; ``.jsonl`` or ``.csv`` (by suffix). Written atomically.
        overwrite: replace an existing file.
    """

    def __init__(self, output: str = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if self.output.suffix not in (".jsonl", ".csv"):
            raise MTLConfigError(f"PredictionWriter.output: '{output}' must end in .jsonl or .csv")
        self.overwrite = overwrite
        self._rows: RowFile | None = None

    def check_before(self, stage: str) -> None:
        """Refuse an existing output (unless overwrite) and an output folder that cannot be written."""
        if stage != "predict":
            return
        if self.output.exists() and not self.overwrite:
            raise MTLConfigError(f"{self.output}: already exists (set overwrite: true on the PredictionWriter)")
        writable_folder(self.output.parent, "PredictionWriter.output")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the output and open the temporary file."""
        self.check_before("predict")
        # Lightning keeps every batch's rows to return them by default: memory would grow with the input again
        trainer.predict_loop.return_predictions = False
        if trainer.is_global_zero:
            remove_leftovers(self.output)
            self._rows = RowFile(self.output)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Append the batch's rows to the temporary file."""
        if self._rows is not None:
            self._rows.write(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the finished file in place under ``output``."""
        rows, self._rows = self._rows, None
        if rows is not None:
            rows.commit()
            print(f"wrote {rows.count} predictions -> {self.output}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed or interrupted run leaves no output and no temporary file."""
        rows, self._rows = self._rows, None
        if rows is not None:
            rows.discard()


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL or CSV, atomically."""
    out = RowFile(Path(path))
    try:
        out.write(rows)
    except BaseException:
        out.discard()
        raise
    out.commit()
