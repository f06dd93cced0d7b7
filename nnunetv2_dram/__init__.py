"""nnunetv2_dram: weakly supervised lesion segmentation with dense regression activation maps, inside nnU-Net v2.

Importing this package is cheap on purpose: nnU-Net's trainer search imports the shims in `trainers/`,
which import from here, and nothing heavy may run at that moment.
"""
__version__ = "0.1.0"
