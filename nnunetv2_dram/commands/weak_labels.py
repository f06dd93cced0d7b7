"""weak_labels.json from a CSV/TSV table: one row per case, one column per region (lobes by default).

  nnunetv2_dram weak-labels -i report_scores.csv -o weak_labels.json --target ctss
  nnunetv2_dram weak-labels -i t.tsv -o weak_labels.json --preset none --column "oben links=1" --column LLL=2
  nnunetv2_dram weak-labels -i t.csv -d 901          (validate against Dataset901 and write its weak_labels.json)
"""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("-i", dest="input", required=True, help="the table (CSV or TSV; delimiter is detected)")
    parser.add_argument("-o", dest="output",
                        help="weak_labels.json to write (default with -d: the dataset's weak_labels.json)")
    parser.add_argument("--target", choices=("percentage", "ctss"), default=None,
                        help="what plain numbers in the table mean: lesion percent of the region, or CT severity "
                             "score 0..5 (intervals like 5-25 are always percent). Default: percentage, but a table "
                             "whose numbers are all integers 0..5 stops with an error until --target says which")
    parser.add_argument("--case-column", help="column holding the case ids (default: detected, e.g. 'case', 'ID')")
    parser.add_argument("--preset", choices=("lobes", "none"), default="lobes",
                        help="how column names map to regions (lobes: LUL/LLL/RUL/RML/RLL, 'left upper lobe', ...)")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=LABEL",
                        help="map a column to a region explicitly (label value or name, e.g. LUL=1); repeatable")
    parser.add_argument("-d", dest="dataset", help="dataset ID/name/folder to validate the table against")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from pathlib import Path

    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.conversion.weak_label_table import read_weak_label_table, validate_against_dataset
    from nnunetv2_dram.io_utils import atomic_write_json
    from nnunetv2_dram.weak_labels.problems import WeakDatasetError

    dataset_dir = None
    if args.dataset:
        from nnunetv2_dram.weak_labels.checker import resolve_raw_dataset_dir
        dataset_dir = resolve_raw_dataset_dir(args.dataset)
    if not args.output and dataset_dir is None:
        raise UserError("give -o OUTPUT.json (or -d DATASET to write its weak_labels.json)")
    output = Path(args.output) if args.output else dataset_dir / "weak_labels.json"
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    try:
        table = read_weak_label_table(args.input, target=args.target, case_column=args.case_column,
                                      preset=args.preset, columns=args.column)
    except WeakDatasetError as e:
        raise UserError(str(e)) from None
    print(table.report.summary())
    for w in table.report.warnings:
        print(f"  {w}")
    for raw, safe in table.report.renamed.items():
        print(f"  case id {raw!r} -> {safe!r}")
    if dataset_dir is not None:
        problems = validate_against_dataset(table.weak_labels, dataset_dir)
        for p in problems:
            print(p)
        if any(p.severity == "error" for p in problems):
            print(f"weak-labels FAILED against {dataset_dir}: nothing written")
            return 1
    atomic_write_json(output, table.json)
    print(f"wrote {output} ({len(table.json['cases'])} case(s), target {table.json['target']})")
    return 0
