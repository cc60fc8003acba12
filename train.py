"""Train, validate, test or predict with mtl: ``python train.py fit --config configs/quickstart.yaml``.

Also ``python train.py continual --config configs/continual.yaml`` (learn a task sequence, measure forgetting) and
``python train.py compare RUN_DIR...`` (continual runs side by side).
"""
from mtl.cli import main

main()
