"""One PNG per case so a person can check pseudo labels at a glance: CT with region outlines, the model's map,
the CRF-refined map and the pseudo label, on the axial and coronal slices through the most lesion."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _slice_through(label: np.ndarray, prob: np.ndarray, axis: int) -> int:
    weight = (label == 1).sum(axis=tuple(a for a in range(3) if a != axis))
    if weight.max() == 0:
        weight = prob.sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(weight))


def save_case_qc(png_path, image, regions, prob, refined, label, spacing, title: str = "") -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from scipy import ndimage

    from nnunetv2_dram.io_utils import atomic_path

    image, regions, prob, refined, label = (np.asarray(a) for a in (image, regions, prob, refined, label))
    views = [("axial", 0)] if image.shape[0] == 1 else [("axial", 0), ("coronal", 1)]
    fig, axes = plt.subplots(len(views), 4, figsize=(16, 4.2 * len(views)), squeeze=False)
    outline_cmap = ListedColormap([(0, 0, 0, 0), (1, 1, 0, 1)])
    label_cmap = ListedColormap([(0, 0, 0, 0), (1, 0, 0, 0.55), (0, 0.6, 1, 0.45)])
    for row, (name, axis) in zip(axes, views):
        idx = _slice_through(label, prob, axis)
        take = lambda a: np.take(a, idx, axis=axis)  # noqa: E731
        ct, reg = take(image), take(regions)
        sp = [s for i, s in enumerate(spacing) if i != axis]
        aspect = sp[0] / sp[1]
        edges = (ndimage.morphological_gradient(reg, size=3) > 0).astype(np.uint8)
        panels = [("CT + regions", None), ("model map", take(prob)), ("CRF-refined map", take(refined)),
                  ("pseudo label", None)]
        for ax, (ttl, heat) in zip(row, panels):
            ax.imshow(np.clip(ct, -1200, 200), cmap="gray", aspect=aspect, origin="lower" if axis else "upper")
            if heat is not None:
                ax.imshow(np.ma.masked_where(reg == 0, heat), cmap="magma", vmin=0, vmax=1, alpha=0.6,
                          aspect=aspect, origin="lower" if axis else "upper")
            elif ttl == "pseudo label":
                ax.imshow(take(label), cmap=label_cmap, vmin=0, vmax=2, interpolation="nearest", aspect=aspect,
                          origin="lower" if axis else "upper")
            ax.imshow(edges, cmap=outline_cmap, vmin=0, vmax=1, interpolation="nearest", aspect=aspect,
                      origin="lower" if axis else "upper")
            ax.set_title(f"{ttl} ({name} {idx})", fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
