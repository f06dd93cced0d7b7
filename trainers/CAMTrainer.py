"""nnU-Net finds CAMTrainer here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.cam_trainer import CAMTrainer  # noqa: F401
