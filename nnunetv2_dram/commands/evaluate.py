"""IoU and Dice of lesion predictions per case and mean (plus region-% error given region maps and weak labels).

Pairs files by case id: -ref CASE.nii.gz with -pred CASE.nii.gz. Lesion = value 1. Prints a table and writes
the full result as JSON (default: PRED_DIR/summary_dram.json).
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_OUTPUT_NAME = "summary_dram.json"


def add_arguments(parser):
    parser.add_argument("-ref", required=True, metavar="DIR", help="reference lesion masks (0/1), one file per case")
    parser.add_argument("-pred", required=True, metavar="DIR", help="predictions, named like the references")
    parser.add_argument("-o", metavar="FILE.json", default=None,
                        help=f"where to write the JSON result (default: PRED_DIR/{DEFAULT_OUTPUT_NAME})")
    parser.add_argument("--regions", metavar="DIR", default=None,
                        help="region maps (e.g. labelsTs of the weak dataset), named like the references; "
                             "with --weak-labels gives the region-%% error")
    parser.add_argument("--weak-labels", metavar="FILE", default=None, help="weak_labels.json with the targets")
    parser.add_argument("--ignore-label", type=int, default=None, metavar="N",
                        help="label value excluded from IoU/Dice, in reference or prediction (e.g. 2 in pseudo labels)")
    parser.add_argument("--file-ending", default=None, metavar="END",
                        help="file ending such as .nii.gz (default: detected from the reference folder)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip reference cases without a prediction instead of stopping")
    parser.add_argument("-np", type=int, default=1, metavar="N", help="worker processes (default 1)")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.evaluation.metrics import EvaluationError, evaluate_folders, format_table, to_json_compatible
    from nnunetv2_dram.io_utils import atomic_write_json

    ref_dir, pred_dir = Path(args.ref), Path(args.pred)
    output = Path(args.o) if args.o else pred_dir / DEFAULT_OUTPUT_NAME
    if output.suffix != ".json":
        raise UserError(f"-o {output}: the output file must end in .json")
    if _inside(output, ref_dir):
        raise UserError(f"-o {output} lies inside the reference folder {ref_dir}; the references are left "
                        f"untouched, so give -o a path elsewhere")
    if args.np < 1:
        raise UserError(f"-np {args.np}: needs at least 1 process")
    if (args.regions is None) != (args.weak_labels is None):
        raise UserError("--regions and --weak-labels go together: the region-% error needs both")
    try:
        result = evaluate_folders(ref_dir, pred_dir, file_ending=args.file_ending, regions_dir=args.regions,
                                  weak_labels=args.weak_labels, num_processes=args.np,
                                  ignore_label=args.ignore_label, allow_missing=args.allow_missing)
    except EvaluationError as e:
        raise UserError(str(e)) from e
    print(format_table(result))
    atomic_write_json(output, to_json_compatible(result))
    print(f"written: {output}")
    return 0
