"""`PrototypeRouter`: the nearest task prototype (mean of frozen features) under one pooled Mahalanobis metric.

Features are the masked mean over real tokens of the backbone's hidden states after the first ``depth`` layers,
run with no adapter. ``depth`` is the number of layers the routed tasks share (below their lowest adapter layer,
AdapterDrop included), so `predict` computes those layers once, routes from them and runs each row's chosen
task on from there. With an adapter in layer 0 nothing is shared: the features then come from the bare
backbone's last layer and `predict` runs a full forward. Features of different depths are not comparable, so
the router keeps the depth it started with and refuses features from another.

A tagger's training rows are windows of its sentences: each window is a text here, as it is to the tagger (a
sentence longer than one window adds one feature per window; its windows overlap by the task's ``doc_stride``).
A text routed later is one row too, whatever task it turns out to be.

Per task it keeps a count and a mean, plus one scatter matrix pooled over tasks (within-task deviations), all in
float64 and merged chunk by chunk with Chan et al.'s pairwise update; no text or feature is stored. The distance
is (x - μ_t)ᵀ (Σ + εI)⁻¹ (x - μ_t), with Σ = scatter / (N - T) the pooled within-task covariance and
ε = shrinkage · trace(Σ) / H, which keeps Σ + εI invertible when there are fewer examples than dimensions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.errors import MTLConfigError, warn
from mtl.heads import pool
from mtl.routing.base import (ROUTER_CONFIG, ROUTER_FORMAT_VERSION, ROUTER_WEIGHTS, check_routable, inference, label_of,
                              rows_of)
from mtl.storage import check_tensors, write_part

if TYPE_CHECKING:
    from mtl.model import MTLModel

SCHEMA = {"kind": str, "format_version": int, "tasks": [str], "depth": int, "hidden_size": int,
          "shrinkage": (int, float), "backbone?": str}


def feature_depth(model: MTLModel, tasks: list[str]) -> int:
    """Layers every one of ``tasks`` runs without adapters; the model's depth when that is 0 (bare last layer)."""
    shared = model.first_adapter_layer([model.target(t) for t in tasks], model.drop_depths(tasks, None))
    return shared or model.num_layers


