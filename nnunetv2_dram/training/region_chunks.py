"""Region chunks: one training sample is one (case, region) pair, the whole region in view.

The pooled mean equals the region's lesion fraction only if every voxel of the region is seen, so a sample is
the region's bounding box plus a margin (in mm), cut from nnU-Net's preprocessed data and fitted into a fixed
chunk (the configuration's patch size: nnU-Net planned it to fit the GPU with this network, and it follows the
data's aspect). Fitting uses one zoom factor for all axes, so the region keeps its physical shape; the zoom only
ever shrinks (a region that already fits is left at its native resolution, which makes whole-image inference
at the same resolution comparable). Voxels outside the region can be set to the chunk's lowest intensity (the
authors' choice: they set them to the pad value) or left visible (our default, see weak_trainer.py); either way
the region mask travels with the chunk as the target and decides what is pooled.

Geometric augmentation happens here, where it can be kept safe: a random extra shrink, a random position
inside the chunk and mirroring never push part of the region out of view. Rotations are not used for that
reason. Intensity augmentation reuses nnU-Net's own transforms.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnunetv2_dram.weak_labels.format import WeakLabels
from nnunetv2_dram.weak_labels.problems import Problem


@dataclass(frozen=True)
class RegionSample:
    case: str
    region: int
    bbox: tuple  # ((start, stop), ...) per spatial axis of the preprocessed array (3 axes)
    voxels: int
    interval: tuple  # (low, high) lesion fraction; (nan, nan) when the region has no weak target
    bin: int  # severity bin used to balance sampling


def region_bboxes(seg: np.ndarray) -> dict[int, tuple[tuple, int]]:
    """{label: (bbox, voxel count)} for every label > 0 of a (1, Z, Y, X) or (Z, Y, X) map."""
    seg = np.asarray(seg)
    if seg.ndim == 4:
        seg = seg[0]
    seg = np.where(seg > 0, seg, 0).astype(np.int32, copy=False)
    counts = np.bincount(seg.ravel())
    out = {}
    for label, sl in enumerate(ndimage.find_objects(seg), start=1):
        if sl is None:
            continue
        out[label] = (tuple((int(s.start), int(s.stop)) for s in sl), int(counts[label]))
    return out


def index_regions(dataset, identifiers: Sequence[str], cache_file: str | None = None,
                  progress: bool = False) -> dict[str, dict[int, tuple[tuple, int]]]:
    """Bounding boxes of every region of every case, read once from the preprocessed maps and cached
    (the cache lives next to the preprocessed data it describes)."""
    cache = {}
    if cache_file and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                raw = json.load(f)
            cache = {c: {int(r): (tuple(tuple(b) for b in v[0]), int(v[1])) for r, v in regions.items()}
                     for c, regions in raw.items()}
        except (OSError, ValueError, KeyError, TypeError):
            cache = {}
    missing = [c for c in identifiers if c not in cache]
    if missing:
        iterator = missing
        if progress:
            from tqdm import tqdm
            iterator = tqdm(missing, desc="indexing regions", unit="case")
        for case in iterator:
            _, seg, _, _ = dataset.load_case(case)
            cache[case] = region_bboxes(seg[:])
        if cache_file:
            from nnunetv2_dram.io_utils import atomic_write_json
            try:
                atomic_write_json(cache_file, {c: {str(r): [list(map(list, v[0])), v[1]] for r, v in regions.items()}
                                               for c, regions in cache.items()}, indent=None)
            except OSError:
                pass  # a read-only preprocessed folder only costs the re-indexing next time
    return {c: cache[c] for c in identifiers}


def build_region_samples(region_index: dict, weak: WeakLabels | None, require_targets: bool = True,
                         ) -> tuple[list[RegionSample], list[Problem]]:
    """Samples for every region with a weak target (or every region when weak is None).
    Problems: a case without an entry, a target for a region that the (preprocessed) map does not contain."""
    samples, problems = [], []
    for case, regions in region_index.items():
        targets = weak.regions_of(case) if weak is not None else {}
        if weak is not None and case not in weak.cases and require_targets:
            problems.append(Problem("training case has no entry in weak_labels.json", file="weak_labels.json",
                                    case=case, hint="add its regions' targets, or remove the case from the dataset"))
            continue
        for region, target in targets.items():
            if region not in regions:
                problems.append(Problem("region has a weak target but no voxels in the preprocessed region map",
                                        file="weak_labels.json", case=case, region=region,
                                        hint="check the region map, or drop this region's target"))
        for region, (bbox, voxels) in sorted(regions.items()):
            target = targets.get(region)
            if target is None:
                if weak is not None:
                    continue  # present in the map, no supervision (docs/reference.md, "weak_labels.json")
                interval, b = (math.nan, math.nan), -1
            else:
                interval, b = target.fraction_interval, target.ctss_bin
            samples.append(RegionSample(case, region, bbox, voxels, tuple(interval), b))
    return samples, problems


def balanced_probabilities(samples: Sequence[RegionSample], power: float = 1.0) -> np.ndarray:
    """Sampling probability per sample, inversely proportional to its severity bin's frequency^power.
    power=1 samples every bin equally often (the authors' per-CTSS-class balancing), 0 is uniform."""
    bins = np.array([s.bin for s in samples])
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse].astype(np.float64) ** power
    return w / w.sum()


