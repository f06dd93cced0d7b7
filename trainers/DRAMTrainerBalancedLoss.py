"""nnU-Net finds DRAMTrainerBalancedLoss here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.dram_trainers import DRAMTrainerBalancedLoss  # noqa: F401
