"""The embedded default: make a synthetic chest-CT weak dataset, run the whole pipeline on it with DRAMTrainer
and with the CAMTrainer baseline (compact `quick` preset, so it runs on a CPU), and print the comparison.
Everything lives under -o DIR (its own nnUNet_raw/_preprocessed/_results); rerunning resumes."""

from nnunetv2_dram.commands.shared_flags import add_device_flag, resolve_device

DEMO_ID, DRAM_ID, CAM_ID = 980, 981, 982


def add_arguments(p):
    p.add_argument("-o", default="nnunetv2_dram_demo", help="demo workspace folder (default: ./nnunetv2_dram_demo)")
    add_device_flag(p, "every stage")
    p.add_argument("--train", type=int, default=16, help="synthetic training cases")
    p.add_argument("--test", type=int, default=6, help="synthetic test cases")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--epochs", type=int, default=12, help="epochs of every training stage")
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch of every training stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cam", action="store_true", help="skip the CAM baseline")
    p.add_argument("-np", type=int, default=2)


def run(args) -> int:
    import os
    import time
    from pathlib import Path

    args.device = resolve_device(args.device, "nnunetv2_dram demo")
    root = Path(args.o).resolve()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / name)  # the demo keeps to its own folders
    os.environ.setdefault("nnUNet_def_n_proc", str(args.np))
    from nnunetv2_dram.paths import ensure_ext_trainer_path
    ensure_ext_trainer_path()
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.commands.pipeline import options_from_args
    from nnunetv2_dram.io_utils import atomic_write_json
    from nnunetv2_dram.pipeline.pipeline import PipelineError, run_pipeline
    from nnunetv2_dram.synthetic.dataset import dataset_folder_name, write_weak_dataset

    t0 = time.time()
    dataset = dataset_folder_name(DEMO_ID, "SynthChest")
    if not (root / "nnUNet_raw" / dataset / "dataset.json").is_file():
        print(f"writing synthetic chest CTs: {args.train} training + {args.test} test cases of {tuple(args.shape)}")
        write_weak_dataset(root / "nnUNet_raw", DEMO_ID, name="SynthChest", n_train=args.train, n_test=args.test,
                           seed=args.seed, shape=tuple(args.shape), num_processes=args.np,
                           montage_dir=root / "montage")
    runs = [("DRAMTrainer", DRAM_ID)] + ([] if args.no_cam else [("CAMTrainer", CAM_ID)])
    results = {}
    for trainer, new_id in runs:
        ns = _pipeline_args(args, trainer, new_id)
        try:
            results[trainer] = run_pipeline(options_from_args(ns, dataset))
        except PipelineError as e:
            raise UserError(str(e))
    table = comparison_table(results)
    summary = {"workspace": str(root), "minutes": round((time.time() - t0) / 60, 1),
               "results": {k: {"metrics": v["metrics"], "seconds": v["seconds"], "final_model": v["final_model"],
                               "predictions": v["predictions"]} for k, v in results.items()}}
    from nnunetv2_dram.evaluation.metrics import to_json_compatible
    atomic_write_json(root / "demo_summary.json", to_json_compatible(summary))
    print("\n" + table)
    print(f"\ntotal {summary['minutes']} min; summary: {root / 'demo_summary.json'}")
    dram = results["DRAMTrainer"]
    print(f"use the final model like any nnU-Net model:\n  nnUNet_raw={root / 'nnUNet_raw'} "
          f"nnUNet_preprocessed={root / 'nnUNet_preprocessed'} nnUNet_results={root / 'nnUNet_results'} "
          f"nnUNet_extTrainer=$(nnunetv2_dram trainers-path) {dram['predict_command']}")
    return 0


def _pipeline_args(args, trainer, new_id):
    import argparse
    from nnunetv2_dram.pseudo_labels.thresholds import DEFAULT_THRESHOLD
    return argparse.Namespace(o=new_id, c="3d_fullres", tr=trainer, f="all", preset="quick", epochs=args.epochs,
                              iterations=args.iterations, predictions=None, crf="dense", threshold=DEFAULT_THRESHOLD,
                              ignore_band=0.0, device=args.device, np=args.np, plans_identifier=None, planner=None,
                              restrict_to_regions=False)


def comparison_table(results: dict) -> str:
    rows = [("method", "pseudo IoU (train)", "pseudo Dice (train)", "final IoU (test)", "final Dice (test)")]
    for trainer, summary in results.items():
        m = summary["metrics"]
        p = m.get("pseudo_labels_vs_referenceTr", {})
        f = m.get("final_model_vs_referenceTs", {})
        rows.append((trainer, *(f"{d.get(k, float('nan')):.3f}" for d, k in
                                ((p, "IoU"), (p, "Dice"), (f, "IoU"), (f, "Dice")))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
