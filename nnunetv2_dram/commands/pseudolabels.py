"""Run a trained dRAM/CAM model over the training cases and write DatasetNEW_ID_<Name>Pseudo: a standard
nnU-Net raw dataset (same images, pseudo lesion labels) for nnUNetv2_plan_and_preprocess / nnUNetv2_train."""

from nnunetv2_dram.commands.shared_flags import (add_device_flag, add_fold_flag, add_threshold_flag, check_threshold,
                                                 resolve_device)


def add_arguments(p):
    p.add_argument("-d", required=True, help="source weak dataset (id or name)")
    p.add_argument("-c", default="3d_fullres", help="configuration the weak model was trained with")
    add_fold_flag(p, "fold of the weak model")
    p.add_argument("-tr", default="DRAMTrainer", help="trainer of the weak model")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of the weak model")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("-o", required=True, type=int, help="id of the new pseudo-label dataset")
    p.add_argument("--crf", choices=("none", "dense"), default="dense", help="dense CRF refinement on the CT")
    p.add_argument("--crf-backend", choices=("auto", "pydensecrf", "torch"), default="auto",
                   help="auto: torch CRF on a GPU, else pydensecrf if installed, else torch on the CPU")
    add_threshold_flag(p, "'midpoint' (the middle of each region's target interval sets its lesion volume; default), "
                          "'calibrated' (the map at 0.5 where it fits the interval, else its nearest bound), 'otsu', "
                          "or a number")
    p.add_argument("--ignore-band", type=float, default=0.0,
                   help="mark voxels within this probability of their region's threshold as 'ignore' (label 2)")
    p.add_argument("--map", dest="map_kind", choices=("final", "dram", "refined"), default="final",
                   help="which map of a DRAMTrainer model (final = refined when the model has refinement)")
    add_device_flag(p, "the model and the torch CRF")
    p.add_argument("-np", type=int, default=2, help="worker processes for CRF, thresholding and writing")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases over this many runs (GPUs/machines)")
    p.add_argument("-part_id", type=int, default=0, help="which part this run does (0-based)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pseudo-label dataset")
    p.add_argument("--qc", default=None, help="folder for one QC PNG per case")


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.paths import ensure_nnunet_paths
    ensure_nnunet_paths()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2_dram.pseudo_labels.generate import PseudoLabelError, PseudoLabelSettings, make_pseudo_labels
    device = resolve_device(args.device, "nnunetv2_dram pseudolabels")
    check_threshold(args.threshold)
    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e))
    settings = PseudoLabelSettings(dataset=dataset, configuration=args.c, fold=str(args.f), trainer=args.tr,
                                   plans=args.p, checkpoint=args.chk, crf=args.crf, crf_backend=args.crf_backend,
                                   threshold=str(args.threshold), ignore_band=args.ignore_band,
                                   map_kind=args.map_kind)
    try:
        make_pseudo_labels(dataset, args.o, settings, device=device, num_processes=args.np,
                           num_parts=args.num_parts, part_id=args.part_id, overwrite=args.overwrite,
                           qc_dir=args.qc)
    except PseudoLabelError as e:
        raise UserError(str(e))
    return 0
