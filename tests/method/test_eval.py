# Tests for eval.py: run folders scored through the command line (the shapes checker, each run's
# tokens in the classifier column), GenEval and PIE-Bench layouts, the table with +- over seeds, and
# --plot. The metrics themselves: tests/method/test_metrics.py; the classifier: tests/lab/test_classifier.py.
import json
import math
import os

import numpy as np
import pytest
import torch
from tiny_metric_models import BLUE

import benchmarks
import eval as ev
import hooks
import metrics
import shapes
import softtokens
from shapes import classifier

torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# Written-out maths

# -----------------------------------------------------------------------------
# CLIP / PickScore and DINO through their loaders, on tiny models saved to tmp_path

# -----------------------------------------------------------------------------
# Run folders: shapes checker, table with +- over seeds, caching, GenEval, PIE-Bench, --plot


def write_run(folder, specs, images, variant=None, seeds=None):
    """A folder as sample.py writes it: images/NNNNN.png and records.jsonl."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "records.jsonl"), "a") as f:
        start = len(os.listdir(os.path.join(folder, "images")))
        for k, (spec, image) in enumerate(zip(specs, images)):
            name = os.path.join("images", f"{start + k:05d}.png")
            Image.fromarray(image).save(os.path.join(folder, name))
            record = dict(
                image=name, prompt=shapes.caption(spec), seed=(seeds or [0] * len(specs))[k], spec=spec, tokens=None
            )
            if variant:
                record["variant"] = variant
            f.write(json.dumps(record) + "\n")


def eval_specs(per_category=2):
    return [r["spec"] for r in ev.classifier_records(per_category)]


def rendered(specs):
    return [shapes.render(s, 32, i) for i, s in enumerate(specs)]


def blanked(specs, categories):
    """Rendered images, black for the given categories (the checker must fail them)."""
    return [
        np.zeros((32, 32, 3), np.uint8) if s["category"] in categories else im for s, im in zip(specs, rendered(specs))
    ]


def test_table_groups_seeds_and_variants(tmp_path, capsys):
    specs = eval_specs()
    write_run(tmp_path / "base-seed0", specs, rendered(specs))
    write_run(tmp_path / "base-seed1", specs, blanked(specs, shapes.CATEGORIES[:3]))
    both = tmp_path / "tok"  # sample.py --compare, two seeds in one folder
    write_run(both, specs, blanked(specs, ["counting"]), variant="plain")
    write_run(
        both,
        specs * 2,
        rendered(specs) + blanked(specs, ["position"]),
        variant="tokens",
        seeds=[0] * len(specs) + [1] * len(specs),
    )
    out = tmp_path / "results.json"
    groups = ev.main(
        ["--runs", str(tmp_path / "base-seed0"), str(tmp_path / "base-seed1"), str(both), "--json", str(out)]
    )
    assert list(groups) == ["base", "tok[plain]", "tok[tokens]"]
    base = groups["base"]["metrics"]["shapes_mean"]
    assert groups["base"]["n"] == 2 and base["values"] == [1.0, 0.5]
    assert base["mean"] == pytest.approx(0.75) and base["std"] == pytest.approx(math.sqrt(0.125))
    assert groups["base"]["metrics"]["shapes_counting"]["values"] == [1.0, 0.0]
    assert groups["tok[plain]"]["n"] == 1 and groups["tok[plain]"]["metrics"]["shapes_counting"]["mean"] == 0.0
    tokens = groups["tok[tokens]"]["metrics"]
    assert tokens["shapes_position"]["values"] == [1.0, 0.0] and tokens["shapes_single_object"]["std"] == 0.0
    table = capsys.readouterr().out
    assert "| base | 2 | " in table and "0.75 ± 0.35" in table and "| tok[plain] | 1 |" in table
    assert json.loads(out.read_text())["groups"]["base"]["metrics"]["shapes_mean"]["mean"] == pytest.approx(0.75)
    # The cache: a second call does not read the images again
    for png in (tmp_path / "base-seed1" / "images").iterdir():
        png.write_bytes(b"")
    again = ev.main(["--runs", str(tmp_path / "base-seed1"), "--json", str(out)])
    assert again["base"]["metrics"]["shapes_mean"]["values"] == [0.5]
    # ... but one with other settings does: the (now unreadable) images are read again
    from PIL import UnidentifiedImageError

    with pytest.raises((UnidentifiedImageError, SystemExit)):
        ev.main(["--runs", str(tmp_path / "base-seed1"), "--json", str(out), "--classifier-n", "3"])


def test_geneval_layout_and_results(tmp_path):
    specs = eval_specs(1)[:3]
    run = tmp_path / "run"
    write_run(run, specs * 2, rendered(specs) * 2, seeds=[0] * 3 + [1] * 3)
    metadata = [{"tag": s["category"], "include": [], "prompt": shapes.caption(s)} for s in specs]
    prompts_file = tmp_path / "evaluation_metadata.jsonl"
    prompts_file.write_text("".join(json.dumps(m) + "\n" for m in metadata))
    ev.main(["--to-geneval", str(run), "--geneval-prompts", str(prompts_file)])
    for n, meta in enumerate(metadata):
        folder = run / "geneval" / f"{n:05d}"
        assert [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()] == [meta]
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
        assert np.array_equal(metrics.load_image(folder / "samples" / "0001.png"), rendered(specs)[n])
    results = [("single_object", True), ("single_object", False), ("two_object", True), ("counting", False)]
    (run / "geneval_results.jsonl").write_text(
        "".join(json.dumps({"filename": "x.png", "tag": t, "correct": c, "reason": ""}) + "\n" for t, c in results)
    )
    scores = ev.read_geneval(run / "geneval_results.jsonl")
    assert scores == {
        "geneval_single_object": 0.5,
        "geneval_two_object": 1.0,
        "geneval_counting": 0.0,
        "geneval_mean": pytest.approx(0.5),
    }
    groups = ev.main(["--runs", str(run), "--json", str(tmp_path / "e.json")])
    assert groups["run"]["metrics"]["geneval_mean"]["values"] == [pytest.approx(0.5)]  # once, not per seed
    assert groups["run"]["n"] == 2
    with pytest.raises(SystemExit, match="no image for GenEval prompt"):
        ev.write_geneval({}, metadata, str(tmp_path / "empty"))


def test_pie_bench_background_metrics(tmp_path, tiny_clip_dir):
    from PIL import Image

    pie, run, changed = tmp_path / "pie", tmp_path / "edits", tmp_path / "edits-bad"
    rng = np.random.default_rng(0)
    # edit region: rows and columns 128..383 of PIE's 512 x 512 mask grid -> 32..95 on our 128 px images
    rle = [v for row in range(128, 384) for v in (row * 512 + 128, 256)]
    mapping = {}
    for i in range(2):
        path = f"0_random/{i:012d}.jpg"
        mapping[f"{i:012d}"] = dict(
            image_path=path,
            original_prompt="a [red] cat",
            editing_prompt="a [blue] cat",
            editing_type_id="0",
            mask=rle,
        )
        source = rng.integers(0, 256, (128, 128, 3)).astype(np.uint8)
        os.makedirs(pie / "annotation_images" / "0_random", exist_ok=True)
        Image.fromarray(source).save(pie / "annotation_images" / path, quality=100)
        source = metrics.load_image(pie / "annotation_images" / path)  # what the jpeg decodes to
        edited = source.copy()
        edited[40:90, 40:90] = 255 - edited[40:90, 40:90]  # inside the edit mask only
        os.makedirs(run / "0_random", exist_ok=True)
        Image.fromarray(edited).save(run / "0_random" / f"{i:012d}.png")
        edited[:8] = 0  # now the background changes too
        os.makedirs(changed / "annotation_images" / "0_random", exist_ok=True)
        Image.fromarray(edited).save(changed / "annotation_images" / "0_random" / f"{i:012d}.png")
    (pie / "mapping_file.json").write_text(json.dumps(mapping))
    clip = metrics.load_clip("clip", "tiny-clip", weights=str(tiny_clip_dir.parent))
    items = benchmarks.items(str(pie), str(run))
    assert [it[4] for it in items] == ["a blue cat", "a blue cat"]
    clean = benchmarks.edit_metrics(items, clip=clip)
    assert clean["bg_psnr"] == math.inf and clean["bg_ssim"] == pytest.approx(1.0)
    assert 0 <= clean["clip_edited"] <= 100 and 0 <= clean["clip_whole"] <= 100
    bad = benchmarks.edit_metrics(benchmarks.items(str(pie), str(changed)))
    assert set(bad) == {"bg_psnr", "bg_ssim"} and bad["bg_ssim"] < 1.0
    # written out: PSNR of the two images times the background mask, over all pixels
    src = metrics.load_image(items[0][1]) / 255.0
    out = metrics.load_image(changed / "annotation_images" / "0_random" / "000000000000.png") / 255.0
    background = np.ones((128, 128, 1))
    background[32:96, 32:96] = 0
    background[0, :] = background[-1, :] = background[:, 0] = background[:, -1] = 0
    mse = (((src - out) * background) ** 2).mean()
    one = benchmarks.edit_metrics(benchmarks.items(str(pie), str(changed))[:1])
    assert one["bg_psnr"] == pytest.approx(10 * math.log10(1 / mse))


def test_plot_from_synthetic_training_csv(tmp_path):
    runs = []
    for name, slope in (("softrepa", 0.01), ("agsm", 0.02)):
        run = tmp_path / name
        specs = eval_specs(1)
        write_run(run, specs, rendered(specs))
        rows = ["step,loss,score_counting,score_mean"]  # the columns train.py writes
        rows += [f"{s},{1 / (s + 1):.3f},,{slope * s:.3f}" for s in range(0, 50, 10)]
        rows.insert(3, "15,0.5,,")  # a step without validation
        (run / "log.csv").write_text("\n".join(rows) + "\n")
        runs.append(str(run))
    steps, values = ev.read_curve(runs[0], "score_mean")
    assert steps == [0, 10, 20, 30, 40] and values == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert ev.read_curve(runs[0], "val_missing") == ([], [])
    png = tmp_path / "figure.png"
    groups = ev.main(
        [
            "--runs",
            *runs,
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(png),
            "--tradeoff",
            "shapes_counting",
            "shapes_mean",
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert ev.plot(groups, runs, str(tmp_path / "p.png"), ("shapes_counting", "shapes_mean")) == (2, 2)
    assert ev.plot(groups, runs, str(tmp_path / "q.png"), ("fid", "imagereward"), "nothing") == (0, 0)


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--runs .*: no such file or folder; expected a folder written by sample.py"):
        ev.main(["--runs", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="need --ref"):
        ev.main(["--runs", str(tmp_path), "--metrics", "fid"])
    with pytest.raises(SystemExit, match="needs --bench"):
        ev.main(["--runs", str(tmp_path), "--metrics", "edit"])
    with pytest.raises(SystemExit, match="unknown model"):
        ev.main(["--runs", str(tmp_path), "--metrics", "classifier", "--model", "sd4"])


# -----------------------------------------------------------------------------
# Held-out diffusion classifier


def test_classifier_column_uses_each_runs_tokens(tmp_path, tiny_sd3, monkeypatch):
    tokens = softtokens.make_tokens(tiny_sd3, "softrepa")
    softtokens.save(str(tmp_path / "tokens.safetensors"), tokens)
    run = tmp_path / "run"
    specs = eval_specs(1)
    write_run(run, specs, rendered(specs), variant="plain")
    write_run(run, specs, rendered(specs), variant="tokens")
    lines = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for r in lines:
        r["tokens"] = str(tmp_path / "tokens.safetensors") if r["variant"] == "tokens" else None
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    attached = []
    real_attach = hooks.attach
    monkeypatch.setattr(hooks, "attach", lambda *a, **k: attached.append(real_attach(*a, **k)) or attached[-1])
    monkeypatch.setattr(ev.backbones, "load", lambda *a, **kw: tiny_sd3)
    groups = ev.main(
        [
            "--runs",
            str(run),
            "--metrics",
            "classifier",
            "--classifier-n",
            "1",
            "--candidates",
            "3",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert len(attached) == 1 and not attached[0]._handles  # tokens for one row, then removed
    # each column is the accuracy of its own tokens, computed here directly
    records = ev.classifier_records(1)
    handle = ev.token_handle(tiny_sd3, {"tokens": str(tmp_path / "tokens.safetensors"), "variant": "tokens"})
    try:
        with_tokens = classifier.classifier_accuracy(tiny_sd3, records, 3, handle=handle)
    finally:
        handle.remove()
    assert groups["run[plain]"]["metrics"]["classifier"]["mean"] == classifier.classifier_accuracy(
        tiny_sd3, records, 3
    )
    assert groups["run[tokens]"]["metrics"]["classifier"]["mean"] == with_tokens


def test_edit_run_through_the_command_line(tmp_path, tiny_clip_dir, capsys):
    """PIE-Bench layout -> eval.py --metrics edit clip, with the tiny CLIP standing in for ViT-L/14 in
    --weights and no DINO / LPIPS there (skipped with a message)."""
    import shutil

    from PIL import Image

    pie, run, weights = tmp_path / "pie", tmp_path / "pnp", tmp_path / "weights"
    shutil.copytree(tiny_clip_dir, weights / "clip-vit-large-patch14")
    source = np.zeros((64, 64, 3), np.uint8)
    source[..., 0] = 255  # red; the edit makes it blue
    os.makedirs(pie / "annotation_images" / "1_change", exist_ok=True)
    Image.fromarray(source).save(pie / "annotation_images" / "1_change" / "a.png")
    os.makedirs(run / "annotation_images" / "1_change", exist_ok=True)
    Image.fromarray(BLUE.repeat(2, 0).repeat(2, 1)[:64, :64]).save(run / "annotation_images" / "1_change" / "a.png")
    (pie / "mapping_file.json").write_text(
        json.dumps(
            {
                "a": dict(
                    image_path="1_change/a.png", original_prompt="[red]", editing_prompt="[blue]", mask=[0, 512 * 512]
                )
            }
        )
    )
    groups = ev.main(
        [
            "--runs",
            str(run),
            "--metrics",
            "edit",
            "clip",
            "--pie",
            str(pie),
            "--weights",
            str(weights),
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    metrics = groups["pnp"]["metrics"]
    assert metrics["clip"]["mean"] == pytest.approx(100, abs=1e-3)  # the edited image is "blue"
    assert metrics["clip_whole"]["mean"] == pytest.approx(100, abs=1e-3)
    assert "bg_psnr" not in metrics  # the whole image is the edit region
    out = capsys.readouterr().out
    assert "structure_distance: skipped" in out and "lpips: skipped" in out
