"""nnU-Net finds nnUNetTrainerBudget here through nnUNet_extTrainer, so that models trained under this name load;
the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.budget_trainer import nnUNetTrainerBudget  # noqa: F401
