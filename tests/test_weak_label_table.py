"""weak_labels.json from CSV/TSV spreadsheet exports."""
from __future__ import annotations

import json

import pytest

from nnunetv2_dram.conversion.weak_label_table import (match_lobe_column, parse_cell, read_weak_label_table,
                                                       sanitize_case_id, validate_against_dataset)
from nnunetv2_dram.weak_labels.format import load_weak_labels, save_weak_labels
from nnunetv2_dram.weak_labels.problems import WeakDatasetError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_percentages_with_common_lobe_spellings(tmp_path):
    path = write(tmp_path, "report.csv",
                 "Patient ID,Left upper lobe %,LLL,right_upper_lobe,RML (%),Lobe RLL,age\n"
                 "p1,12.5,0,40,5-25,0,61\n"
                 "p2,,3.25 %,100,0,\"[50, 75]\",70\n")
    table = read_weak_label_table(path, target="percentage")
    assert table.report.delimiter == ","
    assert table.report.case_column == "Patient ID"
    assert table.report.columns == {"Left upper lobe %": 1, "LLL": 2, "right_upper_lobe": 3, "RML (%)": 4,
                                    "Lobe RLL": 5}
    assert table.report.ignored_columns == ["age"]
    assert table.json["target"] == "percentage"
    assert table.json["cases"] == {"p1": {"1": 12.5, "2": 0, "3": 40, "4": [5.0, 25.0], "5": 0},
                                   "p2": {"2": 3.25, "3": 100, "4": 0, "5": [50.0, 75.0]}}
    weak = table.weak_labels
    assert (weak.cases["p1"][4].low, weak.cases["p1"][4].high) == (5.0, 25.0)
    assert 1 not in weak.cases["p2"]  # empty cell: no supervision
    assert table.report.empty_cells["Left upper lobe %"] == 1


def test_tsv_ctss_and_round_trip_through_the_format(tmp_path):
    path = write(tmp_path, "scores.tsv",
                 "case\tLUL\tLLL\tRUL\tRML\tRLL\n"
                 "a\t0\t1\t2\t3\t4\n"
                 "b\t5\tNA\t0\t0-0\t1\n")
    table = read_weak_label_table(path, target="ctss")
    assert table.report.delimiter == "\t"
    assert table.json["cases"]["a"] == {"1": 0, "2": 1, "3": 2, "4": 3, "5": 4}
    assert table.json["cases"]["b"] == {"1": 5, "3": 0, "4": [0.0, 0.0], "5": 1}
    out = tmp_path / "weak_labels.json"
    save_weak_labels(table.json, out)
    weak = load_weak_labels(out)
    assert weak.target == "ctss"
    assert (weak.cases["a"][4].low, weak.cases["a"][4].high) == (25.0, 50.0)  # CTSS 3 band
    assert (weak.cases["b"][4].low, weak.cases["b"][4].high) == (0.0, 0.0)  # an explicit interval, not CTSS 0
    assert (weak.cases["b"][1].low, weak.cases["b"][1].high) == (75.0, 100.0)


def test_semicolon_export_with_decimal_comma(tmp_path):
    path = write(tmp_path, "excel.csv", "ID;LUL;LLL\nx;12,5;3\n")
    table = read_weak_label_table(path)
    assert table.report.delimiter == ";"
    assert table.json["cases"]["x"] == {"1": 12.5, "2": 3}


