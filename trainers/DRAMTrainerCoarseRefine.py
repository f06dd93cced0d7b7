"""nnU-Net finds DRAMTrainerCoarseRefine here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.dram_trainers import DRAMTrainerCoarseRefine  # noqa: F401
