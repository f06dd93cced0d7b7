"""Shorter trainings without new trainer names: the pipeline (and anyone on a CPU) sets

    NNUNETV2_DRAM_EPOCHS, NNUNETV2_DRAM_ITERATIONS (per epoch), NNUNETV2_DRAM_VAL_ITERATIONS

and every trainer of this plugin takes them at construction. The values are written into the training log,
and `--c` continues with whatever the variables say then (as nnU-Net continues with its class defaults).
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


def apply_training_budget(trainer) -> dict[str, int]:
    budget = read_budget()
    for attr, n in budget.items():
        setattr(trainer, attr, n)
    if budget:
        trainer.print_to_log_file(f"training budget from the environment: {budget}")
    return budget
