"""nnU-Net finds DRAMTrainerFullRefine here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.dram_trainers import DRAMTrainerFullRefine  # noqa: F401