def mean_features(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real tokens, per row, in float64 on the CPU."""
    return pool(hidden.detach().to("cpu", torch.float64),
                attention_mask.to("cpu") if attention_mask is not None else None, "mean")


class PrototypeRouter:
    """Task prototypes and a shared covariance over frozen features, grown one chunk at a time."""

    kind = "prototype"

    def __init__(self, shrinkage: float = 0.1, depth: int | None = None, hidden_size: int | None = None,
                 backbone: str | None = None) -> None:
        if not shrinkage >= 0:  # also refuses nan
            raise MTLConfigError(f"router shrinkage: {shrinkage}, expected a number >= 0")
        self.shrinkage = float(shrinkage)
        self.depth, self.hidden_size, self.backbone = depth, hidden_size, backbone
        self._counts: dict[str, int] = {}
        self._means: dict[str, torch.Tensor] = {}
        self._scatter: torch.Tensor | None = None
        self._whitened: tuple[torch.Tensor, torch.Tensor] | None = None  # (Cholesky factor, whitened means)

    # ---- statistics --------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Tasks with at least one example, in the order they arrived."""
        return list(self._counts)

    def count(self, task: str) -> int:
        """Examples seen for ``task``."""
        return self._counts.get(task, 0)

    def mean(self, task: str) -> torch.Tensor:
        """The task's prototype (mean feature), float64."""
        return self._means[task].clone()

    def covariance(self) -> torch.Tensor:
        """Pooled within-task covariance Σ = scatter / (N - T), without shrinkage."""
        self._require_tasks()
        dof = max(sum(self._counts.values()) - len(self._counts), 1)
        return self._scatter / dof

    def metric(self) -> torch.Tensor:
        """Σ + εI with ε = shrinkage · trace(Σ) / H (ε = 1 while Σ is still 0: a Euclidean metric)."""
        sigma = self.covariance()
        sigma = (sigma + sigma.T) / 2  # X^T X from BLAS can differ from its transpose in the last bit
        trace = float(sigma.trace())
        if trace > 0:
            eps = self.shrinkage * trace / sigma.shape[0]
        else:  # no within-task spread yet (one example per task): any multiple of I ranks the same
            eps = 1.0 if self.shrinkage > 0 else 0.0
        return sigma + eps * torch.eye(sigma.shape[0], dtype=torch.float64)

    def update(self, task: str, features: torch.Tensor, *, depth: int) -> None:
        """Add a chunk of ``task``'s features ``[rows, hidden]`` computed at ``depth`` layers."""
        x = features.detach().to("cpu", torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features of shape {tuple(x.shape)}, expected [rows, hidden]")
        if self.hidden_size is not None and x.shape[1] != self.hidden_size:
            raise MTLConfigError(f"features of width {x.shape[1]}, but the router holds hidden size {self.hidden_size}")
        self._check_depth(depth)
        if not isinstance(task, str) or not task:
            raise ValueError(f"task name {task!r}, expected a non-empty string")
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"task '{task}': features hold nan or inf, which would spoil its prototype for good")
        self.depth = depth
        self.hidden_size = x.shape[1]
        rows, chunk_mean = x.shape[0], x.mean(dim=0)
        centred = x - chunk_mean
        if self._scatter is None:
            self._scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self._scatter += centred.T @ centred
        seen = self._counts.get(task, 0)
        if seen == 0:
            self._means[task] = chunk_mean
        else:  # Chan et al.: merge (n_a, mean_a) with (n_b, mean_b); the scatter gains n_a n_b / n · δδᵀ
            total = seen + rows
            delta = chunk_mean - self._means[task]
            self._means[task] = self._means[task] + delta * (rows / total)
            self._scatter += torch.outer(delta, delta) * (seen * rows / total)
        self._counts[task] = seen + rows
        self._whitened = None

    def _check_depth(self, depth: int) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"feature depth {depth!r}, expected an integer >= 0")
        if self.depth is not None and depth != self.depth:
            raise MTLConfigError(f"features from {depth} layers, but the router holds features from {self.depth} "
                                 f"layers (features of different depths are not comparable)")

    def _require_tasks(self) -> None:
        if not self._counts:
            raise MTLConfigError("no task trained yet: the prototype router has no task (add examples with "
                                 "add_batch or update first)")

    # ---- the model ---------------------------------------------------------------------------
    def check_model(self, model: MTLModel, tasks: list[str] | None = None) -> None:
        """The model has this router's hidden size, backbone and depth, and ``tasks`` (default: the router's)."""
        if self.hidden_size is not None and model.hidden_size != self.hidden_size:
            raise MTLConfigError(f"the router was built for hidden size {self.hidden_size}, but the model "
                                 f"(backbone '{model.backbone_name}') has {model.hidden_size}")
        if self.backbone is not None and model.backbone_name != self.backbone:
            raise MTLConfigError(f"the router was built on backbone '{self.backbone}', but the model's is "
                                 f"'{model.backbone_name}'")
        if self.depth is not None and self.depth > model.num_layers:
            raise MTLConfigError(f"the router's features come from {self.depth} layers, but the model has "
                                 f"{model.num_layers}")
        missing = [t for t in (self.tasks if tasks is None else tasks) if t not in model.records]
        if missing:
            raise MTLConfigError(f"router task(s) {missing} are not in the model (model tasks: {model.tasks})")

    def add_batch(self, model: MTLModel, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None) -> None:
        """Add a batch of ``task``'s training rows (features from ``model``; the first batch fixes the depth)."""
        self.check_model(model, [task])
        depth = feature_depth(model, [task])
        if self.depth is not None and depth < self.depth and task not in self._counts:
            warn(f"task '{task}' has adapters from layer {depth}, below the router's feature depth {self.depth}: "
                 f"rows routed to it run a full forward")
        depth = depth if self.depth is None else self.depth  # the features stay comparable with the stored ones
        with inference(model):
            prefix = model.prefix_states(input_ids, attention_mask, token_type_ids, layers=depth)
        self.update(task, mean_features(prefix, attention_mask), depth=depth)
        self.backbone = self.backbone or model.backbone_name

    def features(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The routing features of these rows, float64 ``[rows, hidden]``."""
        return self._prefix_and_features(model, input_ids, attention_mask, token_type_ids)[1]

    def _prefix_and_features(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_tasks()
        self.check_model(model)
        with inference(model):
            prefix = model.prefix_states(input_ids, attention_mask, token_type_ids, layers=self.depth)
        return prefix, mean_features(prefix, attention_mask)

    # ---- routing -----------------------------------------------------------------------------
    def distances(self, features: torch.Tensor, *, depth: int) -> torch.Tensor:
        """Squared Mahalanobis distance ``[rows, tasks]`` of each feature row to each prototype."""
        self._require_tasks()
        self._check_depth(depth)
        x = features.detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise MTLConfigError(f"features of shape {tuple(x.shape)}, expected [rows, {self.hidden_size}]")
        factor, means = self._whiten()
        z = torch.linalg.solve_triangular(factor, x.T, upper=False).T
        # |z - m|^2 expanded: O(rows * tasks) memory instead of O(rows * tasks * hidden); float64 keeps it exact enough
        squared = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)
        return squared.clamp(min=0.0)

    def _whiten(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cholesky factor L of the metric and the prototypes whitened by it (cached until the next update)."""
        if self._whitened is None:
            factor, info = torch.linalg.cholesky_ex(self.metric())
            if int(info) != 0:
                raise MTLConfigError(f"router shrinkage {self.shrinkage}: the pooled covariance is singular "
                                     f"({sum(self._counts.values())} examples, {self.hidden_size} dimensions); "
                                     f"expected shrinkage > 0")
            means = torch.stack([self._means[t] for t in self.tasks])
            self._whitened = factor, torch.linalg.solve_triangular(factor, means.T, upper=False).T
        return self._whitened

    def route_features(self, features: torch.Tensor, *, depth: int) -> list[str]:
        """The nearest task per feature row (ties: the first task in order)."""
        tasks = self.tasks
        return [tasks[i] for i in self.distances(features, depth=depth).argmin(dim=1).tolist()]

    def route(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> list[str]:
        """The chosen task per row."""
        return self.route_features(self.features(model, input_ids, attention_mask, token_type_ids), depth=self.depth)

    def routed_logits(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> tuple[list[str], list[torch.Tensor]]:
        """The chosen task per row and its logits, the shared layers run once for both routing and the answer."""
        prefix, features = self._prefix_and_features(model, input_ids, attention_mask, token_type_ids)
        chosen = self.route_features(features, depth=self.depth)
        names = list(dict.fromkeys(chosen))
        with inference(model):
            start = model.first_adapter_layer([model.target(t) for t in names], model.drop_depths(names, None))
            if start >= self.depth:
                logits = model(input_ids, attention_mask, token_type_ids, row_tasks=chosen, prefix=prefix,
                               prefix_layers=self.depth)
            else:  # an adapter works inside the feature layers (bare last-layer features): nothing to reuse
                logits = model(input_ids, attention_mask, token_type_ids, row_tasks=chosen)
        return chosen, rows_of(chosen, logits)

    def predict(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[tuple[str, int | list[int]]]:
        """(chosen task, label index; a tagger's: one per token) per row; every router task must have a
        classification or tagging head."""
        self._require_tasks()
        check_routable(model, self.tasks)
        chosen, logits = self.routed_logits(model, input_ids, attention_mask, token_type_ids)
        return [(t, label_of(row)) for t, row in zip(chosen, logits)]

    # ---- files -------------------------------------------------------------------------------
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``router.safetensors`` (counts, means, scatter) and ``router.json`` into ``folder`` atomically."""
        self._require_tasks()
        tensors = {"counts": torch.tensor([self._counts[t] for t in self.tasks], dtype=torch.int64),
                   "means": torch.stack([self._means[t] for t in self.tasks]), "scatter": self._scatter}
        config = {"format_version": ROUTER_FORMAT_VERSION, "kind": self.kind, "tasks": self.tasks,
                  "depth": self.depth, "hidden_size": self.hidden_size, "backbone": self.backbone,
                  "shrinkage": self.shrinkage}
        return write_part(folder, tensors, config, ROUTER_WEIGHTS, ROUTER_CONFIG, overwrite=overwrite)

    @classmethod
    def from_files(cls, folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PrototypeRouter:
        """Rebuild from a checked ``router.json`` and the tensors of ``router.safetensors`` (values checked here)."""
        source, file = Path(folder) / ROUTER_CONFIG, Path(folder) / ROUTER_WEIGHTS
        tasks, hidden = config["tasks"], config["hidden_size"]
        for key, ok, expected in (("tasks", tasks and len(set(tasks)) == len(tasks), "distinct task names"),
                                  ("depth", config["depth"] >= 0, "an integer >= 0"),
                                  ("hidden_size", hidden >= 1, "an integer >= 1"),
                                  ("shrinkage", config["shrinkage"] >= 0, "a number >= 0")):
            if not ok:
                raise MTLConfigError(f"{source}: {key}: got {config[key]!r:.60}, expected {expected}")
        check_tensors(file, tensors, {"counts": torch.Size([len(tasks)]), "means": torch.Size([len(tasks), hidden]),
                                      "scatter": torch.Size([hidden, hidden])})
        for key, dtype in (("counts", torch.int64), ("means", torch.float64), ("scatter", torch.float64)):
            if tensors[key].dtype != dtype:
                raise MTLConfigError(f"{file}: {key} is {tensors[key].dtype}, expected {dtype}")
        if (tensors["counts"] < 1).any():
            raise MTLConfigError(f"{file}: counts {tensors['counts'].tolist()[:5]}, expected every task >= 1 example")
        router = cls(config["shrinkage"], config["depth"], hidden, config.get("backbone"))
        router._counts = dict(zip(tasks, tensors["counts"].tolist()))
        router._means = {t: tensors["means"][i].clone() for i, t in enumerate(tasks)}
        router._scatter = tensors["scatter"].clone()
        return router
