"""The whole job in one command: plan and preprocess the weak dataset, train the dRAM trainer, make pseudo
labels, plan/train a stock nnU-Net on them, predict imagesTs and evaluate where references exist.
Rerunning the same command resumes where it stopped."""


def add_arguments(p):
    p.add_argument("-d", required=True, help="weak dataset (id or name)")
    p.add_argument("-o", required=True, type=int, help="id for the pseudo-label dataset (and the final model)")
    p.add_argument("-c", default="3d_fullres", help="nnU-Net configuration for every stage (3d_fullres or 2d)")
    p.add_argument("-tr", default="DRAMTrainer", help="weak trainer: DRAMTrainer, DRAMTrainerNoRefine, CAMTrainer")
    p.add_argument("-f", default="all", help="fold for every training stage (default: all cases)")
    p.add_argument("--preset", choices=("full", "quick"), default="full",
                   help="full: nnU-Net's own planning; quick: a compact network/patch (plans nnUNetPlans_quick) "
                        "that runs on a CPU in minutes")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every training stage")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch of every training stage")
    p.add_argument("--predictions", default=None, help="where to write the predictions of imagesTs")
    p.add_argument("--crf", choices=("none", "dense"), default="dense")
    p.add_argument("--threshold", default="calibrated", help="pseudo-label threshold: calibrated, otsu or a number")
    p.add_argument("--ignore-band", type=float, default=0.0)
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing and exports")


def options_from_args(args, dataset: str):
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions
    return PipelineOptions(dataset=dataset, new_id=args.o, configuration=args.c, trainer=args.tr,
                           preset=args.preset, epochs=args.epochs, iterations=args.iterations,
                           predictions=args.predictions, device=args.device, fold=str(args.f),
                           num_processes=args.np, crf=args.crf, threshold=str(args.threshold),
                           ignore_band=args.ignore_band)


def run(args) -> int:
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.paths import ensure_nnunet_paths
    ensure_nnunet_paths()
    import torch
    from nnunetv2_dram.pipeline.nnunet_commands import CommandFailed
    from nnunetv2_dram.pipeline.pipeline import PipelineError, format_summary, run_pipeline
    from nnunetv2_dram.pseudo_labels.generate import PseudoLabelError
    from nnunetv2_dram.weak_labels.checker import resolve_raw_dataset_dir
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda but no CUDA device is available; use -device cpu")
    dataset = resolve_raw_dataset_dir(args.d).name
    try:
        summary = run_pipeline(options_from_args(args, dataset))
    except (PipelineError, PseudoLabelError, CommandFailed) as e:
        raise UserError(str(e))
    print("\n" + format_summary(summary))
    return 0
