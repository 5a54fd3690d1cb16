"""report.py: a method's row pools its training seeds prompt by prompt; a method equal to the base has
a zero paired difference; the table carries held-out accuracy, steps and wall time; the plot is drawn."""

import json
import os

import numpy as np
import pytest

from shapes import checker, report

PROMPTS = 6  # per category


def fake_groups(rng, shift=0.0):
    values = {c: np.clip(rng.uniform(0, 1, PROMPTS) + shift, 0, 1) for c in checker.CATEGORIES}
    groups = {c: {c: v.tolist()} for c, v in values.items()}
    groups["mean"] = {c: v.tolist() for c, v in values.items()}
    groups["overcount_counting"] = {"counting": rng.uniform(0, 1, PROMPTS).tolist()}
    return groups


def write_run(folder, seed, heldout):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"steps": 20}, f)
    with open(os.path.join(folder, "wall_s"), "w") as f:
        f.write("120\n")
    with open(os.path.join(folder, "log.csv"), "w") as f:
        f.write("step,loss,score_mean,heldout_acc,token_cos,output_change\n")
        f.write(f"0,,0.5,0.9,1,0.01\n1,0.3,,,,\n10,0.2,0.55,{heldout},0.9,0.02\n20,0.1,0.6,{heldout},0.8,0.03\n")


@pytest.fixture
def protocol(tmp_path):
    rng = np.random.default_rng(0)
    base = fake_groups(rng)
    per_prompt = {"base": base}
    for loss, shift in (("dsm", 0.0), ("softrepa", 0.0), ("agsm", 0.1)):
        for seed in range(3):
            folder = str(tmp_path / f"tiny-sd3-{loss}-seed{seed}")
            write_run(folder, seed, heldout=0.95)
            name = f"tokens {folder}/tokens.safetensors"
            per_prompt[name] = (
                base if loss in ("dsm", "softrepa") else fake_groups(np.random.default_rng(seed + 1), shift)
            )
    results = {name: checker.ordered(checker.bootstrap_interval(g)) for name, g in per_prompt.items()}
    path = tmp_path / "protocol.json"
    with open(path, "w") as f:
        json.dump({"model": "tiny-sd3", "set": "eval", "results": results, "per_prompt": per_prompt}, f)
    return str(path), per_prompt


def test_rows_pool_training_seeds_and_pair_with_the_base(protocol, tmp_path):
    path, per_prompt = protocol
    numbers = report.main(
        [
            "--model",
            "tiny-sd3",
            "--json",
            path,
            "--plot",
            str(tmp_path / "d.png"),
            "--markdown",
            str(tmp_path / "t.md"),
        ]
    )["tiny-sd3"]
    assert numbers["dsm"]["delta"]["mean"] == pytest.approx((0.0, 0.0, 0.0))  # the base itself, 3 times
    agsm = [n for n in per_prompt if "agsm" in n]
    expected = np.mean([np.mean([np.mean(per_prompt[n]["mean"][c]) for n in agsm]) for c in checker.CATEGORIES])
    assert numbers["agsm"]["scores"]["mean"][0] == pytest.approx(expected)
    assert len(numbers["agsm"]["seed_means"]) == 3 and numbers["agsm"]["accuracy"] == pytest.approx(0.95)
    table = open(tmp_path / "t.md").read()
    for column, value in numbers["agsm"]["delta"].items():  # SoftREPA here is the base
        assert numbers["agsm"]["delta_softrepa"][column] == pytest.approx(value)
    assert (
        "| base |" in table
        and "Δ AGSM − base" in table
        and "Δ AGSM − SoftREPA" in table
        and "2.0, 2.0, 2.0 min |" in table
    )
    assert os.path.getsize(tmp_path / "d.png") > 1000


def test_old_protocol_files_stop_with_one_line(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"results": {}}))
    with pytest.raises(SystemExit, match="per-prompt"):
        report.main(["--model", "tiny-sd3", "--json", str(path)])
    with pytest.raises(SystemExit):
        report.main(["--model", "tiny-sd3", "tiny-sd1.5", "--json", str(path)])


def test_sweep_csv_becomes_a_table(tmp_path):
    folder = tmp_path / "sweep-tiny-sd3"
    folder.mkdir()
    (folder / "sweep.csv").write_text(
        "run,loss,steps,lr,tau,gamma_pos,gamma_neg,n_tokens,layers,blocks,mean,mean_low,mean_high,delta_mean,delta_low,delta_high,"
        "overcount_counting,heldout_acc,token_cos,output_change\n"
        "base,,,,,,,,,,0.7,0.66,0.74,,,,0.2,,,\n"
        "softrepa-tau1,softrepa,2000,0.001,1.0,,,4,2,,0.72,0.68,0.76,+0.02,-0.01,+0.05,0.25,0.979,0.1,0.04\n"
    )
    table = report.sweep_table(str(folder / "sweep.csv")).splitlines()
    assert table[0].startswith("| sweep-tiny-sd3, dev |") and len(table) == 4
    assert (
        "| softrepa-tau1 | 2000 | 0.001 | 1.0 |  | 4 | 2  | 0.720 [0.680, 0.760] | +0.020 [-0.010, +0.050] |"
        in table[3]
    )


def test_two_files_of_one_model_merge(protocol, tmp_path):
    path, per_prompt = protocol
    data = json.load(open(path))
    names = [n for n in per_prompt if "agsm" in n]
    second = {
        "model": "tiny-sd3",
        "set": "eval",
        "per_prompt": {"base": per_prompt["base"]},
        "results": {"base": data["results"]["base"]},
    }
    for n in names:  # move AGSM's runs into a second file
        second["per_prompt"][n] = data["per_prompt"].pop(n)
        second["results"][n] = data["results"].pop(n)
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = report.main(
        ["--model", "tiny-sd3", "tiny-sd3", "--json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    )
    whole = report.main(["--model", "tiny-sd3", "--json", path])
    assert merged["tiny-sd3"]["agsm"]["scores"] == whole["tiny-sd3"]["agsm"]["scores"]
    second["per_prompt"]["base"] = per_prompt[names[0]]  # another base
    (tmp_path / "b.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit, match="same prompts"):
        report.main(["--model", "tiny-sd3", "tiny-sd3", "--json", str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_plot_from_run_folders_groups_them_by_model_and_loss(protocol, tmp_path):
    folders = [str(tmp_path / f"tiny-sd3-{loss}-seed{seed}") for loss in ("dsm", "agsm") for seed in range(3)]
    grouped = report.runs_in_folders(folders[:3] + [folders[3] + "/"] + folders[4:])  # a trailing slash is fine
    assert [model for model, _ in grouped] == ["tiny-sd3"]
    assert list(grouped[0][1]) == ["dsm", "agsm"] and [s for s, _, _ in grouped[0][1]["agsm"]] == [0, 1, 2]
    report.main(["--plot", str(tmp_path / "runs.png"), "--plot-runs", *folders])
    assert os.path.getsize(tmp_path / "runs.png") > 1000
    with pytest.raises(SystemExit):  # not a run folder
        report.main(["--plot", str(tmp_path / "x.png"), "--plot-runs", str(tmp_path)])
