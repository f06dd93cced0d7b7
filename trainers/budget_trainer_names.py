"""nnU-Net finds `<Trainer>_<E>epochs` and `<Trainer>_<E>epochs_<I>its` here through nnUNet_extTrainer: this
module's `__getattr__` makes them on request; the logic lives in nnunetv2_dram.training.budget_trainer."""
from nnunetv2_dram.training.budget_trainer import __getattr__  # noqa: F401
