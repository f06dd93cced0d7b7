"""`nnunetv2_dram pipeline`: the whole job, each stage a real nnU-Net (or nnunetv2_dram) command.

weak dataset -> check -> plan/preprocess -> train the weak model -> pseudo labels -> plan/preprocess them ->
train a stock nnU-Net -> predict imagesTs (optionally restricted to the labelsTs region maps) -> evaluate where
references exist.

A shortened training is a trainer of its own name, `<Trainer>_<E>epochs_<I>its` (training/budget.py), so it
never shares a results folder with a full one.

Every stage looks at what is already on disk first, so a rerun resumes: finished stages are skipped, an
interrupted training continues with `--c`, and pseudo labels continue case by case.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

from nnunetv2_dram.pipeline.nnunet_commands import run_nnunet
from nnunetv2_dram.pipeline.quick_plans import QUICK_SUFFIX, write_quick_plans
from nnunetv2_dram.pseudo_labels.thresholds import DEFAULT_THRESHOLD
from nnunetv2_dram.training.budget import (DEFAULT_EPOCHS, DEFAULT_ITERATIONS, budget_trainer_name,
                                           parse_budget_trainer_name)

DEFAULT_PLANNER = "ExperimentPlanner"


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
    threshold: str = DEFAULT_THRESHOLD
    ignore_band: float = 0.0
    plans_identifier: str | None = None  # -p; None: the planner's own (quick: its compact copy)
    planner: str | None = None  # -pl, an nnU-Net experiment planner class; None: nnU-Net's default
    restrict_to_regions: bool = False
    log_dir: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def planner_class_name(self) -> str:
        return self.planner or DEFAULT_PLANNER

    @property
    def planner_plans(self) -> str:
        """The plans identifier the planner writes by itself (nnUNetPlans, nnUNetResEncUNetMPlans, ...)."""
        return planner_plans_identifier(self.planner_class_name)

    @property
    def plans(self) -> str:
        """The plans identifier of every stage (nnU-Net's `-p`)."""
        if self.plans_identifier:
            return self.plans_identifier
        return self.planner_plans + QUICK_SUFFIX if self.preset == "quick" else self.planner_plans

    @property
    def has_budget(self) -> bool:
        return bool(self.epochs or self.iterations or self.preset == "quick")

    def trainer_name(self, base: str) -> str:
        """The trainer class that trains `base` with this run's length: `base` itself without --epochs,
        --iterations or --preset quick, else `<base>_<E>epochs_<I>its` (E, I default to nnU-Net's 1000 and 250).
        The name decides the results folder, so a shortened training never shares one with a full training."""
        if not self.has_budget:
            return base
        return budget_trainer_name(base, self.epochs or DEFAULT_EPOCHS, self.iterations or DEFAULT_ITERATIONS)

    @property
    def final_trainer(self) -> str:
        return self.trainer_name("nnUNetTrainer")

    @property
    def training_env(self) -> dict:
        if self.preset == "quick":
            # nnU-Net's final validation predicts every training case of fold 'all': minutes on a CPU for nothing
            return {"NNUNETV2_DRAM_SKIP_FINAL_VALIDATION": 1}
        return {}


def planner_class(name: str):
    """nnU-Net's experiment planner class `name`, found the way nnUNetv2_plan_experiment -pl finds it."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                        current_module="nnunetv2.experiment_planning")
    if found is None:
        raise PipelineError(f"-pl {name}: no such nnU-Net experiment planner in nnunetv2.experiment_planning (e.g. "
                            f"ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL)")
    return found


@functools.lru_cache(maxsize=None)
def planner_plans_identifier(name: str) -> str:
    """The plans identifier planner `name` writes without -overwrite_plans_name (its `plans_name` default)."""
    import inspect
    default = inspect.signature(planner_class(name).__init__).parameters.get("plans_name")
    if default is None or not isinstance(default.default, str):
        raise PipelineError(f"-pl {name}: cannot tell which plans identifier this planner writes; give it with -p")
    return default.default


def validate_options(opts: PipelineOptions) -> None:
    """Every combination of flags that cannot work, refused before any stage runs."""
    import re
    identifier = re.compile(r"^[A-Za-z0-9_.-]+$")
    if opts.plans_identifier is not None and (not identifier.match(opts.plans_identifier)
                                              or opts.plans_identifier.endswith(".json")):
        raise PipelineError(f"-p {opts.plans_identifier!r}: a plans identifier is a name such as nnUNetPlans (the "
                            f"file nnUNet_preprocessed/DatasetXXX/<identifier>.json), without folder or .json")
    planner_plans = opts.planner_plans  # also checks that -pl names a planner
    if opts.preset == "quick" and opts.plans == planner_plans:
        raise PipelineError(f"--preset quick writes compact plans under the -p name, made from the plans of "
                            f"{opts.planner_class_name} ({planner_plans}); -p {opts.plans} would overwrite those. "
                            f"Leave -p out (default {planner_plans}{QUICK_SUFFIX}) or give another name")
    for what, n in (("--epochs", opts.epochs), ("--iterations", opts.iterations)):
        if n is not None and n < 1:
            raise PipelineError(f"{what} {n}: must be at least 1")
    if opts.has_budget and parse_budget_trainer_name(opts.trainer) is not None:
        base = parse_budget_trainer_name(opts.trainer)[0]
        raise PipelineError(f"-tr {opts.trainer} already names a training length, and --epochs/--iterations/--preset "
                            f"quick set one too; use -tr {base} with --epochs/--iterations")
    if opts.restrict_to_regions:
        restriction_inputs(opts)


def restriction_inputs(opts: PipelineOptions) -> tuple[Path, Path]:
    """(imagesTs, labelsTs) of the weak dataset for --restrict-to-regions; every test image needs its region map."""
    from nnunetv2.paths import nnUNet_raw
    src = Path(nnUNet_raw.require()) / opts.dataset
    images, regions = src / "imagesTs", src / "labelsTs"
    if not images.is_dir() or not any(images.iterdir()):
        raise PipelineError(f"--restrict-to-regions: {images} holds no test images, so there are no predictions "
                            f"to restrict")
    if not regions.is_dir():
        raise PipelineError(f"--restrict-to-regions needs the region maps of the test cases in {regions}")
    ending = json.loads((src / "dataset.json").read_text())["file_ending"]
    cases = sorted({p.name[: -len(ending) - 5] for p in images.iterdir()
                    if p.name.endswith(ending) and p.name[: -len(ending)][-5:-4] == "_"})
    missing = [c for c in cases if not (regions / f"{c}{ending}").is_file()]
    if missing:
        raise PipelineError(f"--restrict-to-regions: test case(s) {', '.join(missing)} have no region map "
                            f"(expected e.g. {regions / (missing[0] + ending)})")
    return images, regions


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
    planner = ["-pl", opts.planner] if opts.planner else []
    planner_plans = opts.planner_plans
    if opts.preset == "full":
        if opts.plans_identifier and (base / f"{opts.plans}.json").is_file():
            # plans given with -p that exist already (the user's own, or an earlier run's) are used as they are
            run_nnunet("nnUNetv2_preprocess", "-d", did, "-plans_name", opts.plans, "-c", opts.configuration,
                       "-np", np_, log_file=_log(opts, f"plan_{did}"))
            return
        rename = ["-overwrite_plans_name", opts.plans] if opts.plans != planner_plans else []
        run_nnunet("nnUNetv2_plan_and_preprocess", "-d", did, "-c", opts.configuration, "-np", np_, "-npfp", np_,
                   *planner, *rename, "--verify_dataset_integrity", env=env, log_file=_log(opts, f"plan_{did}"))
        return
    if not (base / "dataset_fingerprint.json").is_file():
        run_nnunet("nnUNetv2_extract_fingerprint", "-d", did, "-np", np_, "--verify_dataset_integrity",
                   log_file=_log(opts, f"plan_{did}"))
    if not (base / f"{planner_plans}.json").is_file():
        run_nnunet("nnUNetv2_plan_experiment", "-d", did, *planner, env=env, log_file=_log(opts, f"plan_{did}"))
    write_quick_plans(base, source=planner_plans, target=opts.plans)
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
    run_nnunet("nnUNetv2_train", *args, env=opts.training_env, log_file=_log(opts, f"train_{trainer}_{dataset}"))
    return fold_dir


def pseudo_labels(opts: PipelineOptions) -> str:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2_dram.pseudo_labels.generate import (MARKER, PseudoLabelSettings, make_pseudo_labels,
                                                      pseudo_dataset_name)
    settings = PseudoLabelSettings(dataset=opts.dataset, configuration=opts.configuration, fold=opts.fold,
                                   trainer=opts.trainer_name(opts.trainer), plans=opts.plans, crf=opts.crf,
                                   threshold=opts.threshold, ignore_band=opts.ignore_band)
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


def predict_command(opts: PipelineOptions, pseudo_dataset: str) -> str:
    """The nnUNetv2_predict command line that predicts new images with the final model as the pipeline did."""
    cmd = (f"nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {_dataset_id(pseudo_dataset)} "
           f"-c {opts.configuration} -f {opts.fold} -tr {opts.final_trainer} -p {opts.plans}")
    return cmd + (" --disable_tta" if opts.preset == "quick" else "")


def restricted_folder(predictions: Path) -> Path:
    return predictions.with_name(predictions.name + "_in_regions")


def restrict(opts: PipelineOptions, predictions: Path | None) -> Path | None:
    """--restrict-to-regions: the predictions with every voxel outside the labelsTs region map set to 0."""
    if not opts.restrict_to_regions or predictions is None:
        return None
    from nnunetv2_dram.pipeline.region_restriction import RestrictionError, restrict_predictions
    _, regions = restriction_inputs(opts)
    out = restricted_folder(predictions)
    try:
        restrict_predictions(predictions, regions, out)
    except RestrictionError as e:
        raise PipelineError(f"--restrict-to-regions: {e}") from None
    return out


def evaluate(opts: PipelineOptions, pseudo_dataset: str, predictions: Path | None,
             restricted: Path | None = None) -> dict:
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
    if restricted is not None and (src / "referenceTs").is_dir():
        results["final_model_in_regions_vs_referenceTs"] = evaluate_folders(src / "referenceTs", restricted)["mean"]
    return results


def run_pipeline(opts: PipelineOptions) -> dict:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2_dram.pseudo_labels.generate import pseudo_dataset_name
    if opts.log_dir is None:
        opts.log_dir = str(Path(nnUNet_results.require()) / pseudo_dataset_name(opts.dataset, opts.new_id)
                           / "pipeline_logs")
    validate_options(opts)
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
    weak_trainer = opts.trainer_name(opts.trainer)
    with _stage(opts, "check"):
        check_dataset(opts)
    with _stage(opts, "plan_and_preprocess_weak"):
        plan_and_preprocess(opts, opts.dataset)
    with _stage(opts, f"train_{weak_trainer}"):
        train(opts, opts.dataset, weak_trainer)
    with _stage(opts, "pseudo_labels"):
        pseudo = pseudo_labels(opts)
    with _stage(opts, "plan_and_preprocess_pseudo"):
        plan_and_preprocess(opts, pseudo)
    with _stage(opts, f"train_{opts.final_trainer}"):
        train(opts, pseudo, opts.final_trainer)
    with _stage(opts, "predict"):
        predictions = predict(opts, pseudo)
    restricted = None
    if opts.restrict_to_regions and predictions is not None:
        with _stage(opts, "restrict_to_regions"):
            restricted = restrict(opts, predictions)
    with _stage(opts, "evaluate"):
        metrics = evaluate(opts, pseudo, predictions, restricted)
    summary = {"options": {k: v for k, v in asdict(opts).items() if k != "timings"},
               "weak_trainer": weak_trainer, "plans": opts.plans,
               "pseudo_dataset": pseudo, "predictions": str(predictions) if predictions else None,
               "predictions_in_regions": str(restricted) if restricted else None,
               "final_model": str(model_folder(pseudo, opts.final_trainer, opts.plans, opts.configuration)),
               "final_trainer": opts.final_trainer, "predict_command": predict_command(opts, pseudo),
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
    if summary.get("predictions_in_regions"):
        lines.append(f"predictions of imagesTs inside the regions: {summary['predictions_in_regions']}")
    p = m.get("pseudo_labels_vs_referenceTr")
    if p:
        lines.append(f"pseudo labels vs referenceTr: IoU {p['IoU']:.3f}  Dice {p['Dice']:.3f}  "
                     f"region-% MAE {p.get('region_percent_mae', float('nan')):.2f}")
    f = m.get("final_model_vs_referenceTs")
    if f:
        lines.append(f"final nnU-Net vs referenceTs: IoU {f['IoU']:.3f}  Dice {f['Dice']:.3f}")
    r = m.get("final_model_in_regions_vs_referenceTs")
    if r:
        lines.append(f"final nnU-Net inside the regions vs referenceTs: IoU {r['IoU']:.3f}  Dice {r['Dice']:.3f}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append("predict new images with the final model:")
    if summary["final_trainer"] != "nnUNetTrainer":  # a budget name: nnU-Net finds it through the plugin's folder
        lines.append("  export nnUNet_extTrainer=$(nnunetv2_dram trainers-path)")
    lines.append(f"  {summary['predict_command']}")
    return "\n".join(lines)
