"""Batches of region chunks for nnU-Net's augmenter processes (batchgenerators DataLoader protocol)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from threadpoolctl import threadpool_limits

from nnunetv2_dram.training.region_chunks import ChunkSpec, RegionSample, extract_chunk


def intensity_transforms():
    """nnU-Net's own intensity augmentation (same transforms and probabilities as nnUNetTrainer), without the
    spatial part: geometry is handled by the chunk extraction so the whole region stays in view."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ])


class RegionChunkLoader(DataLoader):
    """Draws (case, region) samples — by `probabilities` (training) or in a fixed cycle (validation) —
    and returns {'data': (B, C, *chunk), 'target': (B, 1, *chunk) region mask, 'interval': (B, 2), 'bin': (B,),
    'spacing': [mm per axis of each chunk's grid], 'keys': [(case, region)]}."""

    def __init__(self, dataset, samples: Sequence[RegionSample], batch_size: int, spec: ChunkSpec,
                 probabilities: np.ndarray | None = None, augment: bool = True, sequential: bool = False,
                 mirror_axes: tuple = (), zoom_jitter: tuple = (0.8, 1.0)):
        super().__init__(dataset, batch_size, 1, None, True, False, True)
        if not samples:
            raise ValueError("no region samples to draw from")
        self.samples = list(samples)
        self.spec = spec
        self.probabilities = probabilities
        self.augment = augment
        self.sequential = sequential
        self.mirror_axes = tuple(mirror_axes) if augment else ()
        self.zoom_jitter = zoom_jitter if augment else None
        self.transforms = intensity_transforms() if augment else None
        self._cursor = 0
        self.indices = list(range(len(self.samples)))

    def _next_indices(self) -> list[int]:
        if self.sequential:
            idx = [(self._cursor + i) % len(self.samples) for i in range(self.batch_size)]
            self._cursor = (self._cursor + self.batch_size) % len(self.samples)
            return idx
        return list(np.random.choice(len(self.samples), self.batch_size, replace=True, p=self.probabilities))

    def generate_train_batch(self):
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        images, masks, intervals, bins, keys, spacings = [], [], [], [], [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for i in self._next_indices():
                s = self.samples[i]
                data, seg, _, _ = self._data.load_case(s.case)
                img, reg, placement, _ = extract_chunk(data, seg, s, self.spec, rng=rng, zoom_jitter=self.zoom_jitter,
                                                       random_position=self.augment, mirror_axes=self.mirror_axes)
                spacings.append(self.spec.chunk_spacing(placement))
                if self.transforms is not None:
                    fill = img.flatten(1).min(1).values.view(-1, *([1] * (img.ndim - 1)))
                    img = self.transforms(image=img, segmentation=reg.to(torch.int16))["image"]
                    if self.spec.mask_outside:  # augmentation must not blur the region's outline away
                        img = torch.where(reg > 0, img, fill)
                images.append(img)
                masks.append(reg)
                intervals.append(s.interval)
                bins.append(s.bin)
                keys.append((s.case, s.region))
        return {"data": torch.stack(images), "target": torch.stack(masks),
                "interval": torch.tensor(intervals, dtype=torch.float32),
                "bin": torch.tensor(bins, dtype=torch.int64), "spacing": spacings, "keys": keys}
