"""A small per-voxel classifier on the decoder's last features and the image, for the dRAM's refinement.

    logits = conv1x1( block^depth( [features, image] ) ),   block = LeakyReLU( InstanceNorm( conv( . ) ) )

with `kernel_size`^dim convolutions in the blocks (3 by default; 1 makes the head a per-voxel perceptron, cheaper).

The refinement trains it per voxel by self-training (losses/self_training.py): its targets are the dRAM thresholded
inside the region, so it learns, across every training case, which feature and intensity patterns the dRAM's
confident voxels share, and scores every voxel by them. The region regression constrains only a region's mean; this
head is the part of the refinement that can rank the voxels inside a region by what they look like.

`zero_init`: the last convolution starts at zero, so that a head added to the dRAM starts as the identity.
"""
from __future__ import annotations

import torch
from torch import nn


class VoxelClassifierHead(nn.Module):
    def __init__(self, dim: int, in_channels: int, hidden_channels: int = 16, depth: int = 1, kernel_size: int = 3,
                 zero_init: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        self.in_channels, self.hidden_channels, self.depth = int(in_channels), int(hidden_channels), int(depth)
        self.kernel_size = int(kernel_size)
        blocks = []
        for k in range(depth):
            blocks += [conv(in_channels if k == 0 else hidden_channels, hidden_channels, kernel_size,
                            padding=kernel_size // 2),
                       norm(hidden_channels, affine=True), nn.LeakyReLU(0.01, inplace=True)]
        self.body = nn.Sequential(*blocks)
        self.out = conv(hidden_channels, 1, 1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))
