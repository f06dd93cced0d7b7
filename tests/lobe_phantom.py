"""Tiny chest-like volumes for the conversion tests, shaped like the real tools' outputs.

Arrays are (z, y, x) with identity direction, so +x is the patient's left and +z superior (LPS): left lobes lie at
high x, upper lobes at high z. That lets the converters' laterality check see real anatomy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE = (8, 16, 16)
SPACING = (1.5, 1.25, 2.0)  # SimpleITK order x, y, z
ORIGIN = (-10.0, 5.0, 30.0)

# our lobe value -> voxel block (z slice, y slice, x slice)
LOBE_BLOCKS = {
    1: (slice(4, 8), slice(3, 13), slice(9, 15)),  # left upper
    2: (slice(0, 4), slice(3, 13), slice(9, 15)),  # left lower
    3: (slice(5, 8), slice(3, 13), slice(1, 7)),  # right upper
    4: (slice(3, 5), slice(3, 13), slice(1, 7)),  # right middle
    5: (slice(0, 3), slice(3, 13), slice(1, 7)),  # right lower
}

# TotalSegmentator ids of the lobes (v2 'total' / 'total_v1'), written independently of the code under test
TS_V2_LOBES = {1: 10, 2: 11, 3: 12, 4: 13, 5: 14}
TS_V1_LOBES = {1: 13, 2: 14, 3: 15, 4: 16, 5: 17}
TS_NAMES = {1: "lung_upper_lobe_left", 2: "lung_lower_lobe_left", 3: "lung_upper_lobe_right",
            4: "lung_middle_lobe_right", 5: "lung_lower_lobe_right"}


def our_lobes() -> np.ndarray:
    arr = np.zeros(SHAPE, dtype=np.uint8)
    for value, block in LOBE_BLOCKS.items():
        arr[block] = value
    return arr


def _image(arr: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def write(arr: np.ndarray, path: Path, **geometry) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(arr, **geometry), str(path), True)
    return path


def write_ct(path: Path, seed: int = 0, **geometry) -> Path:
    rng = np.random.default_rng(seed)
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[:, 1:15, 0:16] = 40  # body
    lungs = our_lobes() > 0
    ct[lungs] = -850 + rng.integers(-30, 30, size=int(lungs.sum()))
    return write(ct, path, **geometry)


def totalseg_v2_multilabel() -> np.ndarray:
    """A `total` --ml file: lobes plus many other organ ids around them (liver 5, heart 51, aorta 52, ribs ...)."""
    arr = np.zeros(SHAPE, dtype=np.uint8)
    arr[0:2, 13:16, 0:8] = 5  # liver (patient right, inferior)
    arr[0:2, 13:16, 9:16] = 1  # spleen
    arr[:, 0:2, 6:9] = 43  # vertebrae_T1 .. as a stand-in for the spine column
    arr[:, 14:16, 7:9] = 116  # sternum
    arr[2:6, 6:10, 7:9] = 51  # heart
    arr[6:8, 6:10, 7:9] = 16  # trachea
    arr[0:8, 0:1, 0:16] = 92  # rib_left_1 ... stand-in ribs
    for value, block in LOBE_BLOCKS.items():
        arr[block] = TS_V2_LOBES[value]
    return arr


def totalseg_v1_multilabel() -> np.ndarray:
    """Same anatomy in v1 numbering (liver 5, spleen 1, heart_myocardium 44, trachea 43, pancreas 10 ...)."""
    arr = np.zeros(SHAPE, dtype=np.uint8)
    arr[0:2, 13:16, 0:8] = 5
    arr[0:2, 13:16, 9:16] = 1
    arr[0:1, 13:16, 5:9] = 10  # pancreas
    arr[1:2, 12:13, 2:5] = 11  # adrenal_gland_right
    arr[1:2, 12:13, 11:14] = 12  # adrenal_gland_left
    arr[2:6, 6:10, 7:9] = 44
    arr[6:8, 6:10, 7:9] = 43
    for value, block in LOBE_BLOCKS.items():
        arr[block] = TS_V1_LOBES[value]
    return arr


def write_totalseg_folder(folder: Path, with_other_structures: bool = True, **geometry) -> Path:
    """A TotalSegmentator per-structure folder: one binary uint8 mask per structure, named after it."""
    lobes = our_lobes()
    for value, name in TS_NAMES.items():
        write((lobes == value).astype(np.uint8), folder / f"{name}.nii.gz", **geometry)
    if with_other_structures:
        full = totalseg_v2_multilabel()
        for name, value in (("liver", 5), ("heart", 51), ("spleen", 1)):
            write((full == value).astype(np.uint8), folder / f"{name}.nii.gz", **geometry)
    return folder