def test_bad_value_error_names_row_case_column_and_value(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL,RUL\nc1,10,20\nc2,abc,20\nc3,10,120\n")
    with pytest.raises(WeakDatasetError) as e:
        read_weak_label_table(path)
    message = str(e.value)
    assert "row 3, column 'LUL'" in message and "'abc'" in message and "case 'c2'" in message
    assert "row 4, column 'RUL'" in message and "120" in message and "case 'c3'" in message
    assert str(path) in message


def test_ctss_table_refuses_non_scores(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL,RUL\nc1,2.5,1\nc2,6,12%\n")
    with pytest.raises(WeakDatasetError) as e:
        read_weak_label_table(path, target="ctss")
    message = str(e.value)
    assert "'2.5' must be an integer 0..5" in message and "'6'" in message and "--target percentage" in message


def test_unknown_columns_are_ignored_with_a_warning_and_no_region_column_is_an_error(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL,comment,total ctss\nc1,3,fine,3\n")
    table = read_weak_label_table(path)
    assert table.report.ignored_columns == ["comment", "total ctss"]
    assert any("comment" in str(w) for w in table.report.warnings)
    path = write(tmp_path, "u.csv", "case,foo,bar\nc1,3,4\n")
    with pytest.raises(WeakDatasetError, match="no column maps to a region"):
        read_weak_label_table(path)


def test_explicit_column_flags(tmp_path):
    path = write(tmp_path, "t.csv", "MRN,oben links,unten links,LUL volume ml\nm1,10,20,900\n")
    table = read_weak_label_table(path, case_column="MRN", preset="none",
                                  columns=["oben links=1", "unten links=left_lower_lobe"])
    assert table.json["cases"] == {"m1": {"1": 10, "2": 20}}
    # with the lobes preset, the explicit flag wins over the preset's guess ("LUL volume ml" -> 1)
    table = read_weak_label_table(path, case_column="MRN", columns=["oben links=1"])
    assert table.report.columns == {"oben links": 1}
    with pytest.raises(WeakDatasetError, match="no column 'missing'"):
        read_weak_label_table(path, columns=["missing=1"])
    with pytest.raises(WeakDatasetError, match="NAME=LABEL"):
        read_weak_label_table(path, columns=["LUL"])
    with pytest.raises(WeakDatasetError, match="not a region"):
        read_weak_label_table(path, columns=["oben links=7"])


def test_two_columns_for_one_region_is_an_error(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL %,LUL score\nc1,10,2\n")
    with pytest.raises(WeakDatasetError, match="all map to region 1"):
        read_weak_label_table(path)


def test_case_ids_are_sanitised_and_duplicates_refused(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL\nPatient 01/scan,10\nok-2,5\n")
    table = read_weak_label_table(path)
    assert set(table.json["cases"]) == {"Patient_01_scan", "ok-2"}
    assert table.report.renamed == {"Patient 01/scan": "Patient_01_scan"}
    path = write(tmp_path, "d.csv", "case,LUL\nPatient 01,10\nPatient_01,5\n")
    with pytest.raises(WeakDatasetError, match="row 3: case appears again"):
        read_weak_label_table(path)


def test_fractions_and_ctss_like_percentages_warn(tmp_path):
    path = write(tmp_path, "t.csv", "case,LUL,LLL\nc1,0.1,0.5\n")
    assert any("fractions" in str(w) for w in read_weak_label_table(path).report.warnings)
    path = write(tmp_path, "s.csv", "case,LUL,LLL,RUL\nc1,0,1,2\nc2,3,4,5\n")
    assert any("--target ctss" in str(w) for w in read_weak_label_table(path).report.warnings)


def test_column_and_cell_parsing_units():
    assert [match_lobe_column(h) for h in ("lul", "CTSS_RML", "Right Lower Lobe", "LeftUpperLobe",
                                           "right lung", "left middle lobe")] == [1, 4, 5, 1, None, None]
    assert parse_cell("5 \u2013 25", "percentage") == ([5.0, 25.0], None)
    assert parse_cell("30-20", "percentage")[1] == "interval '30-20' has low > high"
    assert "ambiguous" in parse_cell("5,25", "percentage")[1]
    assert parse_cell("n/a", "ctss") == (None, None)
    assert sanitize_case_id(" ../a b ") == "a_b"
    with pytest.raises(ValueError):
        sanitize_case_id("///")


def test_validate_against_dataset(tmp_path):
    ds = tmp_path / "Dataset001_X"
    (ds / "labelsTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left_upper_lobe": 1,
                                                            "left_lower_lobe": 2}, "file_ending": ".nii.gz"}))
    for case in ("c1", "c2"):
        (ds / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    path = write(tmp_path, "t.csv", "case,LUL,RUL\nc1,10,3\nc9,1,\n")
    problems = [str(p) for p in validate_against_dataset(read_weak_label_table(path).weak_labels, ds)]
    assert any("case 'c1' region 3" in p for p in problems)  # region not in dataset.json
    assert any("case 'c9'" in p and "not in" in p for p in problems)  # unknown case
    assert any("case 'c2'" in p and "no row" in p for p in problems)  # training case without entry
