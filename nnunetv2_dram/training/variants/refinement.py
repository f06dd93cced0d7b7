"""DRAMTrainer's refinement, one setting changed at a time (experiments; the benchmarks compare them)."""
from __future__ import annotations

import torch

from nnunetv2_dram.training.dram_trainers import LOCAL_ATTENTION, DRAMTrainer


class DRAMTrainerFullDRAMWeight(DRAMTrainer):
    """The head's score added to the dRAM's full logits (`dram_weight` 1), which then decide most of the ranking inside
    a region: DRAMTrainer up to version 0.7.0. Trains exactly as DRAMTrainer (the weight enters only the refined map,
    which trains nothing there); only the refined map, and so the pseudo labels, differ."""

    head_settings = {**DRAMTrainer.head_settings, "dram_weight": 1.0}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerWithAttention(DRAMTrainerFullDRAMWeight):
    """The method's local-affinity attention before the head: the dRAM's logits are propagated between
    feature-similar neighbours (image and first-stage features), trained by the same self-training, and the head's
    score is added to the attention's full output (the full weight: here it scales what the attention's
    self-training learns from). DRAMTrainer up to version 0.4.0."""

    attention_settings = LOCAL_ATTENTION

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerWithCRF(DRAMTrainer):
    """The trainable dense CRF inside the refinement while training (on the dRAM's logits before the head is added,
    inside the region, at the chunk's zoomed spacing, Potts, bounded weights)."""

    crf_settings = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerCoarseRefinement(DRAMTrainerWithAttention):
    """DRAMTrainerWithAttention's attention on a 2x coarser grid (1/4 of the voxels in 2-D, 1/8 in 3-D), its map
    upsampled: cheaper, but it cannot move an edge by less than two voxels."""

    refine_downsample = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerWithoutHead(DRAMTrainer):
    """The refinement without its per-voxel classifier head: the attention alone propagates the dRAM's logits."""

    attention_settings = LOCAL_ATTENTION
    head_settings = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerHeadOnly(DRAMTrainer):
    """The head's logits replace the dRAM's before the attention: the refined map is what the head learnt from the
    thresholded dRAM, without the dRAM itself."""

    attention_settings = LOCAL_ATTENTION
    head_settings = {"combine": "replace"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerPointwiseHead(DRAMTrainer):
    """The classifier head with 1^dim instead of 3^dim convolutions: a per-voxel perceptron on the decoder's features
    and the image, cheaper."""

    attention_settings = LOCAL_ATTENTION
    head_settings = {"combine": "add", "kernel_size": 1}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerDecoderHead(DRAMTrainer):
    """The classifier head of version 0.3.0: a 3^dim convolution on the decoder's last features and the image, with
    instance norm, added to the dRAM's logits before the attention and trained through the refined map."""

    attention_settings = LOCAL_ATTENTION
    head_settings = {"combine": "add"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerHalfDRAMWeight(DRAMTrainer):
    """DRAMTrainer's refinement (the head's score added to half the dRAM's logits) under the name it was measured
    with as a variant, so that its models and commands keep working."""

    head_settings = {**DRAMTrainer.head_settings, "dram_weight": 0.5}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class DRAMTrainerWithoutAttention(DRAMTrainer):
    """The same refinement as DRAMTrainer's (the classifier head's intensity score added to the dRAM's logits, no
    attention), under the name it had in version 0.4.0, so that models trained with it keep loading (with the head
    weight they stored)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
