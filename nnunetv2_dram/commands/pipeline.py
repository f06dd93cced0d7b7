"""The whole job in one command: plan and preprocess the weak dataset, train the dRAM trainer, make pseudo
labels, plan/train a stock nnU-Net on them, predict imagesTs and evaluate where references exist.
Rerunning the same command resumes where it stopped. At the end it prints the nnUNetv2_predict command for the
final model."""

from nnunetv2_dram.commands.shared_flags import (add_device_flag, add_fold_flag, add_threshold_flag, check_threshold,
                                                 resolve_device)


def add_arguments(p):
    p.add_argument("-d", required=True, help="weak dataset (id or name)")
    p.add_argument("-o", required=True, type=int, help="id for the pseudo-label dataset (and the final model)")
    p.add_argument("-c", default="3d_fullres", help="nnU-Net configuration for every stage (3d_fullres or 2d)")
    p.add_argument("-tr", default="DRAMTrainer", help="weak trainer: DRAMTrainer, DRAMTrainerNoRefine, CAMTrainer")
    add_fold_flag(p, "fold of every training stage")
    p.add_argument("-pl", dest="planner", default=None, metavar="PLANNER",
                   help="nnU-Net experiment planner class of both planning stages, as for nnUNetv2_plan_and_preprocess "
                        "-pl (e.g. nnUNetPlannerResEncM, whose plans identifier is nnUNetResEncUNetMPlans; default: "
                        "nnU-Net's ExperimentPlanner, nnUNetPlans)")
    p.add_argument("-p", dest="plans_identifier", default=None, metavar="PLANS",
                   help="plans identifier of every stage (training, pseudo labels, prediction). Default: the "
                        "planner's own (nnUNetPlans; nnUNetResEncUNetMPlans with -pl nnUNetPlannerResEncM); with "
                        "--preset quick '<planner's plans>_quick'. --preset full: the planner writes its plans "
                        "under this name (-overwrite_plans_name), and plans that exist under it already are used "
                        "as they are. --preset quick: the compact plans are (re)written under this name, made from "
                        "the planner's plans, so it must differ from the planner's own identifier")
    p.add_argument("--preset", choices=("full", "quick"), default="full",
                   help="full: nnU-Net's own planning; quick: a compact network/patch copy of the planner's plans "
                        "(see -p) that runs on a CPU in minutes")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every training stage. With --epochs, --iterations or --preset quick every stage "
                        "trains <trainer>_<E>epochs_<I>its (E: --epochs, else 1000; I: --iterations, else 250), "
                        "which has its own results folder; without them the trainers' own length")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per epoch of every training stage (see --epochs)")
    p.add_argument("--predictions", default=None, help="where to write the predictions of imagesTs")
    p.add_argument("--restrict-to-regions", action="store_true",
                   help="also write the predictions of imagesTs with every voxel outside the labelsTs region map "
                        "set to background (folder <predictions>_in_regions), and evaluate those")
    p.add_argument("--crf", choices=("none", "dense"), default="dense")
    add_threshold_flag(p, "pseudo-label threshold: calibrated, midpoint, otsu or a number")
    p.add_argument("--ignore-band", type=float, default=0.0)
    add_device_flag(p, "training, pseudo labels and prediction")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing and exports")


def options_from_args(args, dataset: str):
    """PipelineOptions from parsed flags; `args.device` must be resolved already (resolve_device)."""
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions
    return PipelineOptions(dataset=dataset, new_id=args.o, configuration=args.c, trainer=args.tr,
                           preset=args.preset, epochs=args.epochs, iterations=args.iterations,
                           predictions=args.predictions, device=args.device, fold=str(args.f),
                           num_processes=args.np, crf=args.crf, threshold=str(args.threshold),
                           ignore_band=args.ignore_band, plans_identifier=getattr(args, "plans_identifier", None),
                           planner=getattr(args, "planner", None),
                           restrict_to_regions=getattr(args, "restrict_to_regions", False))


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.paths import ensure_nnunet_paths
    ensure_nnunet_paths()
    from nnunetv2_dram.pipeline.nnunet_commands import CommandFailed
    from nnunetv2_dram.pipeline.pipeline import PipelineError, format_summary, run_pipeline
    from nnunetv2_dram.pseudo_labels.generate import PseudoLabelError
    from nnunetv2_dram.weak_labels.checker import resolve_raw_dataset_dir
    check_threshold(args.threshold)
    args.device = resolve_device(args.device, "nnunetv2_dram pipeline")
    dataset = resolve_raw_dataset_dir(args.d).name
    try:
        summary = run_pipeline(options_from_args(args, dataset))
    except (PipelineError, PseudoLabelError, CommandFailed) as e:
        raise UserError(str(e))
    print("\n" + format_summary(summary))
    return 0
