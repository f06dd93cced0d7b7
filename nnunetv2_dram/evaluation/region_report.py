"""Predicted region percentages against the weak targets: per region, per case, and the mean absolute error."""
from __future__ import annotations

import numpy as np

from nnunetv2_dram.evaluation.metrics import interval_error
from nnunetv2_dram.weak_labels.format import WeakLabels, percent_to_ctss


def region_report(predicted: dict, weak: WeakLabels) -> dict:
    """predicted: {case: {region (str or int): predicted percent}}. Regions without a target are listed but not
    scored. The MAE is pooled over every (case, region) pair with a target."""
    cases, errors, hits = {}, [], []
    for case, regions in sorted(predicted.items()):
        targets = weak.regions_of(case)
        rows = {}
        for region, pct in sorted(regions.items(), key=lambda kv: int(kv[0])):
            t = targets.get(int(region))
            row = {"predicted_percent": float(pct)}
            if t is not None:
                err = interval_error(float(pct), t)
                row.update(target=[t.low, t.high], abs_error=err)
                errors.append(err)
                if t.source == "ctss":
                    hit = percent_to_ctss(float(pct)) == t.ctss_bin
                    row["ctss_correct"] = bool(hit)
                    hits.append(hit)
            rows[str(region)] = row
        cases[case] = rows
    return {"mean_abs_error": float(np.mean(errors)) if errors else float("nan"), "n_regions": len(errors),
            "ctss_accuracy": float(np.mean(hits)) if hits else None, "cases": cases}
