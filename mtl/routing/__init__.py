"""Inference without a task id: pick each row's task (adapter and head), then answer with that task's label.

`EntropyRouter` runs every head at once and keeps the most confident; `PrototypeRouter` compares frozen
features with per-task prototypes under a pooled Mahalanobis metric and runs only the chosen task.
"""

from mtl.routing.base import ROUTABLE, ROUTER_CONFIG, ROUTER_WEIGHTS, Router, check_routable, label_of
from mtl.routing.entropy import EntropyRouter, normalized_entropy, text_entropy
from mtl.routing.load import load_router
from mtl.routing.prototype import PrototypeRouter, feature_depth, mean_features
from mtl.routing.report import routing_report, save_confusion_png

__all__ = ["ROUTABLE", "ROUTER_CONFIG", "ROUTER_WEIGHTS", "EntropyRouter", "PrototypeRouter", "Router",
           "check_routable", "feature_depth", "label_of", "load_router", "mean_features", "normalized_entropy",
           "routing_report", "save_confusion_png", "text_entropy"]
