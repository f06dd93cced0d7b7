"""nnU-Net finds DRAMTrainerSelfTraining here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.dram_trainers import DRAMTrainerSelfTraining  # noqa: F401
