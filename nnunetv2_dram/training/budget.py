"""What the plugin's trainers take from their class name and from the environment.

Training length is part of the trainer's name, the nnU-Net way (nnU-Net ships e.g. `nnUNetTrainer_5epochs`):

    <Trainer>_<E>epochs          E epochs of the trainer's own iterations per epoch
    <Trainer>_<E>epochs_<I>its   E epochs of I iterations, max(2, I // 5) validation iterations per epoch

for every plugin trainer and for stock `nnUNetTrainer`. nnU-Net names the results folder after the class
(`<name>__<plans>__<configuration>`), so a shortened training never shares a folder with a full one, and
`nnUNetv2_predict -tr <name>` rebuilds the network from the name. The classes are made on demand
(training/budget_trainer.py).

The environment adds four settings, read when a plugin trainer is constructed and written into its log:
NNUNETV2_DRAM_SEED=N seeds Python, NumPy and torch with N + the DDP rank (network initialisation, region sampling,
augmentation in the main process; a CPU run with nnUNet_n_proc_DA=0 is repeatable, and DDP ranks draw different
batches), NNUNETV2_DRAM_LR=X replaces nnU-Net's initial learning rate, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1 skips
the end-of-training validation, and NNUNETV2_DRAM_REFINE_OFFSETS picks the implementation of the refinement's
neighbour sums (offset_windows.py).
"""
from __future__ import annotations

import math
import os
import re

#: nnUNetTrainer's own training length
DEFAULT_EPOCHS = 1000
DEFAULT_ITERATIONS = 250
BUDGET_NAME = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*?)_(?P<epochs>[1-9][0-9]*)epochs"
                         r"(?:_(?P<iterations>[1-9][0-9]*)its)?$")

SEED_VARIABLE = "NNUNETV2_DRAM_SEED"
LEARNING_RATE_VARIABLE = "NNUNETV2_DRAM_LR"
SKIP_FINAL_VALIDATION_VARIABLE = "NNUNETV2_DRAM_SKIP_FINAL_VALIDATION"
REFINE_OFFSETS_VARIABLE = "NNUNETV2_DRAM_REFINE_OFFSETS"
#: variables that no longer set the training length; a trainer that finds one set stops and names the trainer
#: name to use instead, so that a run meant to be short never trains for the full length unnoticed
RETIRED_BUDGET_VARIABLES = ("NNUNETV2_DRAM_EPOCHS", "NNUNETV2_DRAM_ITERATIONS", "NNUNETV2_DRAM_VAL_ITERATIONS")
#: every variable a plugin trainer reads (tests clear them so the caller's shell cannot leak in)
TRAINER_VARIABLES = (SEED_VARIABLE, LEARNING_RATE_VARIABLE, SKIP_FINAL_VALIDATION_VARIABLE, REFINE_OFFSETS_VARIABLE,
                     *RETIRED_BUDGET_VARIABLES)


def budget_trainer_name(base: str, epochs: int, iterations: int | None = None) -> str:
    """'DRAMTrainer', 5, 20 -> 'DRAMTrainer_5epochs_20its' (iterations None -> 'DRAMTrainer_5epochs')."""
    for what, n in (("epochs", epochs), ("iterations", iterations)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what} must be a positive integer, got {n!r}")
    name = f"{base}_{epochs}epochs" + (f"_{iterations}its" if iterations is not None else "")
    if parse_budget_trainer_name(name) is None:
        raise ValueError(f"{base!r} is not a trainer class name")
    return name


def parse_budget_trainer_name(name: str) -> tuple[str, int, int | None] | None:
    """'DRAMTrainer_5epochs_20its' -> ('DRAMTrainer', 5, 20); None when `name` is not a budget name."""
    m = BUDGET_NAME.match(name)
    if m is None:
        return None
    its = m.group("iterations")
    return m.group("base"), int(m.group("epochs")), int(its) if its else None


def validation_iterations(iterations: int) -> int:
    """Validation iterations per epoch of a trainer named with `iterations` training iterations per epoch."""
    return max(2, iterations // 5)


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


def refuse_retired_budget_variables(trainer) -> None:
    found = [v for v in RETIRED_BUDGET_VARIABLES if os.environ.get(v) not in (None, "")]
    if found:
        name = type(trainer).__name__
        base = parse_budget_trainer_name(name)
        example = budget_trainer_name(base[0] if base else name, 5, 20)
        raise SystemExit(f"{', '.join(found)} set, but the training length is part of the trainer's name: "
                         f"unset {'it' if len(found) == 1 else 'them'} and train e.g. -tr {example} "
                         f"(5 epochs of 20 iterations), which gets its own results folder")


def seed_from_environment(trainer) -> None:
    """Seed Python, NumPy and torch with NNUNETV2_DRAM_SEED + the DDP rank: ranks draw different region samples
    and augmentations (DDP copies rank 0's initial weights to every rank)."""
    seed = _from_environment(SEED_VARIABLE, int, lambda v: True, "an integer")
    if seed is None:
        return
    import random

    import numpy as np
    import torch
    rank = getattr(trainer, "local_rank", 0) or 0
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2 ** 32)
    torch.manual_seed(rank_seed)
    trainer.print_to_log_file(f"random seed from the environment: {seed}"
                              + (f" + rank {rank} = {rank_seed}" if rank else ""))


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


def apply_environment_settings(trainer) -> None:
    """What a plugin trainer takes from the environment at construction (see the module docstring)."""
    refuse_retired_budget_variables(trainer)
    seed_from_environment(trainer)
    learning_rate_from_environment(trainer)
    mode = refine_offset_mode()
    if mode is not None:
        trainer.print_to_log_file(f"refinement offsets from the environment: {mode}")
