"""A small per-voxel classifier for the dRAM's refinement, on the image and optionally the backbone's features.

    logits = conv1x1( block^depth( inputs ) ),   block = LeakyReLU( InstanceNorm( conv( . ) ) )

with `kernel_size`^dim convolutions in the blocks (3 by default; 1 makes the head a per-voxel perceptron).
`norm=False` leaves the instance norm out: the head is then a fixed function of each voxel's inputs, whatever else
the chunk holds, so a pointwise head on the image can be evaluated on any grid (the refinement evaluates it on the
case's own grid, finer than the zoomed chunks the dRAM is computed on).

It is trained per voxel by self-training (losses/self_training.py): its targets are the dRAM thresholded inside the
region, so it learns, across every training case, which intensity (and feature) patterns the dRAM's lesion voxels
share, and scores every voxel by them. The region regression constrains only a region's mean; this head is the part
of the refinement that ranks the voxels inside a region by what they look like, each at its own resolution.

`zero_init`: the last convolution starts at zero, so that a head added to the dRAM starts as the identity.
"""
from __future__ import annotations

import torch
from torch import nn


class VoxelClassifierHead(nn.Module):
    def __init__(self, dim: int, in_channels: int, hidden_channels: int = 16, depth: int = 1, kernel_size: int = 3,
                 norm: bool = True, zero_init: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        norm_op = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        self.in_channels, self.hidden_channels, self.depth = int(in_channels), int(hidden_channels), int(depth)
        self.kernel_size, self.norm = int(kernel_size), bool(norm)
        blocks = []
        for k in range(depth):
            blocks.append(conv(in_channels if k == 0 else hidden_channels, hidden_channels, kernel_size,
                               padding=kernel_size // 2))
            if self.norm:
                blocks.append(norm_op(hidden_channels, affine=True))
            blocks.append(nn.LeakyReLU(0.01, inplace=True))
        self.body = nn.Sequential(*blocks)
        self.out = conv(hidden_channels, 1, 1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))
