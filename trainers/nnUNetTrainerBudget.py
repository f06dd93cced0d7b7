"""nnU-Net finds nnUNetTrainerBudget here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.budget_trainer import nnUNetTrainerBudget  # noqa: F401
