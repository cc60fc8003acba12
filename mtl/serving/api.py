"""The inference worker's side of serving: the `LitAPI` that answers a gathered batch with ONE forward.

LitServe gathers requests (``max_batch_size`` / ``batch_timeout``) into one call of `AdapterServingAPI.predict`:
the rows of every request, whatever their tasks and fusions, run as one `MTLModel.forward(..., row_tasks=...)`,
under the precision and attention kernel that ``train.py predict`` uses, so both give the same label and score.
A bad request never reaches the model and never fails its batch: `mtl.serving.http.RequestGuard` (in the main
process) refuses bodies that are too large or not JSON objects, and `decode_request` turns every other mistake into
that request's own 4xx. The worker reports to the main process on a pipe: ready, the task listing, each batch.
"""

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtl.backbone import load_tokenizer
from mtl.errors import MTLConfigError
from mtl.kinds import kind_of
from mtl.kinds.base import MODEL_INPUTS, EncodedText, read_example
from mtl.model import MTLModel
from mtl.precision import attention_kernel
from mtl.routing import EntropyRouter, PrototypeRouter, load_router, mean_features
from mtl.routing.base import ROUTER_CONFIG, rows_of
from mtl.serving.http import error
from mtl.serving.loop import ServingLoop
from mtl.serving.say import say
from mtl.serving.server import die_with_parent
from mtl.serving.store import AdapterStore, StoreEntry

MAX_TEXTS = 256  # texts in one request ("texts": [...]); more is a 400
MAX_TEXT_BYTES = 1 << 20  # one text, UTF-8; more is a 413
FULL_SCAN_EVERY = 5  # polls between two scans that stat every file even when no folder changed
NO_ROUTER = ("no task given and the store has no router: send 'task' (GET /tasks lists them), serve a continual "
             "run's stage folder (its router/ routes by prototypes), or start with serve.router: entropy")


@dataclass
class Parsed:
    """One request after `parse_request`: its texts and task, or the answer that refuses it."""

    texts: list[str] = field(default_factory=list)
    task: str | None = None
    many: bool = False  # "texts": answer a list
    refusal: JSONResponse | None = None
    request_id: str = "-"


def parse_request(request: Any) -> Parsed:
    """Check one request's shape (the one place that does); a mistake becomes that request's 4xx answer."""
    if not isinstance(request, dict):
        return Parsed(refusal=error(400, f"body is a JSON {type(request).__name__}, expected an object"))
    request = dict(request)
    rid = str(request.pop("request_id", "-"))  # set by the HTTP guard
    parsed = _parse(request)
    parsed.request_id = rid
    return parsed


def _parse(request: dict) -> Parsed:
    unknown = sorted(set(request) - {"text", "texts", "task"})
    if unknown:
        return Parsed(refusal=error(400, f"unknown key(s) {unknown}, expected 'text' or 'texts', and 'task'"))
    if ("text" in request) == ("texts" in request):
        return Parsed(refusal=error(400, "give exactly one of 'text' (a string) or 'texts' (a list of strings)"))
    many = "texts" in request
    texts = request["texts"] if many else [request["text"]]
    if many and (not isinstance(texts, list) or not texts):
        return Parsed(refusal=error(400, f"texts: got {str(texts)[:40]!r}, expected a non-empty list of strings"))
    if len(texts) > MAX_TEXTS:
        return Parsed(refusal=error(400, f"texts: {len(texts)} texts, expected at most {MAX_TEXTS} per request"))
    read = []
    for i, text in enumerate(texts):
        where = f"texts[{i}]" if many else "text"
        try:  # a lone surrogate (valid JSON) would fail the tokenizer for the whole batch: refused here
            read.append(read_example(text, where))
        except MTLConfigError as err:
            return Parsed(refusal=error(400, str(err)))
        parts = [(where, text)] if isinstance(text, str) else \
            [(f"{where}.{k}[{n}]" if isinstance(v, list) else f"{where}.{k}", x)
             for k, v in text.items() for n, x in enumerate(v if isinstance(v, list) else [v])]
        for at, value in parts:
            if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
                return Parsed(refusal=error(413, f"{at}: {len(value.encode('utf-8')):,} bytes, expected at most "
                                                 f"{MAX_TEXT_BYTES:,} (1 MB)"))
    task = request.get("task")
    if task is not None and (not isinstance(task, str) or not task):
        return Parsed(refusal=error(400, f"task: got {str(task)[:40]!r}, expected a task name (a string)"))
    return Parsed(texts=read, task=task, many=many)


