"""A table whose numbers all look like CT severity scores needs --target: `weak-labels` and `convert` stop with
a message naming the table instead of reading scores as percentages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import lobe_phantom as lp
from nnunetv2_dram.cli import main as cli_main
from nnunetv2_dram.conversion.weak_label_table import read_weak_label_table
from nnunetv2_dram.weak_labels.problems import WeakDatasetError

SCORES = "case,LUL,LLL,RUL,RML,RLL\nc1,2,0,1,,3\nc2,0,0,0,0,1\n"


def _table(tmp_path: Path, text: str, name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_weak_labels_refuses_a_score_like_table_without_target(tmp_path, capsys):
    table = _table(tmp_path, SCORES)
    out = tmp_path / "weak_labels.json"
    assert cli_main(["weak-labels", "-i", str(table), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(table) in err and "CT severity scores" in err and "--target ctss" in err
    assert "--target percentage" in err and not out.exists()
    assert cli_main(["weak-labels", "-i", str(table), "-o", str(out), "--target", "percentage"]) == 0
    written = json.loads(out.read_text())
    assert written["target"] == "percentage" and written["cases"]["c1"]["1"] == 2
    assert cli_main(["weak-labels", "-i", str(table), "-o", str(out), "--target", "ctss", "--overwrite"]) == 0
    assert json.loads(out.read_text())["target"] == "ctss"


@pytest.mark.parametrize("text", [
    "case,LUL,LLL\nc1,12.5,0\nc2,3,4\n",  # a value above 5
    "case,LUL,LLL\nc1,2.0,0\nc2,3,4\n",  # written with a decimal point: a measured percentage
    "case,LUL,LLL\nc1,2 %,0\nc2,3,4\n",  # written with a percent sign
    "case,LUL,LLL\nc1,0,0\nc2,0,0\n",  # all zero: 0 % and CTSS 0 mean the same
])
def test_tables_that_cannot_be_scores_read_as_percentages_without_target(tmp_path, text):
    assert read_weak_label_table(_table(tmp_path, text), target=None).json["target"] == "percentage"


def test_api_default_stays_percentage(tmp_path):
    # Python callers that pass nothing keep the documented default; only target=None (the CLI's) refuses
    assert read_weak_label_table(_table(tmp_path, SCORES)).json["target"] == "percentage"
    with pytest.raises(WeakDatasetError, match="scores.csv"):
        read_weak_label_table(_table(tmp_path, SCORES), target=None)


def test_convert_refuses_a_score_like_table_without_target(tmp_path, nnunet_env, capsys):
    cts, regions = tmp_path / "cts", tmp_path / "regions"
    for i, case in enumerate(("c1", "c2")):
        lp.write_ct(cts / f"{case}.nii.gz", seed=i)
        lp.write(lp.totalseg_v2_multilabel(), regions / f"{case}.nii.gz")
    table = _table(tmp_path, SCORES)
    args = ["convert", "--images", str(cts), "--regions", str(regions), "--table", str(table), "-d", "903",
            "--name", "Scores"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert str(table) in err and "--target ctss" in err
    assert not list(nnunet_env["nnUNet_raw"].iterdir()), "nothing written"
    assert cli_main(args + ["--target", "percentage"]) == 0
    weak = json.loads((nnunet_env["nnUNet_raw"] / "Dataset903_Scores" / "weak_labels.json").read_text())
    assert weak["target"] == "percentage" and weak["cases"]["c1"] == {"1": 2, "2": 0, "3": 1, "5": 3}
