"""Shorter trainings without new trainer names: the pipeline (and anyone on a CPU) sets

    NNUNETV2_DRAM_EPOCHS, NNUNETV2_DRAM_ITERATIONS (per epoch), NNUNETV2_DRAM_VAL_ITERATIONS

and every trainer of this plugin takes them at construction. NNUNETV2_DRAM_SEED=N additionally seeds Python,
NumPy and torch there (network initialisation, region sampling, augmentation in the main process), which makes
a CPU run with nnUNet_n_proc_DA=0 repeatable, and NNUNETV2_DRAM_LR=X replaces nnU-Net's initial learning rate.
The values are written into the training log, and `--c` continues with whatever the variables say then (as nnU-Net continues with its class defaults).
"""
from __future__ import annotations

import os

BUDGET_VARIABLES = {
    "NNUNETV2_DRAM_EPOCHS": "num_epochs",
    "NNUNETV2_DRAM_ITERATIONS": "num_iterations_per_epoch",
    "NNUNETV2_DRAM_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}


def read_budget() -> dict[str, int]:
    out = {}
    for var, attr in BUDGET_VARIABLES.items():
        value = os.environ.get(var)
        if value in (None, ""):
            continue
        try:
            n = int(value)
            if n < 1:
                raise ValueError
        except ValueError:
            raise SystemExit(f"{var}={value!r} must be a positive integer")
        out[attr] = n
    return out


def seed_from_environment(trainer) -> None:
    value = os.environ.get("NNUNETV2_DRAM_SEED")
    if value in (None, ""):
        return
    try:
        seed = int(value)
    except ValueError:
        raise SystemExit(f"NNUNETV2_DRAM_SEED={value!r} must be an integer")
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer.print_to_log_file(f"random seed from the environment: {seed}")


def learning_rate_from_environment(trainer) -> None:
    """NNUNETV2_DRAM_LR replaces nnU-Net's initial learning rate (1e-2, SGD with momentum 0.99, poly decay)."""
    value = os.environ.get("NNUNETV2_DRAM_LR")
    if value in (None, ""):
        return
    try:
        lr = float(value)
    except ValueError:
        lr = float("nan")
    if not (lr > 0 and lr < 10):
        raise SystemExit(f"NNUNETV2_DRAM_LR={value!r} must be a positive number such as 1e-3")
    trainer.initial_lr = lr
    trainer.print_to_log_file(f"initial learning rate from the environment: {lr}")


def apply_training_budget(trainer) -> dict[str, int]:
    seed_from_environment(trainer)
    learning_rate_from_environment(trainer)
    budget = read_budget()
    for attr, n in budget.items():
        setattr(trainer, attr, n)
    if budget:
        trainer.print_to_log_file(f"training budget from the environment: {budget}")
    return budget