@dataclass
class ChunkSpec:
    chunk_size: tuple  # spatial patch size (2 or 3 axes)
    margin_voxels: tuple  # margin per axis of the preprocessed array (3 axes)
    mask_outside: bool = True
    spacing: tuple | None = None  # mm per axis of the preprocessed grid, network axes (2 or 3)

    @classmethod
    def from_configuration(cls, patch_size, spacing, margin_mm: float = 10.0, mask_outside: bool = True):
        spacing = list(spacing)
        if len(spacing) == 2:  # 2-D configuration: no margin along the slice axis
            margin = (0,) + tuple(int(math.ceil(margin_mm / s)) for s in spacing)
        else:
            margin = tuple(int(math.ceil(margin_mm / s)) for s in spacing)
        return cls(tuple(int(p) for p in patch_size), margin, mask_outside, tuple(float(s) for s in spacing))

    def chunk_spacing(self, placement: "ChunkPlacement") -> tuple:
        """mm per axis of a chunk's grid: the preprocessed spacing divided by the zoom the chunk was fitted with."""
        if self.spacing is None:
            raise ValueError("this ChunkSpec was made without a spacing")
        return tuple(s * (b - a) / r for s, (a, b), r in zip(self.spacing, placement.crop, placement.resized_shape))


@dataclass
class ChunkPlacement:
    """Where a region crop went inside the chunk: needed to paste predictions back."""
    crop: tuple  # ((start, stop), ...) of the crop in the case's array (spatial axes used by the network)
    resized_shape: tuple
    offset: tuple
    flips: tuple = ()


def _crop_box(bbox, margin, shape):
    return tuple((max(0, b0 - m), min(s, b1 + m)) for (b0, b1), m, s in zip(bbox, margin, shape))


def _resize(t: torch.Tensor, size, mode: str) -> torch.Tensor:
    """(C, *S) -> (C, *size)."""
    if tuple(t.shape[1:]) == tuple(size):
        return t
    if mode == "linear":
        mode = "trilinear" if t.ndim == 4 else "bilinear"
        return F.interpolate(t[None], size=size, mode=mode, align_corners=False)[0]
    return F.interpolate(t[None], size=size, mode=mode)[0]


