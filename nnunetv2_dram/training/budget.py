"""Shorter trainings without new trainer names: the pipeline (and anyone on a CPU) sets

    NNUNETV2_DRAM_EPOCHS, NNUNETV2_DRAM_ITERATIONS (per epoch), NNUNETV2_DRAM_VAL_ITERATIONS

and every trainer of this plugin takes them at construction. NNUNETV2_DRAM_SEED=N additionally seeds Python,
NumPy and torch there (network initialisation, region sampling, augmentation in the main process), which makes
a CPU run with nnUNet_n_proc_DA=0 repeatable, NNUNETV2_DRAM_LR=X replaces nnU-Net's initial learning rate, and
NNUNETV2_DRAM_REFINE_OFFSETS picks the implementation of the refinement's neighbour sums (offset_windows.py).
The values are written into the training log, and `--c` continues with whatever the variables say then (as
nnU-Net continues with its class defaults).
"""
from __future__ import annotations

import math
import os

BUDGET_VARIABLES = {
    "NNUNETV2_DRAM_EPOCHS": "num_epochs",
    "NNUNETV2_DRAM_ITERATIONS": "num_iterations_per_epoch",
    "NNUNETV2_DRAM_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}
SEED_VARIABLE = "NNUNETV2_DRAM_SEED"
LEARNING_RATE_VARIABLE = "NNUNETV2_DRAM_LR"
SKIP_FINAL_VALIDATION_VARIABLE = "NNUNETV2_DRAM_SKIP_FINAL_VALIDATION"
REFINE_OFFSETS_VARIABLE = "NNUNETV2_DRAM_REFINE_OFFSETS"
#: every variable a plugin trainer reads (tests clear them so the caller's shell cannot leak in)
TRAINER_VARIABLES = (*BUDGET_VARIABLES, SEED_VARIABLE, LEARNING_RATE_VARIABLE, SKIP_FINAL_VALIDATION_VARIABLE,
                     REFINE_OFFSETS_VARIABLE)


def _from_environment(var: str, parse, valid, requirement: str):
    """The parsed value of `var`, None when unset; a clear stop naming the variable when it is not `valid`."""
    value = os.environ.get(var)
    if value in (None, ""):
        return None
    try:
        parsed = parse(value)
    except ValueError:
        parsed = None
    if parsed is None or not valid(parsed):
        raise SystemExit(f"{var}={value!r} must be {requirement}")
    return parsed


def read_budget() -> dict[str, int]:
    out = {}
    for var, attr in BUDGET_VARIABLES.items():
        n = _from_environment(var, int, lambda v: v >= 1, "a positive integer")
        if n is not None:
            out[attr] = n
    return out


def seed_from_environment(trainer) -> None:
    seed = _from_environment(SEED_VARIABLE, int, lambda v: True, "an integer")
    if seed is None:
        return
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer.print_to_log_file(f"random seed from the environment: {seed}")


def learning_rate_from_environment(trainer) -> None:
    """NNUNETV2_DRAM_LR replaces nnU-Net's initial learning rate (1e-2, SGD with momentum 0.99, poly decay)."""
    lr = _from_environment(LEARNING_RATE_VARIABLE, float, lambda v: math.isfinite(v) and 0 < v < 10,
                           "a positive number such as 1e-3")
    if lr is not None:
        trainer.initial_lr = lr
        trainer.print_to_log_file(f"initial learning rate from the environment: {lr}")


def skip_final_validation() -> bool:
    return os.environ.get(SKIP_FINAL_VALIDATION_VARIABLE, "0") in ("1", "true", "True")


def refine_offset_mode() -> str | None:
    """NNUNETV2_DRAM_REFINE_OFFSETS: the attention's and CRF's `offset_mode` ("compiled": torch.compile of the
    window sums while training, an experiment for the GPU speed goal); None when unset."""
    from nnunetv2_dram.building_blocks.offset_windows import OFFSET_MODES
    return _from_environment(REFINE_OFFSETS_VARIABLE, str, lambda v: v in OFFSET_MODES,
                             "one of " + ", ".join(OFFSET_MODES))


def apply_training_budget(trainer) -> dict[str, int]:
    seed_from_environment(trainer)
    learning_rate_from_environment(trainer)
    budget = read_budget()
    for attr, n in budget.items():
        setattr(trainer, attr, n)
    if budget:
        trainer.print_to_log_file(f"training budget from the environment: {budget}")
    mode = refine_offset_mode()
    if mode is not None:
        trainer.print_to_log_file(f"refinement offsets from the environment: {mode}")
    return budget
