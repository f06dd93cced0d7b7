"""Region maps (lung lobes, our numbering) from TotalSegmentator or lungmask output, or by running one of them.

  nnunetv2_dram regions -i ts_output/CASE -o regions/CASE.nii.gz --preset totalsegmentator_v2 --ct cts/CASE.nii.gz
  nnunetv2_dram regions -i ts_output/ -o regions/ --ct cts/          (every case of a folder)
  nnunetv2_dram regions -i cts/ -o regions/ --run lungmask           (no masks yet: make them)
  nnunetv2_dram regions --list-presets
"""
from __future__ import annotations

import sys

from nnunetv2_dram.commands.shared_flags import add_device_flag, resolve_device

PRESET_NAMES = ("totalsegmentator_v2", "totalsegmentator_v1", "lungmask_ltrclobes", "identity")


def add_arguments(parser):
    parser.add_argument("-i", dest="input",
                        help="a multi-label file or a TotalSegmentator per-structure folder; or a folder of such "
                             "per-case inputs (CASE.nii.gz / CASE/); with --run: a CT file or a folder of CTs")
    parser.add_argument("-o", dest="output", help="output region map file, or output folder for many cases")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESET_NAMES, default=None,
                        help="label numbering of the tool that made the input (default: totalsegmentator_v2)")
    source.add_argument("--mapping", metavar="JSON",
                        help='custom mapping file {"source_label_or_structure_name": target_region, ...}')
    parser.add_argument("--ct", help="the CT (or folder of CTs) the maps belong to: geometry is checked against it "
                                     "and its header copied (strongly recommended)")
    parser.add_argument("--run", choices=("lungmask", "totalsegmentator"),
                        help="segment the lobes of the CT(s) given with -i with this tool (must be installed)")
    parser.add_argument("--file-ending", default=".nii.gz",
                        help="ending of the output files when -o is a folder (default .nii.gz)")
    add_device_flag(parser, "--run")
    parser.add_argument("--fast", action="store_true", help="--run totalsegmentator: its 3 mm fast model")
    parser.add_argument("--list-presets", action="store_true", help="print the presets' label tables and exit")


def _case_inputs(folder, mapping, run: bool):
    """(case id, input path) of a folder of many cases; None if `folder` is itself one per-structure folder."""
    from nnunetv2_dram.conversion.dataset_from_folder import discover_cts, discover_region_inputs
    from nnunetv2_dram.conversion.region_maps import is_per_structure_folder
    if run:
        return sorted(discover_cts(folder).items())
    if is_per_structure_folder(folder, mapping) is not None:
        return None
    return sorted(discover_region_inputs(folder).items())


def run(args) -> int:
    from pathlib import Path

    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.conversion import region_maps as rm
    from nnunetv2_dram.weak_labels.problems import WeakDatasetError

    if args.list_presets:
        for name in PRESET_NAMES:
            print(rm.preset_table(name) + "\n")
        return 0
    if not args.input or not args.output:
        raise UserError("-i INPUT and -o OUTPUT are required (or --list-presets)")
    if args.run and (args.preset or args.mapping):
        raise UserError("--run makes its own maps; --preset/--mapping apply to existing masks only")
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise UserError(f"input {source} does not exist")
    device = resolve_device(args.device, "nnunetv2_dram regions") if args.run else None

    def convert_one(inp: Path, out: Path, ct: Path | None) -> rm.RegionMapReport:
        if args.run == "lungmask":
            return rm.run_lungmask(inp, out, force_cpu=device == "cpu")
        if args.run == "totalsegmentator":
            return rm.run_totalsegmentator(inp, out, fast=args.fast, device={"cuda": "gpu"}.get(device, device))
        return rm.convert_region_map(inp, out, preset=args.preset, mapping=args.mapping, reference_ct=ct)

    try:
        mapping = rm.resolve_mapping(args.preset, args.mapping)
        cases = _case_inputs(source, mapping, bool(args.run)) if source.is_dir() else None
        if cases is None:
            ct = Path(args.ct) if args.ct else None
            if ct is not None and ct.is_dir():
                raise UserError("--ct must be a CT file when -i is a single case")
            report = convert_one(source, target, ct)
            _print_report(report)
            return 1 if report.suspicious else 0
        if not cases:
            raise UserError(f"{source} holds no case inputs (image files or per-structure folders)")
        if target.exists() and not target.is_dir():
            raise UserError(f"-o {target} must be a folder when -i is a folder of cases")
        if target.resolve() == source.resolve():
            raise UserError("-o must differ from -i: the inputs are never overwritten")
        cts = {}
        if args.ct:
            ct_root = Path(args.ct)
            if not ct_root.is_dir():
                raise UserError("--ct must be a folder of CTs when -i is a folder of cases")
            from nnunetv2_dram.conversion.dataset_from_folder import discover_cts
            cts = discover_cts(ct_root)
        failed = []
        for case, inp in cases:
            ct = inp if args.run else cts.get(case)
            if args.ct and ct is None:
                failed.append(f"{case}: no CT named {case} in {args.ct}")
                continue
            try:
                report = convert_one(inp, target / f"{case}{args.file_ending}", ct)
            except WeakDatasetError as e:
                failed.append(str(e))
                continue
            _print_report(report)
            if report.suspicious:
                failed.append(f"{case}: written, but the map looks wrong (see above)")
        for f in failed:
            print(f, file=sys.stderr)
        print(f"regions: {len(cases) - len(failed)} of {len(cases)} case(s) written to {target}")
        return 1 if failed else 0
    except (WeakDatasetError, rm.MissingDependencyError) as e:
        raise UserError(str(e)) from None


def _print_report(report) -> None:
    print(report.summary())
    for w in report.warnings:
        print(f"  {w}")
    for s in report.suspicious:
        print(f"  SUSPICIOUS: {str(s).removeprefix('WARNING: ')}")
