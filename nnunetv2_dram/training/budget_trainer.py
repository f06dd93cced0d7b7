"""Trainer classes named by their training length, made when nnU-Net looks them up by name.

`<Trainer>_<E>epochs` and `<Trainer>_<E>epochs_<I>its` (see training/budget.py) exist for every plugin trainer,
for stock `nnUNetTrainer` and for any other trainer nnU-Net can find (its own variants, subclasses in the user's
`nnUNet_extTrainer` folders). nnU-Net finds trainers by importing every module of the `nnUNet_extTrainer` folders
and asking each for the class name; `trainers/budget_trainer_names.py` answers with this module's `__getattr__`
(PEP 562), which builds the subclass on the first request and returns the same class for the same name after
that. The class's `__module__` is this module, so pickling finds it again by name.

Stock `nnUNetTrainer`'s budgeted classes derive from `StockTrainer`: nnU-Net's trainer plus the plugin's
environment settings (seed, learning rate, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION) and peak GPU memory in the log.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dram.training.budget import (apply_environment_settings, parse_budget_trainer_name,
                                           skip_final_validation, validation_iterations)
from nnunetv2_dram.training.gpu_memory import log_peak_gpu_memory

class StockTrainer(nnUNetTrainer):
    """Stock nnUNetTrainer with the plugin's environment settings; the base of `nnUNetTrainer_<E>epochs[_<I>its]`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_environment_settings(self)

    def on_epoch_end(self):
        log_peak_gpu_memory(self)
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if skip_final_validation():
            self.print_to_log_file("final validation skipped (NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)


class nnUNetTrainerBudget(StockTrainer):
    """Stock nnUNetTrainer under the name `nnUNetTrainerBudget`, so that models trained under that name load,
    predict and continue. Its length is nnU-Net's; shorter stock trainings are `nnUNetTrainer_<E>epochs_<I>its`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


def _base_trainer_class(name: str) -> type | None:
    """The trainer a budget name shortens: StockTrainer for nnUNetTrainer, else whatever the plugin's trainers
    folder exposes under `name` (found the way nnU-Net finds trainers, whether or not nnUNet_extTrainer is set),
    else any trainer nnU-Net's resolver finds (its own variants, the user's nnUNet_extTrainer folders)."""
    if name == "nnUNetTrainer":
        return StockTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2_dram.paths import trainers_path
    folder = str(trainers_path())
    found = recursive_find_python_class(folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True)
    if found is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            found = recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None
    return found if isinstance(found, type) and issubclass(found, nnUNetTrainer) else None


_BUDGET_CLASSES: dict[str, type] = {}


def budget_trainer_class(name: str) -> type | None:
    """The class `name` = `<Trainer>_<E>epochs[_<I>its]` (made once, then cached); None when `name` is not such a
    name or its `<Trainer>` is not found."""
    if name in _BUDGET_CLASSES:
        return _BUDGET_CLASSES[name]
    parsed = parse_budget_trainer_name(name)
    if parsed is None:
        return None
    base_name, epochs, iterations = parsed
    base = _base_trainer_class(base_name)
    if base is None:
        return None

    # nnU-Net records a trainer's constructor arguments by the parameter names of `self.__init__` (for its
    # checkpoints), so the subclass keeps nnU-Net's explicit signature
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = validation_iterations(iterations)
        self.print_to_log_file(f"training length from the trainer name {name}: {self.num_epochs} epochs of "
                               f"{self.num_iterations_per_epoch} iterations, "
                               f"{self.num_val_iterations_per_epoch} validation iterations per epoch")

    __init__.__qualname__ = f"{name}.__init__"
    cls = type(name, (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name,
        "__doc__": f"{base_name} trained for {epochs} epochs"
                   + (f" of {iterations} iterations" if iterations is not None else "") + ".",
        "budget_base_trainer": base_name, "budget_epochs": epochs, "budget_iterations": iterations,
    })
    return _BUDGET_CLASSES.setdefault(name, cls)


def __getattr__(name: str):
    cls = None if name.startswith("__") else budget_trainer_class(name)
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
