"""The task-sequence runner: trains a sequence of tasks stage by stage, evaluates every task after each stage, and
keeps a resumable state in the run folder.

Every stage is built the same way, with `mtl.assembly.assemble` (through `AdapterTrainer`): load the adapters the
previous stage exported, keep training the stage's tasks, freeze the rest. The fresh, seeded adapters and heads
are exported once before the first stage (they give the scores before training, b), so an uninterrupted run and
one resumed after a kill take exactly the same steps: after each stage the run folder holds that stage's export
(``steps/NN-<task>/adapters/``) and then ``state.json`` (order, position, R so far, b, times, strategy state),
both written atomically; ``state.json`` is the commit point.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from mtl import model_files
from mtl.assembly import FusionSetup
from mtl.atomic import write_dir_atomic, write_json_atomic
from mtl.backbone import DEFAULT_BACKBONE
from mtl.continual.report import duration, run_metrics, write_report
from mtl.continual.strategies import STRATEGIES, build_strategy, tensors_sha256
from mtl.data.module import TaskDataModule
from mtl.data.spec import load_task_specs
from mtl.errors import MTLConfigError
from mtl.fusion.config import FusionConfig
from mtl.kinds import KINDS, kind_of
from mtl.lit import AdapterTrainer
from mtl.preflight import writable_folder
from mtl.routing import ROUTABLE, EntropyRouter, PrototypeRouter, load_router, routing_report, save_confusion_png
from mtl.storage import ADAPTER_WEIGHTS, FUSION_WEIGHTS, check_shape, read_json

# 2: every score set holds "score" (each task's headline metric: R) beside "acc" and "f1", which are null for a task
# without that metric; results.json names each task's metrics ("task_metrics"). A state of format 1 (classification
# tasks only, whose headline is acc) is read as format 2 with score = acc, so such runs resume.
FORMAT_VERSION = 2
STATE_FILE = "state.json"
# the JSON shape of state.json (see mtl.storage.check_shape); its values are checked against the run in _check_state
STATE_SCHEMA = {"format_version": int, "settings": dict, "strategy": str, "order": [str], "stages": [[str]],
                "seed": int, "completed": int, "steps": [str], "before": dict, "after": dict, "test_sizes": [int],
                "wall_time_s": {"before": (int, float), "stages": [(int, float)]}, "strategy_state": dict,
                "single_task?": dict}
FINGERPRINT_KEYS = ("tensors_sha256", "probe_logits_sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")
RESULTS_FILE = "results.json"
SCORES = ("score", "acc", "f1")  # score: the task's headline (R); acc and f1: null where the task lacks them
OPTIONAL_SCORES = ("acc", "f1")
ROUTERS = ("prototype", "entropy")
OWN_ADAPTER = "-adapter"  # suffix of the folder holding a fusion stage's own adapter while its fusion trains
# settings that change nothing in the results, so a resumed run may use other values
RESUME_MAY_CHANGE = ("continual.run_dir", "data.num_workers", "data.cache_dir", "data.eval_batch_size",
                     "model.prefix_cache_dir", "model.cache_memory_mb", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "trainer.logger", "trainer.log_every_n_steps",
                     "trainer.default_root_dir", "model.test_after_fit")


@dataclass
class ContinualConfig:
    """A task sequence: the order, the strategy and where the run lives.

    Args:
        order: task names (``<tasks_dir>/<name>.yaml``) in training order, at least two.
        strategy: ``per_task`` (a new adapter and head per task, earlier ones frozen), ``shared`` (one adapter
            trained on every task in turn, a head per task), ``replay`` (shared plus a replay buffer), ``ewc``
            (shared plus the online EWC penalty), ``fusion`` (per_task plus, from the second task on, an AdapterFusion
            over every earlier adapter and the task's own, trained after it) or ``joint`` (all tasks at once: the
            upper bound).
        run_dir: run folder: state.json, each stage's exported adapters, results.json / results.md / heatmap.png.
        tasks_dir: folder of task specs.
        probe_size: test examples per task in the fixed probe batch of per_task's zero-forgetting check.
        replay_size: replay: examples in the reservoir buffer (over all earlier tasks).
        replay_ratio: replay: fraction of training batches drawn from the buffer (0 <= ratio < 1).
        ewc_lambda: ewc: weight lambda of the penalty (lambda / 2) * sum F (theta - theta*)^2.
        ewc_gamma: ewc: decay of the accumulated Fisher (1: plain sum over tasks; online EWC: < 1).
        fusion: fusion: the fusion settings (``type: dynamic | static`` plus `FusionConfig` overrides).
        routers: task-free routers to report on at the end (``prototype``: updated after every stage from the
            stage's training texts and stored in its folder, ``router/``; ``entropy``: needs nothing stored).
    """

    order: list[str] = field(default_factory=list)
    strategy: str = "per_task"
    run_dir: str = "checkpoints/continual"
    tasks_dir: str = "tasks"
    probe_size: int = 16
    replay_size: int = 200
    replay_ratio: float = 0.2
    ewc_lambda: float = 1000.0
    ewc_gamma: float = 1.0
    fusion: dict[str, Any] = field(default_factory=lambda: {"type": "dynamic"})
    routers: list[str] = field(default_factory=lambda: ["prototype"])


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class ContinualRunner:
    """Runs one strategy over one task order (see the module docstring); ``run()`` returns the results."""

    def __init__(self, config: ContinualConfig, model_args: dict[str, Any], data_args: dict[str, Any],
                 make_trainer: Callable[[str], L.Trainer], settings: dict[str, Any], seed: int = 0) -> None:
        """``make_trainer(stage_name)`` builds a fresh Trainer with fresh callbacks; ``settings`` is the flat
        configuration a resumed run must match."""
        self.config, self.seed = config, seed
        self.model_args, self.data_args = dict(model_args), dict(data_args)
        self.make_trainer = make_trainer
        self.run_dir = Path(config.run_dir)
        self.order = list(config.order)
        self.settings = {k: v for k, v in _json(flatten(settings)).items() if k not in RESUME_MAY_CHANGE}
        self.strategy = None
        self.stages: list[list[str]] = []
        self.task_metrics: dict[str, dict[str, Any]] = {}  # task -> problem, headline, metric titles (set by check)

    # ---- checks before any work -------------------------------------------------------------------------
    def check(self) -> dict[str, Any] | None:
        """Find every mistake the configuration holds before anything is written; returns a saved state to resume."""
        config = self.config
        if config.strategy not in STRATEGIES:
            raise MTLConfigError(f"continual.strategy: '{config.strategy}', expected one of {', '.join(STRATEGIES)}")
        if len(self.order) < 2:
            raise MTLConfigError(f"continual.order: {self.order} has {len(self.order)} task(s), expected at least 2 "
                                 "(backward / forward transfer and forgetting compare tasks)")
        limits = (("probe_size", config.probe_size >= 1, "an int >= 1"),
                  ("replay_size", config.replay_size >= 1, "an int >= 1 (examples in the buffer)"),
                  ("replay_ratio", 0 <= config.replay_ratio < 1, "a fraction in [0, 1)"),
                  ("ewc_lambda", config.ewc_lambda >= 0, "a number >= 0"),
                  ("ewc_gamma", 0 < config.ewc_gamma <= 1, "a decay in (0, 1]"))
        for key, ok, expected in limits:
            if not ok:
                raise MTLConfigError(f"continual.{key}: got {getattr(config, key)!r}, expected {expected}")
        if not isinstance(config.fusion, dict):
            raise MTLConfigError(f"continual.fusion: {config.fusion!r}, expected a mapping of fusion settings")
        try:
            FusionConfig.from_dict(dict(config.fusion), "continual.fusion")
        except MTLConfigError as err:  # the dataclass names its own keys fusion.<key>
            raise MTLConfigError(str(err) if str(err).startswith("continual.") else f"continual.{err}") from None
        unknown = [r for r in config.routers if r not in ROUTERS]
        if unknown or len(set(config.routers)) != len(config.routers):
            raise MTLConfigError(f"continual.routers: {config.routers}, expected distinct names among {list(ROUTERS)}")
        specs = load_task_specs("continual.order", self.order, config.tasks_dir)
        self.task_metrics = {name: task_metrics(spec, config.routers) for name, spec in specs.items()}
        self.strategy = build_strategy(config, self.seed)
        self.stages = self.strategy.stages(self.order)
        self.settings.update(_json(flatten({"tasks": {n: s.to_dict() for n, s in specs.items()}})))
        for folder in (self.run_dir, self.run_dir / "steps", self.run_dir / "lightning"):  # all it writes into
            writable_folder(folder, "continual.run_dir")
        state = self._read_state()
        data = self._data([], self.order)
        data.check_before("fit")  # reads every task's data now: a bad file stops us here
        if state is not None:
            self._check_state_data(state, data)
        return state

    def _read_state(self) -> dict[str, Any] | None:
        file = self.run_dir / STATE_FILE
        if not file.is_file():
            if self.run_dir.is_dir() and any(p for p in self.run_dir.iterdir() if p.name not in ("steps", "lightning")):
                raise MTLConfigError(f"continual.run_dir: {self.run_dir} holds files but no {STATE_FILE}, expected an "
                                     "empty folder or a continual run to resume")
            return None
        state = read_json(file, "the state of a continual run")
        if isinstance(state, dict) and state.get("format_version") == 1:
            state = _upgrade_state(state)
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "settings" not in state:
            raise MTLConfigError(f"{file}: not a continual-run state of format {FORMAT_VERSION} (or 1)")
        check_shape(file, state, STATE_SCHEMA)
        saved, now = state["settings"], self.settings
        if "trainer.precision" in saved and saved["trainer.precision"] is None:
            # written before an unset precision was resolved per machine: unset then meant fp32
            saved = {**saved, "trainer.precision": "32-true"}
        for key in [*saved, *(k for k in now if k not in saved)]:
            if saved.get(key) != now.get(key):
                raise MTLConfigError(f"{file}: {key} is {saved.get(key)!r} in the saved run but {now.get(key)!r} in the "
                                     "configuration; resume with the same settings or use another continual.run_dir")
        self._check_state(file, state)
        return state

    def _check_state(self, file: Path, state: dict[str, Any]) -> None:
        """Every field of a saved state agrees with this run: a state.json edited by hand, or from another run, is one
        line naming the key, never a path outside the run folder or an index past the order."""
        def refuse(key: str, got: Any, expected: str) -> MTLConfigError:
            return MTLConfigError(f"{file}: {key}: got {got!r:.80}, expected {expected} (the file is written by the "
                                  "runner: restore it, or start again in another continual.run_dir)")

        n, total = len(self.order), len(self.stages)
        for key, want in (("strategy", self.config.strategy), ("order", self.order), ("stages", self.stages),
                          ("seed", self.seed)):
            if state[key] != want:
                raise refuse(key, state[key], f"{want!r} (this run's)")
        done = state["completed"]
        if not 0 <= done <= total:
            raise refuse("completed", done, f"a stage count in 0..{total}")
        names = ["00-before", *(self._stage_name(i) for i in range(done))]
        if len(state["steps"]) != done + 1:
            raise refuse("steps", state["steps"], f"{done + 1} stage folders (completed is {done})")
        root = self.run_dir.resolve()
        for i, (step, name) in enumerate(zip(state["steps"], names)):
            folder = (self.run_dir / step).resolve()
            # the exact name, and no link out of the run folder: state.json never makes the runner read elsewhere
            if step != f"steps/{name}" or folder != root / "steps" / name:
                raise refuse(f"steps[{i}]", step, f"'steps/{name}' inside {self.run_dir}")
            if not (folder / "adapters").is_dir():
                raise refuse(f"steps[{i}]", step, f"a stage folder holding adapters/ ({folder / 'adapters'} not found)")
        for key, rows in [(f"before.{m}", [state["before"].get(m)]) for m in SCORES] + \
                [(f"after.{m}", state["after"].get(m)) for m in SCORES]:
            if not isinstance(rows, list) or len(rows) != (1 if key.startswith("before") else done):
                raise refuse(key, rows, f"{'one row' if key.startswith('before') else f'{done} rows'} of scores")
            metric = key.split(".")[1]
            for row in rows:
                if not (isinstance(row, list) and len(row) == n
                        and all(self._fits(task, metric, v) for task, v in zip(self.order, row))):
                    raise refuse(key, row, f"{n} scores in [0, 1], one per task of the order (null for a task "
                                 f"without {metric})")
        for key in ("before", "after"):
            if set(state[key]) != set(SCORES):
                raise refuse(key, sorted(state[key]), f"the keys {list(SCORES)}")
        if len(state["test_sizes"]) != n or any(size < 1 for size in state["test_sizes"]):
            raise refuse("test_sizes", state["test_sizes"], f"{n} test-split sizes >= 1")
        times = state["wall_time_s"]
        if len(times["stages"]) != done or any(t < 0 for t in [times["before"], *times["stages"]]):
            raise refuse("wall_time_s", times, f"{done} stage times >= 0")
        for task, scores in (state.get("single_task") or {}).items():
            if task not in self.order or not isinstance(scores, dict) or set(scores) != set(SCORES) \
                    or not all(self._fits(task, m, v) for m, v in scores.items()):
                raise refuse(f"single_task.{task}", scores, f"a task of the order with scores {list(SCORES)} in [0, 1]")
        self._check_strategy_state(refuse, state["strategy_state"], done)

    def _fits(self, task: str, metric: str, value: Any) -> bool:
        """A saved score of ``task``: a number in [0, 1], or null exactly where the task has no such metric."""
        info = self.task_metrics.get(task)
        if info is None or metric == "score" or metric in info["names"]:
            return _score(value)
        return value is None

    def _check_strategy_state(self, refuse: Callable[[str, Any, str], MTLConfigError], saved: dict[str, Any],
                              done: int) -> None:
        """``strategy_state`` has the fields this strategy keeps, for the stages completed so far."""
        fresh = self.strategy.state
        if set(saved) != set(fresh):
            raise refuse("strategy_state", sorted(saved), f"the keys {sorted(fresh)} of strategy {self.strategy.name}")
        trained = {task: stage for stage in range(done) for task in self.stages[stage]}
        if "routes" in fresh:
            setups = {t: self.strategy.fusion_setup(self.order, [t]) for t in trained}
            want_routes = {t: setup.name for t, setup in setups.items() if setup is not None}
            if saved["routes"] != want_routes:
                raise refuse("strategy_state.routes", saved["routes"], f"{want_routes!r}")
        if "fingerprints" in fresh:
            routes = saved.get("routes", {})
            want = {**{t: (i, None) for t, i in trained.items()}, **{r: (trained.get(t), t) for t, r in routes.items()}}
            prints = saved["fingerprints"]
            if not isinstance(prints, dict) or set(prints) != set(want):
                raise refuse("strategy_state.fingerprints", sorted(prints) if isinstance(prints, dict) else prints,
                             f"one entry per trained task and fusion {sorted(want)}")
            for name, entry in saved["fingerprints"].items():
                stage, task = want[name]
                ok = isinstance(entry, dict) and entry.get("stage") == stage and entry.get("task") == task and all(
                    isinstance(entry.get(k), str) and _SHA256.fullmatch(entry[k]) for k in FINGERPRINT_KEYS) \
                    and set(entry) <= {"stage", "task", *FINGERPRINT_KEYS}
                if not ok:
                    raise refuse(f"strategy_state.fingerprints.{name}", entry,
                                 f"stage {stage}{f', task {task!r}' if task else ''} and SHA-256 hex digests "
                                 f"{list(FINGERPRINT_KEYS)}")
        if "buffer" in fresh:
            buffer, seen = saved["buffer"], saved["seen"]
            if not isinstance(buffer, list) or len(buffer) > self.config.replay_size:
                raise refuse("strategy_state.buffer", buffer, f"a list of at most {self.config.replay_size} examples")
            if not isinstance(seen, int) or isinstance(seen, bool) or seen < len(buffer):
                raise refuse("strategy_state.seen", seen, f"the examples offered so far (at least the buffer's "
                             f"{len(buffer)})")
            for i, item in enumerate(buffer):
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0] in trained
                        and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
                    raise refuse(f"strategy_state.buffer[{i}]", item, f"[task, row] with a trained task of "
                                 f"{sorted(trained)} and a row >= 0")

    def _check_state_data(self, state: dict[str, Any], data: TaskDataModule) -> None:
        """The saved state against the task data, once it is read: test sizes and the replay buffer's rows."""
        file = self.run_dir / STATE_FILE
        sizes = [data.split_size(t, "test") for t in self.order]
        if state["test_sizes"] != sizes:
            raise MTLConfigError(f"{file}: test_sizes: got {state['test_sizes']}, expected {sizes} (the test splits of "
                                 "the order now); restore state.json, or start again in another continual.run_dir")
        for i, (task, row) in enumerate(state["strategy_state"].get("buffer", [])):
            info = self.task_metrics.get(task)
            # the buffer holds rows of the tokenised split: a windowed task's are windows, more than its examples
            windows = info is not None and kind_of(info["problem"]).windowed
            size = len(data.token_lengths(task, "train")) if windows else data.split_size(task, "train")
            if row >= size:
                raise MTLConfigError(f"{file}: strategy_state.buffer[{i}]: row {row} of {task}, expected a row of its "
                                     f"train split (0..{size - 1}{' windows' if windows else ''}); restore state.json, "
                                     "or start again in another continual.run_dir")

    # ---- building blocks ----------------------------------------------------------------------------------
    def _data(self, train: list[str], evaluate: list[str], **extra: Any) -> TaskDataModule:
        backbone = self.model_args.get("backbone", DEFAULT_BACKBONE)
        return TaskDataModule(tasks=train, eval_tasks=evaluate, backbone=backbone, tasks_dir=self.config.tasks_dir,
                              **self.data_args, **extra)

    def _module(self, train: list[str], load_from: Path | None, fusion: FusionSetup | None = None) -> AdapterTrainer:
        # the one way models are built (assemble, through AdapterTrainer): fresh tasks, or the previous stage's export;
        # tasks answered through a fusion are evaluated through it
        return AdapterTrainer(tasks=train, eval_tasks=[t for t in self.order if t not in train],
                              tasks_dir=self.config.tasks_dir, run_dir=str(self.run_dir), export=False,
                              adapter_sharing=self.strategy.adapter_sharing,
                              load_from=None if load_from is None else str(load_from), fusion=fusion,
                              continue_training=load_from is not None and fusion is None,
                              eval_routes={t: r for t, r in self.strategy.routes().items() if t not in train},
                              **self.model_args)

    def _evaluate(self, trainer: L.Trainer, module: AdapterTrainer, data: TaskDataModule,
                  tasks: list[str] | None = None) -> dict[str, list[float | None]]:
        """Every task of the sequence (or ``tasks``) on its test split, through its route: its headline metric as
        ``score`` (what R holds), and ``acc`` and ``f1`` as logged (None for a task without that metric)."""
        trainer.test(module, datamodule=data, verbose=False)
        metrics = trainer.callback_metrics
        out: dict[str, list[float | None]] = {m: [] for m in SCORES}
        for task in tasks or self.order:
            logged, info = f"test/{module.routes[task]}/", self.task_metrics[task]
            out["score"].append(float(metrics[logged + info["headline"]]))
            for m in OPTIONAL_SCORES:
                out[m].append(float(metrics[logged + m]) if m in info["names"] else None)
        return out

    def _export(self, module: AdapterTrainer, name: str, router: PrototypeRouter | None = None) -> str:
        """Every task's adapter and head into ``steps/<name>/adapters/``, the strategy's tensors and the router, in
        one atomic folder; returns the folder, relative."""
        def fill(folder: Path) -> None:
            model = module.model
            for task in self.order:
                model_files.save_task(model, task, folder / "adapters")
            for fusion in (t for t in model.tasks if model.target(t).is_fusion):  # after the adapters they fuse
                model_files.save_fusion(model, fusion, folder)
            self.strategy.save(folder)
            if router is not None:
                router.save(folder / "router")

        write_dir_atomic(self.run_dir / "steps" / name, fill)
        return f"steps/{name}"

    def _stage_name(self, index: int) -> str:
        tasks = self.stages[index]
        return f"{index + 1:02d}-{tasks[0] if len(tasks) == 1 else self.strategy.name}"

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Check, then train and evaluate every remaining stage, then write results.json and the report."""
        state = self.check()
        total = len(self.stages)
        print(f"continual: strategy {self.config.strategy}, {len(self.order)} tasks in {total} stage(s): "
              f"{' -> '.join(self.order)}; run folder {self.run_dir}")
        if state is None:
            state = self._before()
        else:
            self.strategy.state = state["strategy_state"]
            print(f"continual: resuming after stage {state['completed']}/{total} ({self.run_dir / STATE_FILE})")
        for index in range(state["completed"], total):
            state = self._stage(index, state)
        return self._finish(state)

    def _new_state(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "settings": self.settings, "strategy": self.config.strategy,
                "order": self.order, "stages": self.stages, "seed": self.seed, "completed": 0, "steps": [],
                "before": {}, "after": {m: [] for m in SCORES}, "test_sizes": [],
                "wall_time_s": {"before": 0.0, "stages": []}, "strategy_state": {}, "single_task": {}}

    def _save(self, state: dict[str, Any]) -> None:
        state["strategy_state"] = self.strategy.state
        write_json_atomic(self.run_dir / STATE_FILE, state)

    def _before(self) -> dict[str, Any]:
        """Fresh seeded adapters and heads for every task: evaluated (b) and exported as the starting point."""
        start = time.monotonic()
        L.seed_everything(self.seed, verbose=False)
        module, data = self._module(self.order, None), self._data([], self.order)
        trainer = self.make_trainer("00-before")
        state = self._new_state()
        state["before"] = self._evaluate(trainer, module, data)
        # examples (a tagger's sentences, not its windows), as the check on resume counts them
        state["test_sizes"] = [data.split_size(t, "test") for t in self.order]
        state["steps"].append(self._export(module, "00-before"))
        state["wall_time_s"]["before"] = time.monotonic() - start
        self._save(state)
        print(f"[before] score with fresh adapters and heads: {_row(state['before']['score'])}")
        return state

    def _stage(self, index: int, state: dict[str, Any]) -> dict[str, Any]:
        """Train stage ``index`` from the previous stage's export, evaluate every task, export, save the state."""
        start = time.monotonic()
        tasks, total, name = self.stages[index], len(self.stages), self._stage_name(index)
        print(f"[stage {index + 1}/{total}] training {', '.join(tasks)} ({self.strategy.description})")
        L.seed_everything(self.seed + index, verbose=False)
        previous = self.run_dir / state["steps"][-1]
        module = self._module(tasks, previous)
        self._check_unchanged(previous, module)
        self.strategy.load(previous)
        extra = self.strategy.stage_data(tasks)
        train = extra.pop("tasks", tasks)
        data = self._data(train, [t for t in self.order if t not in train], **extra)
        module.extra_loss = self.strategy.extra_loss
        self.strategy.before_task(index, tasks, module, data)
        trainer = self.make_trainer(name)
        trainer.fit(module, datamodule=data)
        module.restore_best()
        setup = self.strategy.fusion_setup(self.order, tasks)
        if setup is not None:
            module, trainer = self._fusion_fit(name, tasks, setup, module, trainer, data, state)
        scores = self._evaluate(trainer, module, data)
        self.strategy.after_task(index, tasks, module, data)
        router = self._update_router(previous, tasks, module, data)
        state["steps"].append(self._export(module, name, router))
        for m in SCORES:
            state["after"][m].append(scores[m])
        state["wall_time_s"]["stages"].append(time.monotonic() - start)
        state["completed"] = index + 1
        self._save(state)
        shutil.rmtree(self.run_dir / "steps" / f"{name}{OWN_ADAPTER}", ignore_errors=True)  # see _fusion_fit
        times = state["wall_time_s"]["stages"]
        left = sum(times) / len(times) * (total - index - 1)
        print(f"[stage {index + 1}/{total}] {', '.join(tasks)} done in {duration(times[-1])}; score "
              f"{_row(scores['score'])}; about {duration(left)} left")
        return state

    def _fusion_fit(self, name: str, tasks: list[str], setup: FusionSetup, module: AdapterTrainer, trainer: L.Trainer,
                    data: TaskDataModule, state: dict[str, Any]) -> tuple[AdapterTrainer, L.Trainer]:
        """The stage's second fit: the task's own adapter is tested alone (its single-task score) and exported
        (``steps/<name>-adapter/``, removed once the stage is saved), then the fusion trains on the same data."""
        alone = self._evaluate(trainer, module, self._data([], tasks), tasks)
        state["single_task"].update({task: {m: alone[m][i] for m in SCORES} for i, task in enumerate(tasks)})
        own = self.run_dir / self._export(module, f"{name}{OWN_ADAPTER}")
        print(f"[fusion] {tasks[0]} alone: score {_row(alone['score'])}; training fusion {setup.name} over "
              f"{', '.join(setup.adapters)}")
        module = self._module(tasks, own, fusion=setup)
        module.extra_loss = self.strategy.extra_loss
        trainer = self.make_trainer(f"{name}-fusion")
        trainer.fit(module, datamodule=data)
        module.restore_best()
        return module, trainer

    def _update_router(self, previous: Path, tasks: list[str], module: AdapterTrainer,
                       data: TaskDataModule) -> PrototypeRouter | None:
        """The previous stage's prototype router plus the features of this stage's training texts."""
        if "prototype" not in self.config.routers:
            return None
        router = load_router(previous / "router") if (previous / "router").is_dir() else PrototypeRouter()
        for batch in data.train_dataloader():
            if batch["task"] in tasks:  # not the replayed rows of earlier tasks: they were added already
                router.add_batch(module.model, batch["task"], batch["input_ids"], batch.get("attention_mask"),
                                 batch.get("token_type_ids"))
        return router

    def _routing(self, final: Path, module: AdapterTrainer, data: TaskDataModule) -> dict[str, Any]:
        """Each router on the mixed stream of every task's test texts: reports, and confusion PNGs in the run folder."""
        batches = {task: list(loader) for task, loader in zip(data.task_names, data.test_dataloader())}
        reports = {}
        for kind in self.config.routers:
            router = load_router(final / "router") if kind == "prototype" else EntropyRouter()
            reports[kind] = routing_report(module.model, router, batches)
            save_confusion_png(reports[kind], self.run_dir / f"routing-{kind}.png")
        return reports

    def _finish(self, state: dict[str, Any]) -> dict[str, Any]:
        """Verify what the strategy promises on the final export, then write results.json and the report."""
        final = self.run_dir / state["steps"][-1]
        module, data = self._module([], final), self._data([], self.order)
        self.strategy.load(final)
        check = self.strategy.verify(module, data)
        if check is not None and not check["verified"]:  # before anything is written: the old results stay
            changed = {name: {k: (self.strategy.state["fingerprints"][name][k], now[k]) for k in FINGERPRINT_KEYS
                              if now[k] != self.strategy.state["fingerprints"][name][k]}
                       for name, now in check["tasks"].items() if not now["unchanged"]}
            raise self._changed_error(final, changed)
        stored = self.strategy.stored_bytes(module, data)
        routing = {}
        if self.strategy.routes():  # routers answer through each task's own adapter, not through its fusion
            print("continual: routing without a task id is reported for runs without fusion routes; skipped")
        else:
            routing = self._routing(final, module, data)
        results = self.results(state, check, stored, routing)
        write_json_atomic(self.run_dir / RESULTS_FILE, results)
        paths = write_report(results, self.run_dir)
        acc = results["metrics"]["score"]
        print(f"continual: ACC {acc['acc']:.3f}" + (f", BWT {acc['bwt']:+.3f}" if acc.get("bwt") is not None else "")
              + (", zero forgetting verified" if check else "")
              + f"; wrote {self.run_dir / RESULTS_FILE}, " + ", ".join(str(p) for p in paths))
        return results

    def _check_unchanged(self, folder: Path, module: AdapterTrainer) -> None:
        """Before a stage trains: every task and fusion trained so far loaded from ``folder`` with the tensors it had
        when it was trained (a stage folder changed on disk is found before the work, not at the end)."""
        saved = self.strategy.state.get("fingerprints") or {}
        changed = {}
        for name, entry in saved.items():
            now = tensors_sha256(module, name)
            if now != entry["tensors_sha256"]:
                changed[name] = {"tensors_sha256": (entry["tensors_sha256"], now)}
        if changed:
            raise self._changed_error(folder, changed)

    def _changed_error(self, folder: Path, changed: dict[str, dict[str, tuple[str, str]]]) -> MTLConfigError:
        """One line for tasks (or fusions) whose fingerprints differ from those recorded when they were trained."""
        if not changed:
            return MTLConfigError(f"{self.run_dir / STATE_FILE}: strategy_state.fingerprints: no task recorded, "
                                  "expected one per trained task; restore state.json or start a new continual.run_dir")
        name, diffs = next(iter(changed.items()))
        fusion = name in self.strategy.routes().values()
        file = folder / ("fusions" if fusion else "adapters") / name / (FUSION_WEIGHTS if fusion else ADAPTER_WEIGHTS)
        stage = self.strategy.state["fingerprints"][name]["stage"]
        what = "; ".join(f"{key} {was[:12]}... when trained, {now[:12]}... now" for key, (was, now) in diffs.items())
        also = f" (also changed: {', '.join(list(changed)[1:])})" if len(changed) > 1 else ""
        return MTLConfigError(
            f"{file}: {'fusion' if fusion else 'task'} {name} changed after it was trained at stage "
            f"{self._stage_name(stage)} ({what}){also}; zero forgetting cannot hold: restore {folder} as this run "
            f"wrote it, or start again in a new continual.run_dir")

    def results(self, state: dict[str, Any], check: dict[str, Any] | None, stored: dict[str, int],
                routing: dict[str, Any]) -> dict[str, Any]:
        """The results.json record of a finished run."""
        times = state["wall_time_s"]
        results = {"format_version": FORMAT_VERSION, "strategy": self.config.strategy, "order": self.order,
                   "stages": self.stages, "test_sizes": state["test_sizes"],
                   "scores": {m: {"before": state["before"][m], "after": state["after"][m]} for m in SCORES},
                   "metrics": {}, "zero_forgetting": check, "seed": self.seed, "config": self.settings,
                   "wall_time_s": {"before": times["before"], "stages": times["stages"],
                                   "total": times["before"] + sum(times["stages"])},
                   "run_dir": str(self.run_dir), "steps": state["steps"], "stored_bytes": stored, "routing": routing,
                   "routes": self.strategy.routes(), "single_task": state.get("single_task", {}),
                   "task_metrics": {task: self.task_metrics[task] for task in self.order}}
        # a metric matrix with a task lacking that metric (null cells) has no metrics of its own
        results["metrics"] = {m: None if _has_null(results["scores"][m]) else run_metrics(results, m) for m in SCORES}
        return results


def task_metrics(spec: Any, routers: list[str]) -> dict[str, Any]:
    """What R and the report say of a task: its kind (``problem``), its headline metric and a title for each of its
    metrics among ``score``, ``acc`` and ``f1`` (one line for a task whose headline is not a score in [0, 1], or
    that a router cannot answer)."""
    headline = kind_of(spec.problem).metrics_for(list(spec.labels or []))[1]
    if headline not in OPTIONAL_SCORES:
        scored = ", ".join(kind.name for kind in KINDS.values() if kind.headline in OPTIONAL_SCORES)
        raise MTLConfigError(f"{spec.spec_file}: problem {spec.problem} has the headline metric {headline}, expected a "
                             f"task whose headline is a score in [0, 1] (acc or f1: {scored}); R and its metrics "
                             "compare every task on that scale")
    if routers and spec.problem not in ROUTABLE:
        raise MTLConfigError(f"{spec.spec_file}: problem {spec.problem}: continual.routers {list(routers)} route only "
                             f"{' and '.join(ROUTABLE)} tasks; set continual.routers: [] to run this sequence")
    titles = kind_of(spec.problem).metric_titles
    names = {m: titles.get(m, m) for m in OPTIONAL_SCORES if m in spec.metrics}
    return {"problem": spec.problem, "headline": headline, "names": {"score": names[headline], **names}}


def _has_null(scores: dict[str, Any]) -> bool:
    return any(v is None for row in [scores["before"], *scores["after"]] for v in row)


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 state as format 2: its tasks were classifiers (the runner took nothing else), whose headline is
    acc, so score = acc (exactly what a format-2 run of the same tasks records)."""
    state = dict(state, format_version=FORMAT_VERSION)
    for key in ("before", "after"):
        if isinstance(state.get(key), dict) and "acc" in state[key] and "score" not in state[key]:
            state[key] = {"score": json.loads(json.dumps(state[key]["acc"])), **state[key]}
    single = state.get("single_task")
    if isinstance(single, dict):
        state["single_task"] = {t: {"score": s["acc"], **s} if isinstance(s, dict) and "acc" in s else s
                                for t, s in single.items()}
    return state


def _score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _json(data: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from JSON (tuples become lists), so a saved state compares equal."""
    return json.loads(json.dumps(data, default=str))


def _row(values: list[float | None]) -> str:
    return " ".join("–" if v is None else f"{v:.3f}" for v in values)
