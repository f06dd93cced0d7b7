"""`nnunetv2_dram pipeline`: the whole job, each stage a real nnU-Net (or nnunetv2_dram) command.

weak dataset -> check -> plan/preprocess -> train the weak model -> pseudo labels -> plan/preprocess them ->
train a stock nnU-Net -> predict imagesTs -> evaluate where references exist.

Every stage looks at what is already on disk first, so a rerun resumes: finished stages are skipped, an
interrupted training continues with `--c`, and pseudo labels continue case by case.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

from nnunetv2_dram.pipeline.nnunet_commands import run_nnunet
from nnunetv2_dram.pipeline.quick_plans import QUICK_PLANS, write_quick_plans


class PipelineError(Exception):
    pass


@dataclass
class PipelineOptions:
    dataset: str  # weak dataset name, DatasetXXX_Name
    new_id: int
    configuration: str = "3d_fullres"
    trainer: str = "DRAMTrainer"
    preset: str = "full"  # full | quick
    epochs: int | None = None
    iterations: int | None = None
    predictions: str | None = None
    device: str = "cuda"
    fold: str = "all"
    num_processes: int = 2
    crf: str = "dense"
    threshold: str = "calibrated"
    ignore_band: float = 0.0
    log_dir: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def plans(self) -> str:
        return QUICK_PLANS if self.preset == "quick" else "nnUNetPlans"

    @property
    def final_trainer(self) -> str:
        return "nnUNetTrainerBudget" if (self.epochs or self.iterations or self.preset == "quick") else "nnUNetTrainer"

    @property
    def budget_env(self) -> dict:
        env = {}
        if self.epochs:
            env["NNUNETV2_DRAM_EPOCHS"] = self.epochs
        if self.iterations:
            env["NNUNETV2_DRAM_ITERATIONS"] = self.iterations
            env["NNUNETV2_DRAM_VAL_ITERATIONS"] = max(2, self.iterations // 5)
        if self.preset == "quick":
            # nnU-Net's final validation predicts every training case of fold 'all': minutes on a CPU for nothing
            env["NNUNETV2_DRAM_SKIP_FINAL_VALIDATION"] = 1
        return env


def _dataset_id(name: str) -> int:
    return int(name[7:10])


def _stage(opts: PipelineOptions, name: str):
    class _Timer:
        def __enter__(self_):
            print(f"\n=== {name} ===", flush=True)
            self_.t = time.time()

        def __exit__(self_, *exc):
            opts.timings[name] = round(time.time() - self_.t, 1)
            return False
    return _Timer()


def _log(opts: PipelineOptions, name: str):
    return Path(opts.log_dir) / f"{name}.log" if opts.log_dir else None


# ------------------------------------------------------------------------------------------------ stages
def check_dataset(opts: PipelineOptions) -> None:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2_dram.weak_labels.checker import check_weak_dataset
    problems = check_weak_dataset(Path(nnUNet_raw.require()) / opts.dataset)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PipelineError(f"{opts.dataset} is not a valid weak dataset:\n" + "\n".join(f"  {p}" for p in errors))


def _preprocessed_complete(dataset: str, plans: str, configuration: str) -> bool:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    base = Path(nnUNet_preprocessed.require()) / dataset
    plans_file = base / f"{plans}.json"
    if not plans_file.is_file():
        return False
    cfg = json.loads(plans_file.read_text())["configurations"].get(configuration)
    if cfg is None:
        raise PipelineError(f"configuration {configuration!r} is not in {plans_file}")
    ident = cfg.get("data_identifier")
    if ident is None:  # an inheriting configuration
        return False
    n = json.loads((Path(nnUNet_raw.require()) / dataset / "dataset.json").read_text())["numTraining"]
    folder = base / ident
    return folder.is_dir() and len(list(folder.glob("*.pkl"))) >= n


def plan_and_preprocess(opts: PipelineOptions, dataset: str) -> None:
    from nnunetv2.paths import nnUNet_preprocessed
    did, np_ = _dataset_id(dataset), opts.num_processes
    if _preprocessed_complete(dataset, opts.plans, opts.configuration):
        print(f"{dataset}: preprocessed data for {opts.plans}/{opts.configuration} found, skipping")
        return
    base = Path(nnUNet_preprocessed.require()) / dataset
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (a valid setting for
    # training: augmentation in the main process)
    env = {"nnUNet_n_proc_DA": "1"} if os.environ.get("nnUNet_n_proc_DA") == "0" else None
    if opts.preset == "full":
        run_nnunet("nnUNetv2_plan_and_preprocess", "-d", did, "-c", opts.configuration, "-np", np_,
                   "--verify_dataset_integrity", env=env, log_file=_log(opts, f"plan_{did}"))
        return
    if not (base / "dataset_fingerprint.json").is_file():
        run_nnunet("nnUNetv2_extract_fingerprint", "-d", did, "-np", np_, "--verify_dataset_integrity",
                   log_file=_log(opts, f"plan_{did}"))
    if not (base / "nnUNetPlans.json").is_file():
        run_nnunet("nnUNetv2_plan_experiment", "-d", did, env=env, log_file=_log(opts, f"plan_{did}"))
    write_quick_plans(base)
    run_nnunet("nnUNetv2_preprocess", "-d", did, "-plans_name", opts.plans, "-c", opts.configuration,
               "-np", np_, log_file=_log(opts, f"plan_{did}"))


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    return Path(nnUNet_results.require()) / dataset / f"{trainer}__{plans}__{configuration}"


def train(opts: PipelineOptions, dataset: str, trainer: str) -> Path:
    fold_dir = model_folder(dataset, trainer, opts.plans, opts.configuration) / f"fold_{opts.fold}"
    if (fold_dir / "checkpoint_final.pth").is_file():
        print(f"{trainer} on {dataset}: checkpoint_final.pth found, skipping")
        return fold_dir
    resume = any((fold_dir / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth"))
    args = [_dataset_id(dataset), opts.configuration, opts.fold, "-tr", trainer, "-p", opts.plans,
            "-device", opts.device] + (["--c"] if resume else [])
    run_nnunet("nnUNetv2_train", *args, env=opts.budget_env, log_file=_log(opts, f"train_{trainer}_{dataset}"))
    return fold_dir


def pseudo_labels(opts: PipelineOptions) -> str:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2_dram.pseudo_labels.generate import (MARKER, PseudoLabelSettings, make_pseudo_labels,
                                                      pseudo_dataset_name)
    settings = PseudoLabelSettings(dataset=opts.dataset, configuration=opts.configuration, fold=opts.fold,
                                   trainer=opts.trainer, plans=opts.plans, crf=opts.crf, threshold=opts.threshold,
                                   ignore_band=opts.ignore_band)
    name = pseudo_dataset_name(opts.dataset, opts.new_id)
    out = Path(nnUNet_raw.require()) / name
    if (out / "dataset.json").is_file() and not (out / MARKER).exists():
        made_with = json.loads((out / "dataset.json").read_text()).get("nnunetv2_dram")
        if made_with == settings.provenance():
            print(f"{name}: complete pseudo-label dataset found, skipping")
            return name
        raise PipelineError(f"{out} exists but was made with other settings ({made_with}); choose another -o or "
                            f"remove it")
    make_pseudo_labels(opts.dataset, opts.new_id, settings, device=opts.device, num_processes=opts.num_processes,
                       qc_dir=str(Path(opts.log_dir) / "qc") if opts.log_dir else None)
    return name


def predict(opts: PipelineOptions, pseudo_dataset: str) -> Path | None:
    from nnunetv2.paths import nnUNet_raw, nnUNet_results
    images = Path(nnUNet_raw.require()) / opts.dataset / "imagesTs"
    if not images.is_dir() or not any(images.iterdir()):
        print("no imagesTs: nothing to predict")
        return None
    out = Path(opts.predictions) if opts.predictions else Path(nnUNet_results.require()) / pseudo_dataset / \
        f"predictions_imagesTs_{opts.final_trainer}__{opts.plans}__{opts.configuration}"
    args = ["-i", images, "-o", out, "-d", _dataset_id(pseudo_dataset), "-c", opts.configuration, "-f", opts.fold,
            "-tr", opts.final_trainer, "-p", opts.plans, "-device", opts.device,
            "-npp", opts.num_processes, "-nps", opts.num_processes]
    if opts.preset == "quick":
        args.append("--disable_tta")
    run_nnunet("nnUNetv2_predict", *args, log_file=_log(opts, "predict"))
    return out


def evaluate(opts: PipelineOptions, pseudo_dataset: str, predictions: Path | None) -> dict:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2_dram.evaluation.metrics import evaluate_folders
    raw = Path(nnUNet_raw.require())
    src = raw / opts.dataset
    results = {}
    if (src / "referenceTr").is_dir():
        results["pseudo_labels_vs_referenceTr"] = evaluate_folders(
            src / "referenceTr", raw / pseudo_dataset / "labelsTr",
            ignore_label=2 if opts.ignore_band > 0 else None, regions_dir=src / "labelsTr",
            weak_labels=src / "weak_labels.json")["mean"]
    if predictions is not None and (src / "referenceTs").is_dir():
        results["final_model_vs_referenceTs"] = evaluate_folders(src / "referenceTs", predictions)["mean"]
    return results


def run_pipeline(opts: PipelineOptions) -> dict:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2_dram.pseudo_labels.generate import pseudo_dataset_name
    if opts.log_dir is None:
        opts.log_dir = str(Path(nnUNet_results.require()) / pseudo_dataset_name(opts.dataset, opts.new_id)
                           / "pipeline_logs")
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
    with _stage(opts, "check"):
        check_dataset(opts)
    with _stage(opts, "plan_and_preprocess_weak"):
        plan_and_preprocess(opts, opts.dataset)
    with _stage(opts, f"train_{opts.trainer}"):
        train(opts, opts.dataset, opts.trainer)
    with _stage(opts, "pseudo_labels"):
        pseudo = pseudo_labels(opts)
    with _stage(opts, "plan_and_preprocess_pseudo"):
        plan_and_preprocess(opts, pseudo)
    with _stage(opts, f"train_{opts.final_trainer}"):
        train(opts, pseudo, opts.final_trainer)
    with _stage(opts, "predict"):
        predictions = predict(opts, pseudo)
    with _stage(opts, "evaluate"):
        metrics = evaluate(opts, pseudo, predictions)
    summary = {"options": {k: v for k, v in asdict(opts).items() if k != "timings"},
               "pseudo_dataset": pseudo, "predictions": str(predictions) if predictions else None,
               "final_model": str(model_folder(pseudo, opts.final_trainer, opts.plans, opts.configuration)),
               "metrics": metrics, "seconds": opts.timings}
    from nnunetv2_dram.io_utils import atomic_write_json
    from nnunetv2_dram.evaluation.metrics import to_json_compatible
    atomic_write_json(Path(opts.log_dir) / "pipeline_summary.json", to_json_compatible(summary))
    return summary


def format_summary(summary: dict) -> str:
    m = summary["metrics"]
    lines = [f"pseudo-label dataset: {summary['pseudo_dataset']}", f"final model: {summary['final_model']}"]
    if summary["predictions"]:
        lines.append(f"predictions of imagesTs: {summary['predictions']}")
    p = m.get("pseudo_labels_vs_referenceTr")
    if p:
        lines.append(f"pseudo labels vs referenceTr: IoU {p['IoU']:.3f}  Dice {p['Dice']:.3f}  "
                     f"region-% MAE {p.get('region_percent_mae', float('nan')):.2f}")
    f = m.get("final_model_vs_referenceTs")
    if f:
        lines.append(f"final nnU-Net vs referenceTs: IoU {f['IoU']:.3f}  Dice {f['Dice']:.3f}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