def answer(head_problem: str, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
    """A row's label, score and scores from its head's logits, as its task's kind answers (`mtl.kinds`)."""
    return kind_of(head_problem).answer(labels, logits)


class AdapterServingAPI(ls.LitAPI):
    """One backbone, the store's adapters on demand, every gathered request in one forward."""

    def __init__(self, store: str, entries: dict[str, StoreEntry], backbone: str, max_resident: int,
                 poll_seconds: float, router: str = "auto", max_batch_size: int = 32, batch_timeout: float = 0.01,
                 threads: int | None = None, precision: str = "32-true") -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, loop=ServingLoop())
        self.store_root, self.entries, self.backbone_name = store, entries, backbone
        self.max_resident, self.poll_seconds = max_resident, poll_seconds
        self.router_kind, self.threads, self.precision = router, threads, precision
        self.reports: Any = None  # the pipe to the main process (set by MTLServer before each worker starts)
        self.parent_pid: int | None = None
        self.counts = {"batches": 0, "rows": 0}

    # ---- start-up and the store poller ---------------------------------------------------------
    def setup(self, device: str) -> None:
        """Load the backbone and tokenizer, index the store, start polling it for new or replaced exports."""
        if self.parent_pid is not None:
            die_with_parent(self.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
        if self.threads:
            torch.set_num_threads(self.threads)
        self.store = AdapterStore(self.store_root, self.max_resident, say=say, entries=self.entries)
        self.model = MTLModel(self.backbone_name).to(device).eval()
        self.device = device
        device_type = torch.device(device).type
        # the precision and attention kernel of `train.py predict` (Lightning's autocast, mtl's kernel rule)
        self.backbone_kernel = attention_kernel("auto", self.precision, device_type, self.model.loaded_kernel)
        self.model.backbone.set_attn_implementation(self.backbone_kernel)
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) \
            if self.precision == "bf16-mixed" else contextlib.nullcontext
        self.store.attach(self.model)
        self.store.start_hasher()  # weights are read and checked at first load, or before by this low-priority thread
        self.tokenizer = load_tokenizer(self.backbone_name)
        self.router = self._router()
        self._stop, self._publishing, self._sending = threading.Event(), threading.Lock(), threading.Lock()
        self._listed: int | None = None  # the index generation last listed
        self._resident_listed: tuple[str, ...] | None = None
        self.publish(ready=True)
        threading.Thread(target=self._poll, name="mtl-store-poller", daemon=True).start()

    def report(self, **message: Any) -> None:
        """Send one message to the main process (nothing when run without one, e.g. in a test)."""
        if self.reports is not None:
            try:
                with self._sending:  # the inference thread and the poller both report; a pipe takes one at a time
                    self.reports.send(message)
            except (OSError, ValueError):  # the main process is gone; the kernel ends this one too
                pass

    def announce(self, payload: Any) -> None:
        """A request just arrived (receiver thread): start reading the parts it names."""
        task = payload.get("task") if isinstance(payload, dict) else None
        if isinstance(task, str):
            self.store.prefetch([task])

    def _router(self) -> PrototypeRouter | EntropyRouter | None:
        folder = Path(self.store_root) / "router"
        if self.router_kind == "entropy":
            return EntropyRouter()
        if self.router_kind == "auto" and (folder / ROUTER_CONFIG).is_file():
            return load_router(folder)
        return None

    def _poll(self) -> None:
        """Every ``poll_seconds``: rescan if the store's folders changed (an export, a replacement, a removal), and in
        full every ``FULL_SCAN_EVERY`` polls (a file rewritten in place); republish the listing when the index changed
        (a scan, the hasher)."""
        folders, polls = self.store.folders_stamp(), 0
        while not self._stop.wait(self.poll_seconds):
            try:
                polls += 1
                now = self.store.folders_stamp()
                if now != folders or polls % FULL_SCAN_EVERY == 0:  # a full scan stats every file: 20 ms per 1,000 parts
                    folders = now
                    for line in self.store.scan():
                        say(line)
                self.publish()
            except Exception as err:  # noqa: BLE001 - the poller must outlive a folder that vanishes mid-scan
                say(f"store scan failed ({type(err).__name__}: {err}); retrying")

    def publish(self, **extra: Any) -> None:
        """Report ``extra`` with the listing of ``GET /tasks`` if the index changed since it was last sent (the main
        process marks what is resident from each batch's report)."""
        with self._publishing:
            generation = self.store.generation
            changed, self._listed = generation != self._listed, generation
        listing = {"tasks": self.store.describe()} if changed else {}
        if changed or extra:
            self.report(**extra, **listing)

    # ---- one batch -------------------------------------------------------------------------------
    # LitServe routes on this annotation: `Request` makes it read the body as JSON and pass that here (which is why
    # this module does not use postponed annotations)
    def decode_request(self, request: Request) -> Parsed:
        """Check one request (its parsed JSON body); never raises (a raise would fail every request gathered with
        it)."""
        return parse_request(request)

    def batch(self, inputs: list[Parsed]) -> list[Parsed]:
        """The gathered requests as they are: tokenising waits until every row's task is known."""
        return inputs

    def unbatch(self, output: list[Any]) -> list[Any]:
        """One answer per request, in order."""
        return output

    @torch.inference_mode()
    def predict(self, requests: list[Parsed]) -> list[Any]:
        """Route task-less rows, make every needed part resident, run all rows as ONE forward, answer each request;
        then report the batch to the main process."""
        try:
            with self.autocast():
                out = self._answer(requests)
        except Exception as err:  # noqa: BLE001 - one line naming the requests, not a traceback per batch
            ids = ", ".join(r.request_id for r in requests)
            say(f"batch failed ({type(err).__name__}: {err}); requests {ids} answered 500")
            out = [error(500, f"internal error ({type(err).__name__}); request {r.request_id}") for r in requests]
        self.counts["batches"] += 1
        self.counts["rows"] += sum(len(r.texts) for r in requests)
        resident = self.store.resident_names
        changed = resident != self._resident_listed  # a cold load or an eviction: /tasks says what is resident
        self._resident_listed = resident
        self.report(requests=len(requests), totals={**self.counts, **self.store.stats}, resident=len(resident),
                    **({"resident_names": resident} if changed else {}))
        return out

    def _answer(self, requests: list[Parsed]) -> list[Any]:
        entries = self.store.snapshot()
        out: list[Any] = [r.refusal for r in requests]
        for i, r in enumerate(requests):
            if out[i] is None and r.task is not None and r.task not in entries:
                out[i] = error(404, f"task: unknown task {r.task!r}; GET /tasks lists the {len(entries)} servable")
        rows = [(i, text, r.task) for i, r in enumerate(requests) if out[i] is None for text in r.texts]
        for i, text, task in rows:
            if task is None and not isinstance(text, str):
                out[i] = error(400, "a question needs 'task': routers pick a task for plain texts")
        rows = [row for row in rows if out[row[0]] is None]
        routed = [k for k, (_, _, task) in enumerate(rows) if task is None]
        chosen: dict[int, str] = {}
        if routed:
            try:
                chosen = dict(zip(routed, self._route([rows[k][1] for k in routed], entries)))
            except MTLConfigError as err:
                for k in routed:
                    out[rows[k][0]] = error(400, str(err))
        rows = [(i, text, task or chosen.get(k)) for k, (i, text, task) in enumerate(rows) if out[i] is None]
        versions, failed = self.store.prepare([task for _, _, task in rows]) if rows else ({}, {})
        for i, _, task in rows:
            if task in failed:
                out[i] = error(503, f"task {task!r} cannot be loaded: {failed[task]}")
        rows = [row for row in rows if out[row[0]] is None]
        encoded: list[EncodedText] = []
        for i, text, task in rows:
            try:  # each text as its task's kind reads it; a text the kind cannot read refuses its request only
                encoded.append(kind_of(self.model.heads[task].problem).encode_text(
                    self.tokenizer, text, entries[task].max_length, entries[task].doc_stride))
            except MTLConfigError as err:
                out[i] = error(400, f"task {task!r}: {err}")
                encoded.append(EncodedText("", []))
        kept = [k for k, row in enumerate(rows) if out[row[0]] is None]
        rows, encoded = [rows[k] for k in kept], [encoded[k] for k in kept]
        results: dict[int, list[dict[str, Any]]] = {}
        if rows:
            for (i, _, task), (encoded, logits) in zip(rows, self._forward(rows, encoded)):
                kind = kind_of(self.model.heads[task].problem)
                record = self.model.records[task]
                results.setdefault(i, []).append({"task": task, **kind.text_answer(record.labels, logits, encoded,
                                                                                    record.spec),
                                                  "version": versions[task]})
        for i, r in enumerate(requests):
            if out[i] is None:
                answers = results[i]
                if r.task is None:
                    for a in answers:
                        a["routed"] = True
                out[i] = answers if r.many else answers[0]
        return out

    def _forward(self, rows: list[tuple[int, Any, str]], encoded: list[EncodedText]
                 ) -> list[tuple[EncodedText, list[torch.Tensor]]]:
        """ONE forward over every row, each through its own task, from each text's encoding as its task's kind reads
        it (truncated at its task's max_length, or the windows of a tagger's words or of a context); each text's
        encoding and the logits of its rows."""
        tasks = [task for (_, _, task), e in zip(rows, encoded) for _ in e.rows]
        if not tasks:
            return [(e, []) for e in encoded]
        batch = self.tokenizer.pad([{k: r[k] for k in MODEL_INPUTS if k in r} for e in encoded for r in e.rows],
                                   return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in MODEL_INPUTS}
        logits = iter(row.cpu() for row in rows_of(tasks, self.model(**inputs, row_tasks=tasks)))
        return [(e, [next(logits) for _ in e.rows]) for e in encoded]

    def _route(self, texts: list[str], entries: dict[str, StoreEntry]) -> list[str]:
        """The task the store's router picks for each text."""
        if self.router is None:
            raise MTLConfigError(NO_ROUTER if self.router_kind == "auto" else
                                 "no task given and the server runs without a router (serve.router: none); "
                                 "expected 'task'")
        length = max(e.max_length for e in entries.values())
        batch = self.tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        types = batch.get("token_type_ids")
        types = types.to(self.device) if types is not None else None
        if isinstance(self.router, PrototypeRouter):
            missing = [t for t in self.router.tasks if t not in entries]
            if missing:
                raise MTLConfigError(f"no task given and the store's router routes to {missing}, which the store no longer has")
            prefix = self.model.prefix_states(ids, mask, types, layers=self.router.depth)
            return self.router.route_features(mean_features(prefix, mask), depth=self.router.depth)
        tasks = [n for n, e in entries.items() if e.kind == "task" and e.labels and len(e.labels) >= 2]
        if len(tasks) > self.store.max_resident:
            raise MTLConfigError(f"no task given and entropy routing needs all {len(tasks)} tasks resident "
                                 f"(serve.max_resident {self.store.max_resident}); expected 'task'")
        _, failed = self.store.prepare(tasks)
        if failed:
            raise MTLConfigError(f"no task given and entropy routing cannot load {sorted(failed)}")
        return EntropyRouter(tasks).route(self.model, ids, mask, types)

    def encode_response(self, output: Any) -> Any:
        """The answer as JSON (a refusal is already a JSONResponse with its status)."""
        return output