def extract_chunk(data, seg, sample: RegionSample, spec: ChunkSpec, rng: np.random.Generator | None = None,
                  zoom_jitter: tuple | None = None, random_position: bool = False, mirror_axes: tuple = (),
                  extra: np.ndarray | None = None):
    """Cut one region out of a case and fit it into the chunk.

    data: (C, Z, Y, X) array-like (numpy or blosc2); seg: (1, Z, Y, X) region map.
    Returns (image (C, *chunk) float32, region (1, *chunk) float32 0/1, placement, extra_chunk or None).
    `extra` (K, Z, Y, X) is resampled like the region mask (nearest-style, threshold 0.5): used by tests to
    check that a lesion fraction survives the trip.
    """
    rng = rng if rng is not None else np.random.default_rng()
    chunk = tuple(spec.chunk_size)
    two_d = len(chunk) == 2
    shape = tuple(data.shape[1:])
    box = _crop_box(sample.bbox, spec.margin_voxels, shape)
    sl = tuple(slice(a, b) for a, b in box)
    img = torch.from_numpy(np.asarray(data[(slice(None),) + sl], dtype=np.float32))
    reg = torch.from_numpy(np.asarray(seg[(slice(0, 1),) + sl]) == sample.region).float()
    ext = torch.from_numpy(np.asarray(extra[(slice(None),) + sl], dtype=np.float32)) if extra is not None else None
    if two_d:
        if img.shape[1] != 1:
            raise ValueError(f"case '{sample.case}': the 2d configuration needs one slice per case, this one has "
                             f"{img.shape[1]} slices; use 3d_fullres for volumes")
        img, reg = img[:, 0], reg[:, 0]
        ext = ext[:, 0] if ext is not None else None
        box = box[1:]
    crop_shape = img.shape[1:]
    scale = min(1.0, min(c / s for c, s in zip(chunk, crop_shape)))
    if zoom_jitter is not None:
        scale *= float(rng.uniform(*zoom_jitter))
    resized = tuple(max(1, min(c, int(math.floor(s * scale + 0.5)))) for s, c in zip(crop_shape, chunk))
    img = _resize(img, resized, "linear")
    reg = (_resize(reg, resized, "linear") > 0.5).float()
    if ext is not None:
        ext = (_resize(ext, resized, "linear") > 0.5).float()
    if spec.mask_outside:
        fill = img.flatten(1).min(1).values.view(-1, *([1] * len(resized)))
        img = torch.where(reg > 0, img, fill)
    else:
        fill = img.flatten(1).min(1).values.view(-1, *([1] * len(resized)))
    slack = [c - r for c, r in zip(chunk, resized)]
    offset = tuple(int(rng.integers(0, s + 1)) if random_position else s // 2 for s in slack)
    out_img = fill.expand(img.shape[0], *chunk).clone()
    out_reg = torch.zeros((1, *chunk), dtype=torch.float32)
    dst = tuple(slice(o, o + r) for o, r in zip(offset, resized))
    out_img[(slice(None),) + dst] = img
    out_reg[(slice(None),) + dst] = reg
    out_ext = None
    if ext is not None:
        out_ext = torch.zeros((ext.shape[0], *chunk), dtype=torch.float32)
        out_ext[(slice(None),) + dst] = ext
    flips = tuple(int(a) for a in mirror_axes if rng.uniform() < 0.5)
    if flips:
        dims = [a + 1 for a in flips]
        out_img, out_reg = out_img.flip(dims), out_reg.flip(dims)
        out_ext = out_ext.flip(dims) if out_ext is not None else None
    return out_img, out_reg, ChunkPlacement(box, resized, offset, flips), out_ext


def paste_chunk(chunk_map: torch.Tensor, placement: ChunkPlacement, region_mask_full: np.ndarray,
                out: np.ndarray) -> None:
    """Put a chunk's map (1, *chunk) back into `out` (case grid, spatial axes as used by the network) inside
    the region only (regions never overlap, so pasting every region fills the lungs exactly once)."""
    m = chunk_map
    if placement.flips:
        m = m.flip([a + 1 for a in placement.flips])
    src = tuple(slice(o, o + r) for o, r in zip(placement.offset, placement.resized_shape))
    m = m[(slice(None),) + src]
    crop_shape = tuple(b - a for a, b in placement.crop)
    m = _resize(m.float(), crop_shape, "linear")[0].cpu().numpy()
    sl = tuple(slice(a, b) for a, b in placement.crop)
    inside = region_mask_full[sl]
    view = out[sl]
    view[inside] = m[inside]
