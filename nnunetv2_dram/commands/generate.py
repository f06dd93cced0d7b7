"""Write a synthetic chest-CT weak dataset (lobe region maps, per-lobe lesion targets, reference lesion masks)
into $nnUNet_raw/DatasetXXX_<name>, ready for `nnunetv2_dram check` and nnU-Net planning."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", default="SynthChest", help="dataset name after DatasetXXX_ (default: %(default)s)")
    parser.add_argument("--train", type=int, default=20, metavar="N", help="training cases (default: %(default)s)")
    parser.add_argument("--test", type=int, default=6, metavar="N", help="test cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same arguments give the same data")
    parser.add_argument("--target", choices=("percentage", "ctss"), default="percentage",
                        help="weak target per region: lesion percentage or CT severity score 0..5")
    parser.add_argument("--mode", choices=("3d", "2d"), default="3d",
                        help="3d: volumes with five lobes; 2d: one axial slice per case with left/right lung")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 160, 160), metavar=("Z", "Y", "X"),
                        help="volume size in voxels (2d uses Y X) (default: 64 160 160)")
    parser.add_argument("--file-ending", default=".nii.gz", help="image file ending (default: %(default)s)")
    parser.add_argument("--montage", metavar="PNG", help="also write a contact sheet of some training cases")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synthetic dataset with the same id")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="cases generated in parallel")


def run(args) -> int:
    import os
    import sys
    from pathlib import Path

    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.paths import ensure_nnunet_paths
    from nnunetv2_dram.synthetic.dataset import write_weak_dataset

    folders = ensure_nnunet_paths()
    try:
        path = write_weak_dataset(folders["nnUNet_raw"], args.dataset_id, name=args.name, n_train=args.train,
                                  n_test=args.test, seed=args.seed, shape=tuple(args.shape), target=args.target,
                                  mode=args.mode, file_ending=args.file_ending, overwrite=args.overwrite,
                                  num_processes=args.num_processes)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    print(path)
    stale = [folder / path.name for folder in (Path(folders["nnUNet_preprocessed"]), Path(folders["nnUNet_results"]))
             if (folder / path.name).exists()]
    if stale:
        print(f"note: {', '.join(map(str, stale))} exist(s) from earlier data with this id; "
              f"re-run planning/preprocessing and training", file=sys.stderr)
    if args.montage:
        from nnunetv2_dram.synthetic.montage import save_dataset_montage
        png = save_dataset_montage(path, os.path.expanduser(args.montage))
        print(f"montage: {png}")
    return 0
