"""sweep.py: one flag changed at a time around the defaults, trained by train.py, scored by one
eval.py --protocol call, one CSV row per run with its settings and its paired difference; finished
runs are skipped on a second call."""

import csv
import os

import pytest

from shapes import sweep


def test_planned_runs_vary_one_flag_at_a_time():
    args = sweep.parse_args(
        ["--model", "tiny-sd3", "--loss", "softrepa", "agsm", "--vary", "tau=0.3,1", "--vary", "n-tokens=8"]
    )
    runs = sweep.planned_runs(args)
    assert [name for name, _, _ in runs] == [
        "softrepa-default",
        "softrepa-tau0.3",
        "softrepa-tau1",
        "softrepa-n-tokens8",
        "agsm-default",
        "agsm-tau0.3",
        "agsm-tau1",
        "agsm-n-tokens8",
    ]
    assert runs[2] == ("softrepa-tau1", "softrepa", ["--tau", "1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "sd3"], "tiny-*"),
        (["--model", "tiny-sd3", "--vary", "tau"], "FLAG=V1,V2"),
    ],
)
def test_bad_sweeps_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(argv)
    assert message in capsys.readouterr().err


def test_sweep_writes_one_row_per_run_and_skips_finished_runs(tmp_path):
    argv = [
        "--model",
        "tiny-sd3",
        "--loss",
        "dsm",
        "--steps",
        "2",
        "--vary",
        "lr=0.01",
        "--n-per-category",
        "1",
        "--val-n",
        "1",
        "--out",
        str(tmp_path),
    ]
    sweep.main(argv)
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["base", "dsm-default", "dsm-lr0.01"]
    assert float(rows[1]["lr"]) == pytest.approx(1e-3) and float(rows[2]["lr"]) == pytest.approx(1e-2)
    for row in rows[1:]:
        assert row["steps"] == "2" and row["loss"] == "dsm"
        assert float(row["delta_low"]) <= float(row["delta_mean"]) <= float(row["delta_high"])
        assert 0 <= float(row["mean"]) <= 1 and row["heldout_acc"] != ""
    stamp = os.path.getmtime(tmp_path / "dsm-default" / "tokens.safetensors")
    args = sweep.parse_args(argv)
    assert sweep.train(args, "dsm-default", "dsm", []) is None  # finished: not trained again
    assert os.path.getmtime(tmp_path / "dsm-default" / "tokens.safetensors") == stamp
