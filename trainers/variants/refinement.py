"""nnU-Net finds DRAMTrainer's refinement variants here through nnUNet_extTrainer; the logic lives in nnunetv2_dram."""
from nnunetv2_dram.training.variants.refinement import (DRAMTrainerCoarseRefinement, DRAMTrainerDecoderHead,  # noqa: F401
                                                        DRAMTrainerFullDRAMWeight, DRAMTrainerHalfDRAMWeight,
                                                        DRAMTrainerHeadOnly,
                                                        DRAMTrainerPointwiseHead, DRAMTrainerWithAttention,
                                                        DRAMTrainerWithCRF,
                                                        DRAMTrainerWithoutAttention, DRAMTrainerWithoutHead)
