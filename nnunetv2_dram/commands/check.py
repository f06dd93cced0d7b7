"""Validate a weak dataset and the set-up: every problem at once, before any training starts.

Exit status 0 when there is no error (warnings allowed), 1 otherwise.
"""
from __future__ import annotations

import sys


def add_arguments(parser):
    parser.add_argument("-d", dest="dataset", required=True,
                        help="dataset ID (e.g. 901), name (Dataset901_Name) or path of the raw weak dataset folder")
    parser.add_argument("--no-setup", action="store_true",
                        help="check only the dataset, not nnU-Net's variables, trainer discovery and optional CRF")
    parser.add_argument("--quiet", action="store_true",
                        help="print only errors and the summary line (no warnings, notes or progress bar)")


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.weak_labels.checker import check_setup, inspect_weak_dataset, resolve_raw_dataset_dir
    from nnunetv2_dram.weak_labels.problems import Problem

    problems: list[Problem] = [] if args.no_setup else check_setup()
    report = None
    try:
        dataset_dir = resolve_raw_dataset_dir(args.dataset)
    except UserError as e:
        problems.append(Problem(str(e)))
    else:
        if not args.quiet:
            print(f"checking weak dataset {dataset_dir}")
        report = inspect_weak_dataset(dataset_dir, progress=not args.quiet and sys.stderr.isatty())
        problems += report.problems

    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    notes = [p for p in problems if p.severity not in ("error", "warning")]
    for p in errors + ([] if args.quiet else warnings + notes):
        print(p)

    found = ""
    if report is not None:
        found = f" ({len(report.training_cases)} training case(s), {len(report.test_cases)} test case(s), " \
                f"{report.reference_files} reference mask(s))"
    verdict = "FAILED" if errors else "OK"
    print(f"check {verdict}: {len(errors)} error(s), {len(warnings)} warning(s){found}")
    return 1 if errors else 0
