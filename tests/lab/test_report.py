"""report.py: a method's row pools its training seeds; a method equal to the base has a zero paired
difference; the table carries held-out accuracy, steps and wall time; the plot is drawn. The combined
interval: its coverage measured against the percentile bootstrap's, the seed level's t quantile, repeated
texts as one cluster, pairing by seed index, Fieller's interval of a share; provenance read from the files,
tables of files made by different code refused."""

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
        "run,loss,steps,lr,tau,gamma_pos,gamma_neg,n_tokens,layers,blocks,"
        "mean,mean_low,mean_high,delta_mean,delta_low,delta_high,"
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


# -----------------------------------------------------------------------------
# The combined interval (#40)


def one_column(values):
    return {"mean": {"counting": np.asarray(values, float)}}


def test_combined_interval_covers_where_the_percentile_bootstrap_did_not():
    """Synthetic differences whose truth is known (report.coverage, 200 experiments each): the combined
    interval holds it in at least 90% of them at 3 training seeds where the seeds, the prompts or their
    interaction dominate (measured at 96-99% with 2,000 on docs/shapes-results.md); the two-level
    percentile bootstrap it replaced does not where the seeds dominate, so this test fails on it."""
    for regime in ("seed", "prompt", "interaction"):
        assert report.coverage(report.combined_interval, 3, regime, repeats=200) >= 0.9, regime
    assert report.coverage(report.two_level_bootstrap, 3, "seed", repeats=200, draws=500) < 0.88


def test_t_quantile_and_the_closed_form_cluster_bootstrap():
    assert report.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert report.t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert report.t_quantile(10) == pytest.approx(2.228, abs=1e-3)
    assert report.t_quantile(np.inf) == pytest.approx(1.960, abs=1e-3)
    rng = np.random.default_rng(0)
    values, ids = rng.normal(0, 1, 30), np.arange(30) % 12  # 12 clusters of 2-3 prompts
    draws = report.resample_counts(12, 20000, rng)[:, ids]  # the cluster bootstrap, by Monte Carlo
    boot = (draws * values).sum(1) / draws.sum(1)
    variance, df = report.cluster_variance(values, ids)
    assert df == 11 and variance == pytest.approx(boot.var() * 12 / 11, rel=0.1)


def test_seed_variance_widens_the_interval_with_a_t_quantile():
    """Three runs whose offsets (-0.1, 0, +0.1) dominate: the interval of the difference with the base is
    the t-test's on the runs' means (2 df), far wider than the prompts alone (the runs averaged first)."""
    rng = np.random.default_rng(0)
    effect = rng.normal(0, 0.1, 40)
    arm = {s: one_column(0.6 + shift + effect + rng.normal(0, 0.01, 40)) for s, shift in enumerate((-0.1, 0, 0.1))}
    base = {"base": one_column(0.5 + effect)}
    averaged = {0: one_column(np.mean([r["mean"]["counting"] for r in arm.values()], axis=0))}
    clusters = {"counting": np.arange(40)}
    value, low, high = report.combined_interval(arm, clusters, base)["mean"]
    same, low1, high1 = report.combined_interval(averaged, clusters, base)["mean"]
    runs = [np.mean(r["mean"]["counting"]) - 0.5 - effect.mean() for r in arm.values()]
    assert value == pytest.approx(same) and high - low > 4 * (high1 - low1)
    assert high - low > 2 * 4.30 * np.std(runs, ddof=1) / np.sqrt(3)  # at least the seed level's t interval


def test_repeated_texts_are_one_cluster():
    """12 prompts that are 3 texts x 4 copies (same values) give exactly the interval of the 3 texts
    alone, wider than the 12 prompts counted as independent."""
    texts = np.array([0.2, 0.5, 0.9])
    clusters = np.repeat(np.arange(3), 4)
    arm = {0: one_column(texts[clusters])}
    copies = report.combined_interval(arm, {"counting": clusters})["mean"]
    alone = report.combined_interval({0: one_column(texts)}, {"counting": np.arange(3)})["mean"]
    assert copies == pytest.approx(alone)
    independent = report.combined_interval(arm, {"counting": np.arange(12)})["mean"]
    assert copies[2] - copies[1] > 1.5 * (independent[2] - independent[1])
    protocol = {"set": "eval", "per_prompt": {"base": {"mean": {"counting": [0.0] * 80, "colors": [0.0] * 80}}}}
    found = report.prompt_clusters(protocol)  # the eval set: 45 distinct counting texts, 15 colours
    assert len(set(found["counting"])) == 45 and len(set(found["colors"])) == 15
    with pytest.raises(SystemExit, match="counting"):
        report.prompt_clusters({"set": "dev", "per_prompt": {"base": {"mean": {"counting": [0.0] * 90}}}})


