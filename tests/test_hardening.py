"""Bad input ends in one line naming the file, key or value, found before any work, with nothing written.

One test (or a few) per class of mistake; `benchmarks/bad_inputs.py` runs 55 such cases as real CLI calls.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
from pathlib import Path

import pytest
import torch

from mtl import storage
from mtl.adapters.config import AdapterConfig
from mtl.cli import main
from mtl.data.module import TaskDataModule
from mtl.data.sources import load_task_dataset
from mtl.data.spec import load_task_spec
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.preflight import writable_folder


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (folders as '')."""
    return {str(p.relative_to(root)): "" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """``train.py args`` in-process: exit code (0 when it returns) and the non-empty stderr lines."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = done.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def error_line(lines: list[str]) -> str:
    """The ``error:`` line, which must be the last stderr line."""
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tiny_dir, task_dir, tmp_path_factory) -> dict:
    """One fit of 'keyword' on the tiny backbone through the CLI: its arguments, run folder and best checkpoint."""
    root = tmp_path_factory.mktemp("hardening")
    (root / "base.yaml").write_text(
        "trainer:\n  default_root_dir: ${model.run_dir}/lightning\n  logger:\n"
        "    class_path: lightning.pytorch.loggers.CSVLogger\n    init_args: {save_dir: '${model.run_dir}/lightning'}\n")
    args = ["--config", str(root / "base.yaml"), "--model.backbone", str(tiny_dir), "--data.tasks", "[keyword]",
            "--data.tasks_dir", str(task_dir), "--data.cache_dir", str(root / "cache"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.adapter.reduction_factor", "4", "--data.max_train_examples", "32"]
    main(["fit", *args, "--model.run_dir", str(root / "run"), "--trainer.max_epochs", "1"])
    return {"root": root, "args": args, "run": root / "run", "ckpt": next((root / "run").rglob("*.ckpt"))}


# ---- 5. the command line ------------------------------------------------------------------------------------------
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: 0.1\n  adapter: {type: pfeiffer\ndata:\n  tasks: [a]\n")
    code, lines = run_cli(["fit", "--config", str(bad)], capsys)
    assert code == 2 and len(lines) == 1
    assert error_line(lines).startswith(f"error: {bad}: line 4") and "invalid YAML" in lines[0]


def test_unknown_key_names_the_file_and_the_closest_valid_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  lr: 0.1\ndata:\n  tasks: [a]\n")
    code, lines = run_cli(["fit", "--config", str(bad)], capsys)
    assert code == 2 and lines == [f"error: {bad}: modle.lr: unknown key, did you mean 'model.lr'?"]


def test_a_misspelt_option_is_never_taken_as_an_abbreviation(capsys):
    code, lines = run_cli(["fit", "--data.tasks", "[a]", "--data.max_train", "10"], capsys)
    assert code == 2
    assert lines == ["error: --data.max_train: unknown option, did you mean '--data.max_train_examples'?"]


def test_a_missing_required_option_says_missing(capsys):
    code, lines = run_cli(["fit"], capsys)
    assert code == 2 and lines == ["error: data.tasks: missing, expected a list"]


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0 and "--data.max_train_examples" in capsys.readouterr().out


def test_model_and_data_share_only_linked_options():
    # Lightning merges both hyperparameter sets; a name in both must be one option, linked by the CLI
    model = set(inspect.signature(AdapterTrainer.__init__).parameters) - {"self"}
    data = set(inspect.signature(TaskDataModule.__init__).parameters) - {"self"}
    assert model & data == {"tasks", "tasks_dir", "eval_tasks", "backbone"}


def test_data_cache_dir_alone_works(trained, capsys):
    cache = trained["root"] / "own-cache"
    code, _ = run_cli(["fit", *trained["args"], "--model.run_dir", str(trained["root"] / "cache-run"),
                       "--data.cache_dir", str(cache), "--trainer.max_epochs", "1"], capsys)
    assert code == 0 and any(cache.rglob("*.arrow"))


# ---- 1. a checkpoint never silently replaces the configuration ----------------------------------------------------
def test_checkpoint_from_another_model_is_refused_naming_the_key(trained, capsys):
    before = tree(trained["root"])
    code, lines = run_cli(["test", *trained["args"], "--model.run_dir", str(trained["run"]),
                           "--model.adapter.reduction_factor", "8", "--ckpt_path", str(trained["ckpt"])], capsys)
    assert code == 2 and len(lines) <= 3
    assert "keyword.adapter.reduction_factor is 4.0 in the checkpoint but 8.0 in the configuration" in error_line(lines)
    assert tree(trained["root"]) == before


def test_settings_that_do_not_define_the_model_follow_the_configuration(trained, capsys):
    other = trained["root"] / "elsewhere"
    code, _ = run_cli(["test", *trained["args"], "--model.run_dir", str(other), "--data.max_eval_examples", "4",
                       "--ckpt_path", str(trained["ckpt"])], capsys)
    assert code == 0
    metrics = next((other / "lightning").rglob("metrics.csv")).read_text()
    assert "test/keyword/acc" in metrics  # the test logged under the configured run folder, not the checkpoint's


def test_resumed_fit_exports_into_the_configured_run_folder(trained, capsys):
    exported = tree(trained["run"] / "adapters")
    new = trained["root"] / "resumed"
    code, _ = run_cli(["fit", *trained["args"], "--model.run_dir", str(new), "--trainer.max_epochs", "2",
                       "--ckpt_path", str(trained["ckpt"])], capsys)
    assert code == 0 and (new / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS).is_file()
    assert tree(trained["run"] / "adapters") == exported


class _Pwn:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("content, message", [
    ("pickle", "holds pickled Python objects other than tensors, which mtl never unpickles"),
    ("plain", "not an mtl checkpoint"),
    ("text", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
])
def test_files_that_are_not_mtl_checkpoints_are_refused_unopened(tmp_path, content, message):
    file = tmp_path / "x.ckpt"
    marker = tmp_path / "pwned"
    if content == "pickle":
        file.write_bytes(pickle.dumps(_Pwn(str(marker))))
    elif content == "plain":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, file)
    elif content == "text":
        file.write_text("hello\n")
    else:
        torch.save({"state_dict": {"w": torch.zeros(100)}, "mtl": {}}, file)
        file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(MTLConfigError, match=message) as err:
        storage.read_checkpoint(file)
    assert str(err.value).startswith(str(file)) and "\n" not in str(err.value)
    assert not marker.exists()


# ---- 3. errors come before the work -------------------------------------------------------------------------------
def test_a_run_that_fails_on_a_mistake_writes_nothing(trained, capsys):
    # the export already exists: found before the Trainer exists, so no config.yaml, logs or token cache
    before = tree(trained["root"])
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(trained["run"]),
                           "--data.cache_dir", str(trained["root"] / "fresh-cache")], capsys)
    assert code == 2 and "already exists" in error_line(lines) and len(lines) <= 3
    assert tree(trained["root"]) == before


def test_output_folders_that_cannot_be_written_fail_first(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MTLConfigError, match=r"model.run_dir: .*afile is a file, expected a folder"):
        writable_folder(tmp_path / "afile" / "run", "model.run_dir")
    with pytest.raises(MTLConfigError, match="/proc is not writable by this user"):
        writable_folder("/proc/mtl-test/run", "model.run_dir")  # read-only even for root
    writable_folder(tmp_path / "new" / "deeper", "model.run_dir")
    assert list(tmp_path.iterdir()) == [tmp_path / "afile"]  # the check creates nothing


@pytest.fixture
def read_only():
    """Make a folder that this user cannot write: chmod 555, or for root (whom modes do not stop) a read-only tmpfs
    mounted over it, unmounted at the end."""
    import subprocess

    mounted = []

    def lock(folder: Path) -> Path:
        folder.mkdir(parents=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                            capture_output=True).returncode == 0:
            mounted.append(folder)
        else:
            pytest.skip("root, and no read-only mount possible here")
        return folder

    yield lock
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("folder, key, extra", [
    ("adapters", "model.run_dir", []),
    ("lightning/lightning_logs", "trainer.logger", []),  # where the logger's version folders (and checkpoints) go
    ("ckpts", "trainer.callbacks.ModelCheckpoint.dirpath",
     ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", "{run}/ckpts"]),
])
def test_every_folder_a_fit_writes_is_checked_before_the_first_step(trained, tmp_path, capsys, read_only, folder, key,
                                                                    extra):
    run = tmp_path / "run"
    locked = read_only(run / folder)
    before = tree(tmp_path)
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(run),
                           *[e.format(run=run) for e in extra]], capsys)
    assert code == 2 and lines == [f"error: {key}: {locked}: {locked} is not writable by this user, expected a "
                                   "folder it can write to"], lines
    assert tree(tmp_path) == before  # no training, no config.yaml, logs or checkpoints


def test_max_length_beyond_the_backbone_positions_fails_when_read(tiny_dir, tmp_path):
    (tmp_path / "long.yaml").write_text("source: {type: files, train: x.csv}\ntext_fields: [text]\n"
                                        "label_field: label\nlabels: [a, b]\nmax_length: 600\n")
    with pytest.raises(MTLConfigError, match=r"long.yaml: max_length: got 600, expected at most 512"):
        TaskDataModule(["long"], backbone=str(tiny_dir), tasks_dir=str(tmp_path))
    (tmp_path / "long.yaml").write_text((tmp_path / "long.yaml").read_text().replace("600", "16"))
    with pytest.raises(MTLConfigError, match="data.predict_max_length: got 513, expected at most 512"):
        TaskDataModule(["long"], backbone=str(tiny_dir), tasks_dir=str(tmp_path), predict_max_length=513)


def _spec(tmp_path: Path, train: str, validation: str | None = None) -> object:
    (tmp_path / "train.csv").write_text(train)
    source = "{type: files, train: train.csv" + (", validation: val.csv, test: val.csv}" if validation else "}")
    if validation:
        (tmp_path / "val.csv").write_text(validation)
    (tmp_path / "t.yaml").write_text(f"source: {source}\ntext_fields: [text]\nlabel_field: label\n"
                                     "labels: [bad, good, ugly]\n")
    return load_task_spec(str(tmp_path / "t.yaml"))


def test_a_single_class_train_split_is_an_error(tmp_path):
    spec = _spec(tmp_path, "text,label\n" + "".join(f"w {i},good\n" for i in range(30)))
    with pytest.raises(MTLConfigError, match="source.train: every example is labelled 'good', expected at least 2"):
        load_task_dataset(spec)


def test_an_evaluated_label_the_train_split_never_has_is_an_error(tmp_path):
    train = "text,label\n" + "".join(f"w {i},{'bad' if i % 2 else 'good'}\n" for i in range(20))
    spec = _spec(tmp_path, train, "text,label\nv 1,good\nv 2,ugly\n")
    with pytest.raises(MTLConfigError, match="source.validation: label 'ugly' never occurs in the train split"):
        load_task_dataset(spec)


def test_rows_dropped_for_empty_text_are_counted_per_split(tmp_path, capsys):
    train = "text,label\n" + "".join(f"w {i},{'bad' if i % 2 else 'good'}\n" for i in range(20)) + " ,bad\n,good\n"
    spec = _spec(tmp_path, train, "text,label\nv 1,good\n\t,bad\nv 3,bad\n")
    data = load_task_dataset(spec)
    assert len(data["train"]) == 20 and len(data["validation"]) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {spec.spec_file}: dropped rows whose text is empty, blank or missing: "
                        "train 2, validation 1, test 1"]


def test_leaving_out_every_layer_is_an_error():
    with pytest.raises(MTLConfigError, match=r"adapter.leave_out: \[0, 1\] .* leaves none of the backbone's 2 layers"):
        AdapterConfig(leave_out=[0, 1]).layers(2)
    assert AdapterConfig(leave_out=[0]).layers(2) == [1]


def test_two_spec_files_with_one_task_name_are_named(task_dir, tmp_path, capsys):
    copy = tmp_path / "copy.yaml"
    copy.write_text((task_dir / "keyword.yaml").read_text().replace("keyword.csv", str(task_dir / "keyword.csv"))
                    + "name: keyword\n")
    with pytest.raises(MTLConfigError, match=f"task name 'keyword' is declared by both {task_dir}/keyword.yaml and {copy}"):
        TaskDataModule(["keyword", str(copy)], tasks_dir=str(task_dir))


# ---- 4. every file mtl reads fails in one line ----------------------------------------------------------------------
@pytest.fixture()
def exported(tmp_path) -> Path:
    folder = tmp_path / "adapters" / "keyword"
    config = {"task": "keyword", "hidden_size": 32, "num_layers": 2, "adapter": {"type": "pfeiffer"},
              "head": {"num_outputs": 2, "problem": "classification", "pooling": "mean", "dropout": 0.1},
              "labels": ["bad", "good"]}
    storage.write_part(folder, {"w": torch.ones(3)}, config, storage.ADAPTER_WEIGHTS, storage.ADAPTER_CONFIG)
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "expected a JSON object, got list"),
    (lambda c: {**c, "labels": 7}, "labels: got 7, expected a list of strings"),
    (lambda c: {**c, "labels": ["a", 3]}, r"labels\[1\]: got 3, expected a string"),
    (lambda c: {**c, "head": {**c["head"], "num_outputs": "2"}}, "head.num_outputs: got '2', expected an integer"),
    (lambda c: {k: v for k, v in c.items() if k != "task"}, "task: missing, expected a string"),
    (lambda c: {**c, "format_version": 99}, "format_version 99 is not one this mtl reads"),
])
def test_exported_json_of_the_wrong_shape_fails_naming_file_and_key(exported, edit, message):
    import json

    file = exported / storage.ADAPTER_CONFIG
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    with pytest.raises(MTLConfigError, match=message) as err:
        storage.read_config(exported, storage.ADAPTER_CONFIG, storage.ADAPTER_SCHEMA)
    assert str(err.value).startswith(str(file)) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "pickle", "empty"])
def test_unreadable_safetensors_fail_naming_the_file(exported, damage):
    file = exported / storage.ADAPTER_WEIGHTS
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "pickle": pickle.dumps({"w": 1}), "empty": b""}[damage])
    with pytest.raises(MTLConfigError, match="not a readable safetensors file") as err:
        storage.read_tensors(file)
    assert str(err.value).startswith(str(file)) and "\n" not in str(err.value)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "infinity"), (float("-inf"), "infinity")])
@pytest.mark.parametrize("read", [storage.read_tensors, lambda f: storage.read_tensors_with_sha256(f)[1]],
                         ids=["read_tensors", "read_tensors_with_sha256"])
def test_non_finite_tensors_fail_naming_the_file_and_the_tensor(exported, value, kind, read):
    from safetensors.torch import save_file

    file = exported / storage.ADAPTER_WEIGHTS
    weights = torch.ones(3)
    weights[1] = value
    save_file({"a.ok": torch.zeros(2), "b.bad": weights, "c.ids": torch.arange(3)}, str(file))
    with pytest.raises(MTLConfigError) as err:
        read(file)
    message = str(err.value)
    assert message.startswith(f"{file}: tensor b.bad holds 1 non-finite value(s) ({kind})") and "\n" not in message


def test_finite_and_integer_tensors_read_back_unchanged(exported):
    from safetensors.torch import save_file

    file = exported / storage.ADAPTER_WEIGHTS
    tensors = {"w": torch.randn(4, 3), "half": torch.randn(5).half(), "ids": torch.arange(4), "empty": torch.zeros(0)}
    save_file(tensors, str(file))
    for read in (storage.read_tensors, lambda f: storage.read_tensors_with_sha256(f)[1]):
        back = read(file)
        assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_nan_in_a_loaded_adapter_stops_predict_before_anything_is_written(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained["run"] / "adapters", run / "adapters")
    file = run / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(file))
    texts = tmp_path / "texts.txt"
    texts.write_text("good words\n")
    before = tree(tmp_path)
    code, lines = run_cli(["predict", *trained["args"], "--data.tasks", "[]", "--model.load_from", str(run),
                           "--model.run_dir", str(run), "--data.predict_file", str(texts),
                           "--trainer.logger", "false"], capsys)
    assert code == 2 and error_line(lines) == (f"error: {file}: tensor {name} holds 1 non-finite value(s) (NaN) of "
                                               f"{tensors[name].numel()}, expected finite numbers (the file is damaged "
                                               "or was written by a diverged run; export it again)")
    assert tree(tmp_path) == before


KEPT_LINE = ("the trained weights are kept in the best checkpoint {} (read back whole; once the folder can be "
             "written, resume the same fit command with --ckpt_path set to it)")


def test_a_full_disk_at_export_is_one_line_naming_the_folder_and_the_kept_checkpoint(trained, tmp_path, capsys,
                                                                                    monkeypatch):
    import errno

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(storage, "save_file", full)
    run = tmp_path / "run"
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(run), "--trainer.max_epochs", "1"], capsys)
    line = error_line(lines)
    assert code == 2 and not any("Traceback" in x for x in lines), lines
    assert line.startswith(f"error: {run / 'adapters' / 'keyword'}: cannot be written (No space left on device at ")
    assert " free there)" in line  # the space left where the write failed, not in some other folder
    best = next(run.rglob("*.ckpt"))
    assert line.endswith(KEPT_LINE.format(best))
    assert not (run / "adapters").exists() or not any((run / "adapters").iterdir())


def test_a_damaged_checkpoint_is_never_named_as_keeping_the_weights(trained, tmp_path, capsys, monkeypatch):
    import errno

    def truncate_then_full(tensors, filename, metadata=None):
        for ckpt in run.rglob("*.ckpt"):
            ckpt.write_bytes(ckpt.read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(storage, "save_file", truncate_then_full)
    run = tmp_path / "run"
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(run), "--trainer.max_epochs", "1"], capsys)
    ckpt = next(run.rglob("*.ckpt"))
    assert code == 2 and error_line(lines).endswith(
        f"no whole checkpoint holds the trained weights (1 file(s) in {ckpt.parent} do not load)"), lines


def test_a_checkpoint_that_cannot_be_written_mid_fit_is_one_line_naming_the_one_kept(trained, tmp_path, capsys,
                                                                                    monkeypatch):
    import errno

    from mtl import atomic

    saved, real = [], atomic.tempfile.mkstemp

    def second_fails(*args, **kwargs):  # the temporary file of the second checkpoint cannot be made
        if kwargs.get("prefix", "").endswith(".ckpt."):
            if saved:
                raise PermissionError(errno.EACCES, "Permission denied", kwargs["dir"])
            saved.append(Path(kwargs["dir"]) / kwargs["prefix"][1:-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", second_fails)
    run = tmp_path / "run"
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(run), "--trainer.max_epochs", "2"], capsys)
    line = error_line(lines)
    assert code == 2 and not any("Traceback" in x for x in lines), lines
    folder = saved[0].parent
    assert line.startswith(f"error: {folder}: cannot be written (Permission denied)"), line
    assert line.endswith(KEPT_LINE.format(saved[0])), line
    assert saved[0].is_file() and not (run / "adapters").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted at the end (needs root's mount; the fault-injected tests above cover the rest)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Write into ``folder`` until its filesystem is full."""
    import errno

    with open(folder / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_disk_that_fills_up_mid_fit_keeps_the_previous_checkpoint_whole_and_names_its_folder(
        trained, small_disk, capsys, monkeypatch):
    from mtl.checkpoint_io import AtomicCheckpointIO

    run, calls, real = small_disk / "run", [], AtomicCheckpointIO.save_checkpoint

    def fill_before_the_second(self, checkpoint, path, storage_options=None):
        if calls:  # the disk fills up (another process, a log) just before the second write of best.ckpt
            fill(small_disk)
        real(self, checkpoint, path, storage_options)
        calls.append((Path(path), Path(path).read_bytes()))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", fill_before_the_second)
    code, lines = run_cli(["fit", *trained["args"], "--model.run_dir", str(run), "--trainer.max_epochs", "2",
                           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                           "--trainer.callbacks.filename", "best"], capsys)  # written again every epoch
    line = error_line(lines)
    best, written = calls[0]
    assert code == 2 and len(calls) == 1 and not any("Traceback" in x for x in lines), lines
    assert best.name == "best.ckpt" and best.read_bytes() == written  # whole: the second write never touched it
    storage.read_checkpoint(best)
    assert line.startswith(f"error: {best}: cannot be written (No space left on device"), line
    assert " bytes free there)" in line and line.endswith(KEPT_LINE.format(best)), line
    assert not [p for p in best.parent.iterdir() if p.name != "best.ckpt"]  # no temporary left
