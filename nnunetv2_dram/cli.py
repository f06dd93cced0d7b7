"""`nnunetv2_dram` console script: a thin argparse front over nnunetv2_dram.commands.*.

Each command module keeps its top-level imports light and defines `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "check": ("nnunetv2_dram.commands.check", "validate a weak dataset and the set-up"),
    "trainers-path": ("nnunetv2_dram.commands.trainers_path", "print the folder to export as nnUNet_extTrainer"),
    "generate": ("nnunetv2_dram.commands.generate", "write a synthetic chest-CT weak dataset"),
    "pseudolabels": ("nnunetv2_dram.commands.pseudolabels", "pseudo lesion labels from a trained dRAM/CAM model"),
    "pipeline": ("nnunetv2_dram.commands.pipeline", "the whole job: weak dataset -> final nnU-Net -> predictions"),
    "evaluate": ("nnunetv2_dram.commands.evaluate", "IoU/Dice (and region-%% error) of predictions"),
    "demo": ("nnunetv2_dram.commands.demo", "synthetic chest CTs through the whole pipeline, with a comparison"),
    "regions": ("nnunetv2_dram.commands.regions", "region maps from TotalSegmentator/lungmask lobe masks"),
    "weak-labels": ("nnunetv2_dram.commands.weak_labels", "weak_labels.json from a CSV/TSV table"),
    "convert": ("nnunetv2_dram.commands.convert", "CTs + region maps + table -> a weak nnU-Net dataset"),
    "restrict": ("nnunetv2_dram.commands.restrict", "predictions with every voxel outside the regions set to 0"),
}


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2_dram import __version__
    parser = argparse.ArgumentParser(prog="nnunetv2_dram", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        print(f"nnunetv2_dram {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run as a script, this file is `__main__`, whose UserError is not the one the commands raise
    from nnunetv2_dram.cli import main as _main
    sys.exit(_main())
