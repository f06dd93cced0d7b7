"""Set every predicted voxel outside the region maps (lobes/lungs) to background.

  nnunetv2_dram restrict -i PREDICTIONS -r REGION_MAPS -o OUTPUT

Pairs files by case id: -i CASE.nii.gz with -r CASE.nii.gz (e.g. the weak dataset's labelsTs); writes
OUTPUT/CASE.nii.gz with every voxel whose region label is 0 set to 0, plus OUTPUT/restriction.json (foreground
voxels per case before and after). A missing region map or a geometry mismatch stops before anything is
written; the input folders are only read.
"""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("-i", dest="input", required=True, metavar="DIR",
                        help="predictions, one segmentation file per case (e.g. nnUNetv2_predict's output)")
    parser.add_argument("-r", dest="regions", required=True, metavar="DIR",
                        help="region maps named like the predictions (e.g. labelsTs of the weak dataset); "
                             "label 0 = outside every region")
    parser.add_argument("-o", dest="output", required=True, metavar="DIR",
                        help="folder for the restricted predictions (not one of the input folders)")
    parser.add_argument("--file-ending", default=None, metavar="END",
                        help="file ending such as .nii.gz (default: from -i's dataset.json, else detected)")


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.pipeline.region_restriction import RestrictionError, restrict_predictions
    try:
        summary = restrict_predictions(args.input, args.regions, args.output, file_ending=args.file_ending)
    except RestrictionError as e:
        raise UserError(str(e)) from None
    cases = summary["cases"]
    before = sum(c["foreground_voxels"] for c in cases.values())
    after = sum(c["foreground_voxels_in_regions"] for c in cases.values())
    print(f"restrict: {len(cases)} case(s) written to {args.output}; {before - after} of {before} foreground "
          f"voxel(s) lay outside the regions")
    return 0
