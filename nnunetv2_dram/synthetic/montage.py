"""PNG contact sheets of chest CT cases: axial and coronal slices in a lung window, region outlines, lesions.

Made for people: to see at a glance that a (synthetic or converted) weak dataset looks like what it should.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

WINDOW_HU = (-1200.0, 200.0)
# region label -> outline colour (lobes 1..5; in 2-D, 1 and 2 are the lungs)
REGION_COLOURS = {1: "#1f77b4", 2: "#2ca02c", 3: "#ff7f0e", 4: "#9467bd", 5: "#e6c619"}
LESION_RGBA = (1.0, 0.15, 0.1, 0.25)


def _colour(label: int) -> str:
    if label in REGION_COLOURS:
        return REGION_COLOURS[label]
    import matplotlib
    return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](label % 20))


def _axial_levels(regions: np.ndarray, n: int) -> list[int]:
    """Slices spread over the lungs (over the whole scan if there are no regions)."""
    if regions.shape[0] == 1:
        return [0]
    z = np.nonzero(regions.reshape(regions.shape[0], -1).any(1))[0]
    lo, hi = (int(z[0]), int(z[-1])) if len(z) else (0, regions.shape[0] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]})


def _draw_panel(ax, image2d, regions2d, lesion2d, aspect: float, title: str) -> None:
    ax.imshow(image2d, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
              interpolation="nearest", origin="upper")
    if lesion2d is not None and lesion2d.any():
        # a light fill plus an outline, so the lesion's own texture stays visible under it
        overlay = np.zeros(lesion2d.shape + (4,), np.float32)
        overlay[lesion2d > 0] = LESION_RGBA
        ax.imshow(overlay, aspect=aspect, interpolation="nearest", origin="upper")
        if min(lesion2d.shape) >= 2:
            ax.contour((lesion2d > 0).astype(np.float32), levels=[0.5], colors=[LESION_RGBA[:3]], linewidths=0.6)
    if regions2d is not None:
        for label in np.unique(regions2d):
            if label == 0:
                continue
            mask = (regions2d == label).astype(np.float32)
            if mask.sum() >= 2 and min(mask.shape) >= 2:
                ax.contour(mask, levels=[0.5], colors=[_colour(int(label))], linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def _panels(image, regions, lesion, spacing, n_axial: int):
    """(2-D image, regions, lesion, aspect, title) for a row: axial slices (head side up in the coronal)."""
    sz, sy, sx = spacing
    panels = []
    for k in _axial_levels(regions, n_axial):
        panels.append((image[k], regions[k], lesion[k] if lesion is not None else None, sy / sx, f"axial z={k}"))
    if image.shape[0] > 1:
        lung_y = np.nonzero(regions.any(axis=(0, 2)))[0]
        j = int(np.median(lung_y)) if len(lung_y) else image.shape[1] // 2
        flip = np.s_[::-1, :]  # larger z (head) at the top
        panels.append((image[:, j, :][flip], regions[:, j, :][flip],
                       lesion[:, j, :][flip] if lesion is not None else None, sz / sx, f"coronal y={j}"))
    return panels


def save_montage(image, regions, lesion, spacing, png_path, title: str | None = None, n_axial: int = 3) -> Path:
    """One case (arrays (z, y, x), spacing (z, y, x) mm) as a row of axial slices plus a coronal slice."""
    return _save_rows([(_panels(np.asarray(image), np.asarray(regions),
                                None if lesion is None else np.asarray(lesion), spacing, n_axial), title)], png_path)


def _save_rows(rows, png_path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from nnunetv2_dram.io_utils import atomic_path

    n_cols = max(len(panels) for panels, _ in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.4 * n_cols, 3.5 * len(rows)), squeeze=False,
                             facecolor="black")
    for r, (panels, title) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_facecolor("black")
            if c < len(panels):
                img, reg, les, aspect, panel_title = panels[c]
                _draw_panel(ax, img, reg, les, aspect, f"{title}  {panel_title}" if title and c == 0 else panel_title)
                ax.title.set_color("white")
            else:
                ax.set_axis_off()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, facecolor="black", format="png")
    plt.close(fig)
    return png_path


def _read(path: Path):
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing())[::-1]


def save_dataset_montage(dataset_dir, png_path, cases=None, max_cases: int = 6, n_axial: int = 3) -> Path:
    """Contact sheet of up to `max_cases` training cases of a raw dataset (imagesTr + labelsTr regions, plus
    referenceTr lesions where present). Each row is titled with the case's weak targets."""
    dataset_dir = Path(dataset_dir)
    dataset_json = json.loads((dataset_dir / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    weak_path = dataset_dir / "weak_labels.json"
    weak = json.loads(weak_path.read_text())["cases"] if weak_path.is_file() else {}
    if cases is None:
        cases = sorted(p.name[: -len(ending)] for p in (dataset_dir / "labelsTr").iterdir()
                       if p.name.endswith(ending) and not p.name.startswith("."))
    cases = list(cases)[:max_cases]
    if not cases:
        raise FileNotFoundError(f"no cases to show in {dataset_dir / 'labelsTr'}")
    rows = []
    for case in cases:
        image, spacing = _read(dataset_dir / "imagesTr" / f"{case}_0000{ending}")
        regions, _ = _read(dataset_dir / "labelsTr" / f"{case}{ending}")
        reference = dataset_dir / "referenceTr" / f"{case}{ending}"
        lesion = _read(reference)[0] if reference.is_file() else None
        targets = weak.get(case, {})
        title = case + (" " + " ".join(f"{k}:{v}" for k, v in targets.items()) if targets else "")
        rows.append((_panels(image, regions, lesion, spacing, n_axial), title))
    return _save_rows(rows, os.fspath(png_path))
