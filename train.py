"""Train, validate, test or predict with mtl: ``python train.py fit --config configs/quickstart.yaml``.

Also ``python train.py continual --config configs/continual.yaml`` (learn a task sequence, measure forgetting),
``python train.py compare RUN_DIR...`` (continual runs side by side) and ``python train.py serve --config
configs/serve.yaml`` (serve a store of adapters over HTTP).
"""
from mtl.cli import main

if __name__ == "__main__":  # `serve` starts worker processes that import this file again
    main()
