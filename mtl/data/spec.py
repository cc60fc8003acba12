"""Task specifications: what a ``tasks/<name>.yaml`` file holds, validated when it is loaded.

Loading a spec reads the YAML only (no data): the model reads specs at construction time to size
its heads, so this must stay cheap and must not import Lightning or ``datasets``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl.errors import MTLConfigError
from mtl.kinds import KINDS, PROBLEMS
from mtl.names import name_problem

SOURCE_TYPES = ("hf", "files", "folder", "yaml_conversations")
FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "conll", "conllu", "squad")
# fields added after task specs were first saved (cache keys, continual runs' settings): written by `to_dict` only
# when they differ from these defaults, so a spec that does not use them keeps the dict (and the hash) it had
LATER_FIELDS = {"doc_stride": None, "label_all_subwords": False, "max_answer_length": None, "no_answer": False}
LATER_SOURCE_FIELDS = {"word_column": 0, "tag_column": -1, "conllu_tag": "UPOS", "prepare": None}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SourceSpec:
    """Where the examples of a task come from (see ``mtl.data.sources``)."""

    type: str = _help("hf | files | folder | yaml_conversations")
    path: str | None = _help(
        "hf: dataset name or local folder; folder / yaml_conversations: the root folder", default=None
    )
    name: str | None = _help("hf: the dataset's config name", default=None)
    train: str | None = _help("files: the train file (required); hf: the source split name", default=None)
    validation: str | None = _help("files: the validation file; hf: the source split name", default=None)
    test: str | None = _help("files: the test file; hf: the source split name", default=None)
    format: str | None = _help("files: csv | tsv | json | jsonl | parquet | conll | conllu | squad (default: "
                               "from the suffix; .txt is read as conll)", default=None)
    encoding: str = _help("text encoding of csv files and of folder files (e.g. latin-1)", default="utf-8")
    label_from: str = _help("yaml_conversations: label by sub-'folder' or by 'file' stem", default="folder")
    label_map: dict[str, str] | None = _help("renames raw label values before they are matched to labels", default=None)
    keep_labels: list[str] | None = _help(
        "only rows whose (mapped) label is in this list are kept; without it every label must be in labels",
        default=None,
    )
    word_column: int = _help("conll: the column of the word (0: the first)", default=0)
    tag_column: int = _help("conll: the column of the tag (-1: the last)", default=-1)
    conllu_tag: str = _help("conllu: the tag to read: UPOS, XPOS or MISC:<key> (e.g. MISC:NER)", default="UPOS")
    prepare: str | None = _help("the command that writes the source's files, said when they are missing",
                                default=None)


@dataclass
class SplitSpec:
    """How missing validation / test splits are carved out of the train split."""

    validation: float = _help("fraction for validation", default=0.1)
    test: float = _help("fraction for test", default=0.1)
    seed: int = _help("seed of the split and of the max_*_examples subsamples", default=0)


@dataclass
class TaskSpec:
    """One task: its data source, text/label fields, label names, problem type and metrics.

    When the source lacks a validation or test split, exact duplicate texts (compared lower-cased
    with whitespace collapsed, since the default tokenizer is uncased) are removed first, keeping
    the first occurrence, then a deterministic, seeded split stratified by label is drawn. The
    ``max_*_examples`` subsamples are seeded and stratified too.
    """

    source: SourceSpec = _help("where the examples come from")
    text_fields: list[str] = _help("one text column, or two for a sentence pair")
    label_field: str = _help("the label column")
    labels: list[str] = _help("label names; a class's int label is its index here (extractive_qa: none)",
                              default_factory=list)
    name: str = _help("task name (default: the YAML file's stem)", default="")
    problem: str = _help("the task's kind (mtl.kinds): " + " | ".join(PROBLEMS), default="classification")
    metrics: list[str] = _help("metric names (default: the kind's; its headline metric is always added)",
                               default_factory=list)
    max_length: int = _help("tokens per example after truncation (token_classification: per window)", default=128)
    doc_stride: int | None = _help("token_classification, extractive_qa: tokens that consecutive windows of a long "
                                   "sentence or context share (None: a quarter of max_length)", default=None)
    label_all_subwords: bool = _help("token_classification: train on every subword of a word, not only its first",
                                     default=False)
    max_answer_length: int | None = _help("extractive_qa: the most tokens a predicted answer may span (None: 30, "
                                          "SQuAD's)", default=None)
    no_answer: bool = _help("extractive_qa: a question may have no answer in its context (SQuAD 2.0): predict \"no "
                            "answer\" where [CLS]'s null score beats the best span by a threshold chosen on "
                            "validation", default=False)
    split: SplitSpec = _help("fractions and seed for splits the source lacks", default_factory=SplitSpec)
    max_train_examples: int | None = _help("seeded stratified subsample of train (None: all)", default=None)
    max_eval_examples: int | None = _help("same for validation and for test, each", default=None)
    notes: str = _help("free text: provenance, dedup, licence", default="")
    spec_file: str | None = _help("the YAML it was read from; relative data paths resolve against its folder", default=None)

    @property
    def num_labels(self) -> int:
        """Output size of the task's head."""
        return len(self.labels)

    @property
    def stride(self) -> int:
        """The subwords consecutive windows share: ``doc_stride``, or a quarter of ``max_length``."""
        return self.max_length // 4 if self.doc_stride is None else self.doc_stride

    @property
    def base_dir(self) -> Path:
        """Folder that relative data paths resolve against."""
        return Path(self.spec_file).parent if self.spec_file else Path.cwd()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_dict`` reads it back); fields added later appear only when set."""
        out = dataclasses.asdict(self)
        for data, later in ((out, LATER_FIELDS), (out["source"], LATER_SOURCE_FIELDS)):
            for key, default in later.items():
                if data[key] == default:
                    del data[key]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> TaskSpec:
        """Validate a dict (as in a YAML file or ``to_dict``); errors name ``origin``."""
        spec = _build(cls, data, origin, "")
        if not spec.name:
            raise MTLConfigError(f"{origin}: name: missing, expected a task name")
        _check_semantics(spec, origin)
        return spec


def load_task_spec(name_or_path: str | Path, tasks_dir: str | Path = "tasks") -> TaskSpec:
    """Load a task by YAML path or by bare name (``<tasks_dir>/<name>.yaml``); reads YAML only."""
    path = _find_spec_file(str(name_or_path), Path(tasks_dir))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise MTLConfigError(f"{path}:{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise MTLConfigError(f"{path}: top level is {type(data).__name__}, expected a mapping of task keys")
    data = dict(data)
    data.setdefault("name", path.stem)
    data["spec_file"] = str(path)
    return TaskSpec.from_dict(data, str(path))


def load_task_specs(key: str, names: list[str], tasks_dir: str | Path = "tasks",
                    known: dict[str, TaskSpec] | None = None) -> dict[str, TaskSpec]:
    """``known`` plus the specs of ``names`` (config ``key``), refusing a task name given twice or declared by two files."""
    specs = dict(known or {})
    for name in names:
        spec = load_task_spec(name, tasks_dir)
        if spec.name in specs:
            other = specs[spec.name].spec_file
            if other == spec.spec_file:
                if spec.name in (known or {}):
                    raise MTLConfigError(f"{key}: task '{spec.name}' also in data.tasks, expected each task once "
                                         "(trained or eval-only)")
                raise MTLConfigError(f"{key}: task '{spec.name}' given twice, expected each task once")
            raise MTLConfigError(f"{key}: task name '{spec.name}' is declared by both {other} and {spec.spec_file}, "
                                 "expected one spec per task name")
        specs[spec.name] = spec
    return specs


def _find_spec_file(name: str, tasks_dir: Path) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise MTLConfigError(f"{path}: no such task file, expected a YAML task spec")
        return path
    for suffix in (".yaml", ".yml"):
        if (tasks_dir / f"{name}{suffix}").is_file():
            return tasks_dir / f"{name}{suffix}"
    known = sorted(p.stem for p in tasks_dir.glob("*.y*ml")) if tasks_dir.is_dir() else []
    raise MTLConfigError(f"{tasks_dir / (name + '.yaml')}: task '{name}' not found, expected one of {known}")


def _build(cls: type, data: Any, origin: str, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; keys are reported dotted."""
    what = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise MTLConfigError(f"{origin}: {what}: got {type(data).__name__}, expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise MTLConfigError(f"{origin}: {prefix}{unknown[0]}: unknown key, expected one of {sorted(fields)}")
    kwargs = {}
    for key, f in fields.items():
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MTLConfigError(f"{origin}: {prefix}{key}: missing, expected {f.metadata.get('help', key)}")
            continue
        kwargs[key] = _coerce(data[key], hints[key], origin, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, origin: str, key: str) -> Any:
    """Check ``value`` against a type hint (the few kinds specs use) and return it converted."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), origin, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, origin, key + ".")
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) and args[0] is str else value
        if not isinstance(value, list):
            raise MTLConfigError(f"{origin}: {key}: got {value!r}, expected a list of {args[0].__name__}")
        return [_coerce(v, args[0], origin, f"{key}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise MTLConfigError(f"{origin}: {key}: got {value!r}, expected a mapping")
        # YAML reads `0: negative` with an int key; label values are compared as strings
        return {
            _coerce(str(k) if isinstance(k, int) and not isinstance(k, bool) else k, args[0], origin, f"{key}.{k}"):
            _coerce(v, args[1], origin, f"{key}.{k}")
            for k, v in value.items()
        }
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[hint]
    if not ok:
        hint_word = "a string (quote words like yes/no/on/off)" if hint is str else hint.__name__
        raise MTLConfigError(f"{origin}: {key}: got {value!r}, expected {hint_word}")
    return float(value) if hint is float else value


def _check_semantics(spec: TaskSpec, origin: str) -> None:
    """Checks across fields, after the types are right; fills problem-dependent defaults."""

    def fail(key: str, got: Any, expected: str) -> None:
        raise MTLConfigError(f"{origin}: {key}: got {got!r}, expected {expected}")

    name_wrong = name_problem(spec.name)
    if name_wrong is not None:
        fail("name", spec.name, f"{name_wrong} (it names a folder and a module key)")
    src = spec.source
    if src.type not in SOURCE_TYPES:
        fail("source.type", src.type, f"one of {list(SOURCE_TYPES)}")
    if src.type in ("hf", "folder", "yaml_conversations") and not src.path:
        fail("source.path", src.path, f"a path for source type '{src.type}'")
    if src.type == "files" and not src.train:
        fail("source.train", src.train, "the train file for source type 'files'")
    if src.format is not None and src.format not in FILE_FORMATS:
        fail("source.format", src.format, f"one of {list(FILE_FORMATS)}")
    if src.label_from not in ("folder", "file"):
        fail("source.label_from", src.label_from, "'folder' or 'file'")
    if src.keep_labels is not None and not src.keep_labels:
        fail("source.keep_labels", src.keep_labels, "a non-empty list (or leave it out)")
    if spec.problem not in KINDS:
        fail("problem", spec.problem, f"one of {list(PROBLEMS)}")
    kind = KINDS[spec.problem]
    if not kind.min_text_fields <= len(spec.text_fields) <= kind.text_fields or not all(spec.text_fields):
        fail("text_fields", spec.text_fields, kind.text_fields_help)
    if not spec.label_field:
        fail("label_field", spec.label_field, "a column name")
    expected = kind.check_labels(spec.labels)
    if expected is not None and not spec.labels:
        raise MTLConfigError(f"{origin}: labels: missing, expected {expected}")
    if expected is not None:
        fail("labels", spec.labels, expected)
    if len(set(spec.labels)) != len(spec.labels) or not all(spec.labels):
        fail("labels", spec.labels, "distinct, non-empty label names")
    defaults, headline = kind.metrics_for(spec.labels)
    if not spec.metrics:
        spec.metrics = defaults
    if not all(spec.metrics):
        fail("metrics", spec.metrics, "non-empty metric names")
    unknown = [m for m in spec.metrics if m not in kind.metric_names]
    if unknown:
        fail("metrics", spec.metrics, f"some of {list(kind.metric_names)} for a {spec.problem} task")
    if headline not in spec.metrics:  # the number that stands for the task is always computed
        spec.metrics = [*spec.metrics, headline]
    if spec.max_length < 2:
        fail("max_length", spec.max_length, "an int >= 2 (room for the special tokens)")
    if kind.windowed and spec.doc_stride is not None and not 0 <= spec.doc_stride < spec.max_length - 2:
        fail("doc_stride", spec.doc_stride, f"an int from 0 to {spec.max_length - 3} (below max_length - 2)")
    if spec.max_answer_length is not None and (spec.problem != "extractive_qa" or spec.max_answer_length < 1):
        fail("max_answer_length", spec.max_answer_length, "an int >= 1, for an extractive_qa task")
    if spec.no_answer and spec.problem != "extractive_qa":
        fail("no_answer", spec.no_answer, "false (only an extractive_qa task answers \"no answer\")")
    if src.format == "squad" and spec.problem != "extractive_qa":
        fail("source.format", src.format, "csv, tsv, json, jsonl or parquet: squad files hold answers for "
             "problem: extractive_qa")
    if src.format in ("conll", "conllu") and spec.problem != "token_classification":
        fail("source.format", src.format, "csv, tsv, json, jsonl or parquet: conll files hold tags for "
             "problem: token_classification")
    if src.conllu_tag not in ("UPOS", "XPOS") and not (src.conllu_tag.startswith("MISC:") and len(src.conllu_tag) > 5):
        fail("source.conllu_tag", src.conllu_tag, "UPOS, XPOS or MISC:<key>")
    if src.word_column == src.tag_column:
        fail("source.tag_column", src.tag_column, f"a column other than source.word_column ({src.word_column})")
    for key in ("validation", "test"):
        if not 0.0 < getattr(spec.split, key) < 1.0:
            fail(f"split.{key}", getattr(spec.split, key), "a fraction strictly between 0 and 1")
    if spec.split.validation + spec.split.test >= 1.0:
        fail("split", dataclasses.asdict(spec.split), "validation + test < 1, leaving examples to train on")
    for key in ("max_train_examples", "max_eval_examples"):
        if getattr(spec, key) is not None and getattr(spec, key) < 1:
            fail(key, getattr(spec, key), "a positive int (or null for all)")