def test_pairing_by_seed_index():
    """Two arms on the same seed list are paired seed by seed: an arm against itself shifted by a
    constant differs by exactly that constant, with no width; arms on different seed lists each bring
    their seeds' spread into the interval."""
    rng = np.random.default_rng(1)
    arm = {s: one_column(rng.uniform(0, 1, 20) + s / 10) for s in range(3)}
    shifted = {s: one_column(np.asarray(g["mean"]["counting"]) - 0.05) for s, g in arm.items()}
    clusters = {"counting": np.arange(20)}
    assert report.combined_interval(arm, clusters, shifted)["mean"] == pytest.approx((0.05, 0.05, 0.05))
    other_seeds = {s + 3: g for s, g in shifted.items()}
    value, low, high = report.combined_interval(arm, clusters, other_seeds)["mean"]
    assert value == pytest.approx(0.05) and high - low > 0.05


def test_fieller_interval_of_a_share():
    """The share (arm - base) / (whole - base): its point is the ratio, its interval holds it, widens as
    the denominator's interval nears 0, and is unbounded once that interval holds 0."""
    rng = np.random.default_rng(2)
    effect = rng.normal(0, 0.1, 40)
    clusters = {"counting": np.arange(40)}
    base = {"base": one_column(0.5 + effect)}

    def share(gain):
        whole = {s: one_column(0.5 + gain + effect + rng.normal(0, 0.05, 40)) for s in range(3)}
        arm = {s + 3: one_column(0.5 + gain / 2 + effect + rng.normal(0, 0.05, 40)) for s in range(3)}
        parts = [report.difference_parts(a, base, "mean", clusters, False) for a in (arm, whole)]
        return parts[0][0] / parts[1][0], report.ratio_interval(*parts)

    point, (value, low, high) = share(0.2)
    assert value == pytest.approx(point) and low < value < high and np.isfinite(high)
    assert high - low < share(0.05)[1][2] - share(0.05)[1][1]
    assert share(0.0)[1][1:] == (-np.inf, np.inf)


# -----------------------------------------------------------------------------
# Provenance (#33)


def test_files_of_different_commits_are_refused_unless_allowed(protocol, tmp_path):
    path, per_prompt = protocol
    data = json.load(open(path))
    for commit, arm in (("abc1234", "one"), ("def5678", "two")):
        names = [n for n in per_prompt if "agsm" in n]
        part = {**data, "commit": commit, "per_prompt": {k: per_prompt[k] for k in ["base", *names]}}
        (tmp_path / f"dev-arms-{arm}.json").write_text(json.dumps(part))
    files = [str(tmp_path / "dev-arms-one.json"), str(tmp_path / "dev-arms-two.json")]
    with pytest.raises(SystemExit, match="different code .*allow-mixed-commits"):
        report.main(["--arms", *files, "--reference", "one"])
    table, _ = report.arms_table(files, "one", allow_mixed=True)
    assert "| one (a) |" in table and "| two (b) |" in table and "(a) abc1234; (b) def5678" in table
    data["dirty"], data["commit"] = True, "abc1234"
    assert report.code_version(data, path) == "abc1234 with uncommitted changes"


def test_the_committed_files_carry_their_provenance():
    """Every protocol file under docs/ either records a clean commit or says in its "provenance" field
    that it is not reproducible from one, and the report's label is that field; pairing the #25 batch
    (VAE posterior sampled) with the #26 arms (its mean) is refused."""
    import glob

    docs = os.path.join(report.REPO, "docs")
    for path in glob.glob(os.path.join(docs, "**", "*.json"), recursive=True):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "per_prompt" in data:
            clean = data.get("commit") and data.get("dirty") is False
            assert clean or data.get("provenance", "").startswith("not reproducible from a commit"), path
            assert report.code_version(data, path) == data.get("provenance") or clean
    assert report.code_version({}, "elsewhere.json") == "no commit recorded"
    files = [
        os.path.join(docs, "results", "dev-layers2.json"),
        os.path.join(docs, "results", "arms", "dev-arms-tokens-softrepa.json"),
    ]
    with pytest.raises(SystemExit, match="different code"):
        report.arms_table(files, "layers2")
