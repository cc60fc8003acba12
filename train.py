"""Train, validate, test or predict with mtl: ``python train.py fit --config configs/quickstart.yaml``."""
from mtl.cli import main

main()
