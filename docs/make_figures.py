"""Draw docs/figures/method.png from a finished demo run (`nnunetv2_dram demo -o DIR`).

    python docs/make_figures.py DIR [--case synth_003]

Panels (one axial slice): CT with lobe outlines | one lobe as the network sees it (a training chunk) |
DRAMTrainer's raw dRAM | its refined map (local-affinity attention) | the pseudo label after the dense CRF on the CT |
the hidden reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo_dir")
    ap.add_argument("--case", default=None)
    ap.add_argument("-o", default=str(Path(__file__).parent / "figures" / "method.png"))
    args = ap.parse_args(argv)
    root = Path(args.demo_dir).resolve()
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[n] = str(root / n)
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    import torch
    from scipy import ndimage

    from nnunetv2_dram.pseudo_labels.generate import (LoadedModel, PseudoLabelSettings, _preprocessed_case,
                                                      predict_probability)
    from nnunetv2_dram.training.region_chunks import build_region_samples, extract_chunk, region_bboxes

    dataset = "Dataset980_SynthChest"
    raw = root / "nnUNet_raw" / dataset
    cases = sorted(p.name[:-7] for p in (raw / "labelsTr").glob("*.nii.gz"))
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # noqa: E731
    if args.case is None:  # the case with the most lesion
        args.case = max(cases, key=lambda c: read(raw / "referenceTr" / f"{c}.nii.gz").sum())
    case = args.case
    ct, regions = read(raw / "imagesTr" / f"{case}_0000.nii.gz"), read(raw / "labelsTr" / f"{case}.nii.gz")
    ref = read(raw / "referenceTr" / f"{case}.nii.gz")
    pseudo = read(root / "nnUNet_raw" / "Dataset981_SynthChestPseudo" / "labelsTr" / f"{case}.nii.gz")
    # the demo trains under a budget name (DRAMTrainer_<E>epochs_<I>its); its results folder names it
    trainer = sorted(p.name.split("__")[0] for p in (root / "nnUNet_results" / dataset).glob("DRAMTrainer*__*"))[0]
    settings = PseudoLabelSettings(dataset=dataset, configuration="3d_fullres", fold="all", trainer=trainer,
                                   plans="nnUNetPlans_quick")
    model = LoadedModel(settings, torch.device("cpu"))
    files = [str(raw / "imagesTr" / f"{case}_0000.nii.gz")]
    data, seg, props = _preprocessed_case(model, dataset, case, files, str(raw / "labelsTr" / f"{case}.nii.gz"),
                                          json.loads((raw / "dataset.json").read_text()))
    maps = {k: predict_probability(model, data, seg, props, k)[0] for k in ("dram", "refined")}
    z = int(np.argmax((ref > 0).sum((1, 2))))
    samples, _ = build_region_samples({case: region_bboxes(seg)}, None)
    lobe = max(samples, key=lambda s: s.voxels)
    chunk, cmask, _, _ = extract_chunk(data, seg, lobe, model.spec)
    cz = int(np.argmax(cmask[0].numpy().sum((1, 2))))

    edges = ndimage.morphological_gradient(regions[z], size=3) > 0
    fig, axes = plt.subplots(1, 6, figsize=(21, 4))
    window = dict(cmap="gray", vmin=-1200, vmax=200)
    axes[0].imshow(ct[z], **window)
    axes[0].imshow(np.ma.masked_where(~edges, edges), cmap="autumn", interpolation="nearest")
    axes[0].set_title("CT + lobes (weak label per lobe)")
    axes[1].imshow(chunk[0, cz].numpy(), cmap="gray")
    axes[1].contour(cmask[0, cz].numpy(), levels=[0.5], colors="yellow", linewidths=1)
    axes[1].set_title(f"training chunk: lobe {lobe.region} + 10 mm")
    for ax, key, title in ((axes[2], "dram", "dRAM (raw map)"), (axes[3], "refined", "refined map (attention)")):
        ax.imshow(ct[z], **window)
        ax.imshow(np.ma.masked_where(regions[z] == 0, maps[key][z]), cmap="magma", vmin=0, vmax=1, alpha=0.7)
        ax.set_title(title)
    for ax, lab, title, colour in ((axes[4], pseudo, "pseudo label (dense CRF, calibrated)", "Reds"),
                                   (axes[5], ref, "hidden reference", "Greens")):
        ax.imshow(ct[z], **window)
        ax.imshow(np.ma.masked_where(lab[z] != 1, lab[z]), cmap=colour, vmin=0, vmax=1.3, alpha=0.6)
        ax.set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{case}, axial slice {z}", fontsize=10)
    fig.tight_layout()
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.o, dpi=70)
    print(args.o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
