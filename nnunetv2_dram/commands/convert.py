"""CTs + region maps + a table of weak targets -> a checked weak nnU-Net raw dataset (format: docs/reference.md,
"Weak dataset").

  nnunetv2_dram convert --images cts/ --regions lobes/ --table scores.csv --target percentage -d 501 --name Covid
  nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres --verify_dataset_integrity
  nnUNetv2_train 501 3d_fullres all -tr DRAMTrainer

Cases are matched by name: cts/CASE.nii.gz (or CASE_0000.nii.gz), regions/CASE.nii.gz or regions/CASE/
(TotalSegmentator per-structure folder), and the table row of CASE.
"""
from __future__ import annotations

from nnunetv2_dram.commands.regions import PRESET_NAMES


def add_arguments(parser):
    parser.add_argument("--images", required=True, help="folder of CTs (CASE.nii.gz, .nii, .nrrd, .mha, ...)")
    parser.add_argument("--regions", required=True,
                        help="folder of lobe masks per case: CASE.<ext> multi-label files or CASE/ structure folders")
    parser.add_argument("--table", required=True, help="CSV/TSV of weak targets (or a ready weak_labels.json)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="new dataset ID (e.g. 901)")
    parser.add_argument("--name", required=True, help="dataset name: the folder becomes Dataset<ID>_<name>")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--region-preset", choices=PRESET_NAMES, default="totalsegmentator_v2",
                        help="label numbering of the masks (default totalsegmentator_v2; see "
                             "`nnunetv2_dram regions --list-presets`)")
    source.add_argument("--mapping", metavar="JSON", help="custom region mapping file instead of a preset")
    parser.add_argument("--target", choices=("percentage", "ctss"), default=None,
                        help="what plain numbers in the table mean: lesion percent of the region, or CT severity "
                             "score 0..5 (intervals like 5-25 are always percent). Default: percentage, but a table "
                             "whose numbers are all integers 0..5 stops with an error until --target says which")
    parser.add_argument("--case-column", help="table column holding the case ids (default: detected)")
    parser.add_argument("--table-preset", choices=("lobes", "none"), default="lobes",
                        help="how table columns map to regions")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=LABEL",
                        help="map a table column to a region explicitly; repeatable")
    parser.add_argument("--file-ending", default=".nii.gz", choices=(".nii.gz", ".nii", ".nrrd", ".mha"),
                        help="file ending of the dataset (default .nii.gz); CTs in another format are rewritten")
    parser.add_argument("--symlink", action="store_true",
                        help="link CTs that are already in the dataset's format instead of copying them")
    parser.add_argument("--skip-unmatched", action="store_true",
                        help="leave out cases lacking a CT, region map or table row (default: error)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID")
    parser.add_argument("--raw", dest="raw_root", help="nnU-Net raw folder to write to (default: $nnUNet_raw)")
    parser.add_argument("--no-check", action="store_true", help="skip the dataset checker at the end")
    parser.add_argument("--accept-suspicious-regions", action="store_true",
                        help="build even where a region map looks like the wrong preset (left lobes on the "
                             "patient's right, labels of another numbering)")


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.conversion.dataset_from_folder import build_weak_dataset
    from nnunetv2_dram.weak_labels.problems import WeakDatasetError

    raw_root = args.raw_root
    if raw_root is None:
        from nnunetv2_dram.paths import ensure_nnunet_paths
        raw_root = ensure_nnunet_paths()["nnUNet_raw"]
    try:
        report = build_weak_dataset(
            args.images, args.regions, args.table, raw_root, args.dataset_id, args.name,
            file_ending=args.file_ending, region_preset=None if args.mapping else args.region_preset,
            image_mode="symlink" if args.symlink else "copy", mapping=args.mapping, target=args.target,
            case_column=args.case_column, table_preset=args.table_preset, columns=args.column,
            overwrite=args.overwrite, skip_unmatched=args.skip_unmatched, check=not args.no_check,
            accept_suspicious_regions=args.accept_suspicious_regions, log=print)
    except WeakDatasetError as e:
        raise UserError(str(e)) from None

    if report.table_report is not None:
        print(report.table_report.summary())
    for case, region_report in report.region_reports.items():
        if region_report.reoriented:
            print(f"  {case}: region map reoriented {region_report.reoriented}")
    for where, safe in report.renamed.items():
        print(f"  renamed {where} -> {safe}")
    if report.converted_images:
        print(f"  rewrote {len(report.converted_images)} CT(s) as {args.file_ending}")
    for w in report.warnings:
        print(w)
    if report.check_problems is None:
        print("dataset checker not run")
    else:
        for p in report.check_problems:
            print(p)
        n_warnings = sum(p.severity == "warning" for p in report.check_problems)
        print(f"check OK: 0 error(s), {n_warnings} warning(s)")
    print(f"next:\n  nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity\n"
          f"  nnUNetv2_train {args.dataset_id} 3d_fullres all -tr DRAMTrainer")
    return 0
