"""Training objectives: each module defines `make(c, cfg) -> Objective` (see `base.Objective`).

The trainer (dsv3_jax/train.py) builds the objective named by `config.train.objective` and passes
it to `train_step`; a new training stage is a new module here plus a config.
"""
