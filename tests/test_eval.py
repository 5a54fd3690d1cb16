# Tests for eval.py: the written-out metric maths against closed forms, the metric models' loading and
# scoring code on tiny random models saved to a temporary folder (same from_pretrained path as the
# hub), the shapes checker and the diffusion classifier on known cases, GenEval and PIE-Bench layouts,
# the table with +- over seeds, and --plot. CPU, offline.
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as ev
import hooks
import models
import shapes
import softtokens
import checker
import classifier
import metrics

torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# Written-out maths

def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_is_the_shift():
    a = np.random.default_rng(0).normal(size=(400, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    assert abs(metrics.fid_from_features(a, a)) < 1e-8
    # Same covariance, means 1 apart in each of 8 dims: d^2 = |mu1 - mu2|^2 = 8
    assert metrics.fid_from_features(a, a + 1.0) == pytest.approx(8.0, abs=1e-6)
    assert metrics.fid_from_features(a, 2 * a) > 1.0


def test_frechet_distance_closed_forms():
    # Diagonal (commuting) covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 = 1 + 1 + 1
    assert metrics.frechet_distance([0, 1], np.diag([1.0, 4.0]), [1, 1], np.diag([4.0, 9.0])) == pytest.approx(3.0)
    # Non-commuting 2x2 covariances against the written-out 2x2 formula
    # tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for a 2x2 matrix A with non-negative eigenvalues
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])
    prod = s1 @ s2
    cross = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * cross
    assert metrics.frechet_distance([0.5, 0], s1, [0, 0], s2) == pytest.approx(expected, abs=1e-9)


def test_psnr_and_ssim_ideal_values_and_references():
    x = np.random.default_rng(0).uniform(size=(24, 24, 3))
    assert metrics.psnr(x, x) == math.inf
    assert metrics.psnr(x, x + 0.1) == pytest.approx(20.0)               # MSE 0.01 with range 1
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    # Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    const = lambda v: np.full((16, 16, 3), v)  # noqa: E731
    assert metrics.ssim(const(a), const(b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    noisy = np.clip(x + np.random.default_rng(1).normal(scale=0.2, size=x.shape), 0, 1)
    assert metrics.ssim(x, noisy) < 0.95
    # An 11 x 11 image has one window: SSIM from the Gaussian-weighted moments, written out
    p, q = x[:11, :11, :1], noisy[:11, :11, :1]
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g)[..., None] / np.outer(g, g).sum()
    mp, mq = (w * p).sum(), (w * q).sum()
    vp, vq, cov = (w * p * p).sum() - mp ** 2, (w * q * q).sum() - mq ** 2, (w * p * q).sum() - mp * mq
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
    assert metrics.ssim(p, q) == pytest.approx(expected, rel=1e-9)


def test_pie_mask_rle_decodes_like_pie_bench():
    mask = metrics.mask_decode([7, 2, 14, 3, 100, 5], shape=(6, 6))      # pairs running off the end are cut
    expected = np.ones((6, 6), np.float32)                          # the border is always "edited"
    expected[1:5, 1:5] = 0
    expected.flat[[7, 8, 14, 15, 16]] = 1
    assert np.array_equal(mask, expected)


def test_lpips_of_identical_images_is_zero():
    pytest.importorskip("lpips", reason="lpips is optional (requirements-eval.txt)")
    model = metrics.load_lpips("squeeze", random_backbone=True)           # no download: random backbone
    x = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert metrics.lpips_distance(model, x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips_distance(model, x, 255 - x) > 0


def test_metric_models_are_skipped_with_a_message_when_weights_are_missing(tmp_path, capsys):
    hub_dir = torch.hub.get_dir()
    try:
        assert metrics.load_clip("clip", metrics.HUB["clip"], weights=str(tmp_path)) is None
        assert metrics.load_clip("pickscore", metrics.HUB["pickscore"], weights=str(tmp_path),
                            processor_id=metrics.HUB["pick_processor"]) is None
        assert metrics.load_dino(weights=str(tmp_path)) is None
        assert metrics.load_hps(weights=str(tmp_path)) is None
        assert metrics.load_imagereward(weights=str(tmp_path)) is None
        assert metrics.load_inception(weights=str(tmp_path)) is None
        assert metrics.load_lpips("alex", weights=str(tmp_path)) is None
    finally:
        torch.hub.set_dir(hub_dir)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["clip", "pickscore", "structure_distance", "hps",
                                                       "imagereward", "fid", "lpips"]
    assert all("skipped" in line for line in lines)


# -----------------------------------------------------------------------------
# CLIP / PickScore and DINO through their loaders, on tiny models saved to tmp_path

RED, BLUE = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)
RED[..., 0], BLUE[..., 2] = 255, 255


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP (character vocabulary) whose projections are set so that the red image and "red",
    and the blue image and "blue", map to the same unit vector, and the two pairs are orthogonal."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = tmp_path_factory.mktemp("weights") / "tiny-clip"
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")              # no merges: one token per letter
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=4)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    inputs = processor(text=["red", "blue"], images=[Image.fromarray(RED), Image.fromarray(BLUE)],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        image_features = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output       # (2, 16)
        text_features = model.text_model(input_ids=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"]).pooler_output
        targets = torch.eye(4)[:, :2]                                   # pair j -> unit vector e_j
        model.visual_projection.weight.copy_(targets @ torch.linalg.pinv(image_features.T))
        model.text_projection.weight.copy_(targets @ torch.linalg.pinv(text_features.T))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_and_pickscore_prefer_the_matching_caption(tiny_clip_dir):
    clip = metrics.load_clip("clip", "someone/tiny-clip", weights=str(tiny_clip_dir.parent))   # DIR/<last part>
    assert clip is not None
    images, prompts = [RED, RED, BLUE, BLUE], ["red", "blue", "blue", "red"]
    scores = metrics.clip_score(clip, images, prompts)
    assert scores == pytest.approx([100, 0, 100, 0], abs=1e-3)         # 100 * max(cos, 0)
    pick = metrics.pick_score(clip, images, prompts)                        # logit_scale * cos
    scale = float(clip[0].logit_scale.detach().exp())
    assert pick == pytest.approx([scale, 0, scale, 0], abs=1e-3)


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    folder = tmp_path_factory.mktemp("dino") / "dino-vitb8"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_structure_distance_through_the_dino_loader(tiny_dino_dir):
    dino = metrics.load_dino(weights=str(tiny_dino_dir.parent))
    assert dino is not None
    x = np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    sim = metrics.dino_key_self_similarity(dino, x)
    assert sim.shape == (17, 17)                                       # CLS + (32 / 8)^2 patches
    assert torch.allclose(sim.diagonal(), torch.ones(17), atol=1e-5)
    assert metrics.structure_distance(dino, x, x) == pytest.approx(0.0, abs=1e-10)
    assert metrics.structure_distance(dino, x, np.ascontiguousarray(x[::-1])) > 1e-6


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
            record = dict(image=name, prompt=shapes.caption(spec), seed=(seeds or [0] * len(specs))[k], spec=spec,
                          tokens=None)
            if variant:
                record["variant"] = variant
            f.write(json.dumps(record) + "\n")


def eval_specs(per_category=2):
    return [r["spec"] for r in ev.classifier_records(per_category)]


def rendered(specs):
    return [shapes.render(s, 32, i) for i, s in enumerate(specs)]


def blanked(specs, categories):
    """Rendered images, black for the given categories (the checker must fail them)."""
    return [np.zeros((32, 32, 3), np.uint8) if s["category"] in categories else im
            for s, im in zip(specs, rendered(specs))]


def test_table_groups_seeds_and_variants(tmp_path, capsys):
    specs = eval_specs()
    write_run(tmp_path / "base-seed0", specs, rendered(specs))
    write_run(tmp_path / "base-seed1", specs, blanked(specs, shapes.CATEGORIES[:3]))
    both = tmp_path / "tok"                                  # sample.py --compare, two seeds in one folder
    write_run(both, specs, blanked(specs, ["counting"]), variant="plain")
    write_run(both, specs * 2, rendered(specs) + blanked(specs, ["position"]), variant="tokens",
              seeds=[0] * len(specs) + [1] * len(specs))
    out = tmp_path / "results.json"
    groups = ev.main(["--runs", str(tmp_path / "base-seed0"), str(tmp_path / "base-seed1"), str(both),
                      "--json", str(out)])
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
    (run / "geneval_results.jsonl").write_text("".join(
        json.dumps({"filename": "x.png", "tag": t, "correct": c, "reason": ""}) + "\n" for t, c in results))
    scores = metrics.read_geneval(run / "geneval_results.jsonl")
    assert scores == {"geneval_single_object": 0.5, "geneval_two_object": 1.0, "geneval_counting": 0.0,
                      "geneval_mean": pytest.approx(0.5)}
    groups = ev.main(["--runs", str(run), "--json", str(tmp_path / "e.json")])
    assert groups["run"]["metrics"]["geneval_mean"]["values"] == [pytest.approx(0.5)]  # once, not per seed
    assert groups["run"]["n"] == 2
    with pytest.raises(SystemExit, match="no image for GenEval prompt"):
        metrics.write_geneval({}, metadata, str(tmp_path / "empty"))


def test_pie_bench_background_metrics(tmp_path, tiny_clip_dir):
    from PIL import Image
    pie, run, changed = tmp_path / "pie", tmp_path / "edits", tmp_path / "edits-bad"
    rng = np.random.default_rng(0)
    # edit region: rows and columns 128..383 of PIE's 512 x 512 mask grid -> 32..95 on our 128 px images
    rle = [v for row in range(128, 384) for v in (row * 512 + 128, 256)]
    mapping = {}
    for i in range(2):
        path = f"0_random/{i:012d}.jpg"
        mapping[f"{i:012d}"] = dict(image_path=path, original_prompt="a [red] cat", editing_prompt="a [blue] cat",
                                    editing_type_id="0", mask=rle)
        source = rng.integers(0, 256, (128, 128, 3)).astype(np.uint8)
        os.makedirs(pie / "annotation_images" / "0_random", exist_ok=True)
        Image.fromarray(source).save(pie / "annotation_images" / path, quality=100)
        source = metrics.load_image(pie / "annotation_images" / path)          # what the jpeg decodes to
        edited = source.copy()
        edited[40:90, 40:90] = 255 - edited[40:90, 40:90]                 # inside the edit mask only
        os.makedirs(run / "0_random", exist_ok=True)
        Image.fromarray(edited).save(run / "0_random" / f"{i:012d}.png")
        edited[:8] = 0                                                    # now the background changes too
        os.makedirs(changed / "annotation_images" / "0_random", exist_ok=True)
        Image.fromarray(edited).save(changed / "annotation_images" / "0_random" / f"{i:012d}.png")
    (pie / "mapping_file.json").write_text(json.dumps(mapping))
    clip = metrics.load_clip("clip", "tiny-clip", weights=str(tiny_clip_dir.parent))
    items = metrics.pie_items(str(pie), str(run))
    assert [it[4] for it in items] == ["a blue cat", "a blue cat"]
    clean = metrics.edit_metrics(items, clip=clip)
    assert clean["bg_psnr"] == math.inf and clean["bg_ssim"] == pytest.approx(1.0)
    assert 0 <= clean["clip_edited"] <= 100 and 0 <= clean["clip_whole"] <= 100
    bad = metrics.edit_metrics(metrics.pie_items(str(pie), str(changed)))
    assert set(bad) == {"bg_psnr", "bg_ssim"} and bad["bg_ssim"] < 1.0
    # written out: PSNR of the two images times the background mask, over all pixels
    src = metrics.load_image(items[0][1]) / 255.0
    out = metrics.load_image(changed / "annotation_images" / "0_random" / "000000000000.png") / 255.0
    background = np.ones((128, 128, 1))
    background[32:96, 32:96] = 0
    background[0, :] = background[-1, :] = background[:, 0] = background[:, -1] = 0
    mse = (((src - out) * background) ** 2).mean()
    one = metrics.edit_metrics(metrics.pie_items(str(pie), str(changed))[:1])
    assert one["bg_psnr"] == pytest.approx(10 * math.log10(1 / mse))


def test_plot_from_synthetic_training_csv(tmp_path):
    runs = []
    for name, slope in (("softrepa", 0.01), ("agsm", 0.02)):
        run = tmp_path / name
        specs = eval_specs(1)
        write_run(run, specs, rendered(specs))
        rows = ["step,loss,score_counting,score_mean"]   # the columns train.py writes
        rows += [f"{s},{1 / (s + 1):.3f},,{slope * s:.3f}" for s in range(0, 50, 10)]
        rows.insert(3, "15,0.5,,")                                        # a step without validation
        (run / "log.csv").write_text("\n".join(rows) + "\n")
        runs.append(str(run))
    steps, values = ev.read_curve(runs[0], "score_mean")
    assert steps == [0, 10, 20, 30, 40] and values == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert ev.read_curve(runs[0], "val_missing") == ([], [])
    png = tmp_path / "figure.png"
    groups = ev.main(["--runs", *runs, "--json", str(tmp_path / "r.json"), "--plot", str(png),
                      "--tradeoff", "shapes_counting", "shapes_mean"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert ev.plot(groups, runs, str(tmp_path / "p.png"), ("shapes_counting", "shapes_mean")) == (2, 2)
    assert ev.plot(groups, runs, str(tmp_path / "q.png"), ("fid", "imagereward"), "nothing") == (0, 0)


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="no run folder"):
        ev.main(["--runs", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="need --ref"):
        ev.main(["--runs", str(tmp_path), "--metrics", "fid"])
    with pytest.raises(SystemExit, match="needs --pie"):
        ev.main(["--runs", str(tmp_path), "--metrics", "edit"])
    with pytest.raises(SystemExit, match="unknown model"):
        ev.main(["--runs", str(tmp_path), "--metrics", "classifier", "--model", "sd4"])


# -----------------------------------------------------------------------------
# Held-out diffusion classifier

def test_distractors_are_hard_negatives():
    records = ev.classifier_records(3)
    for i, record in enumerate(records):
        image = shapes.render(record["spec"], 32, 0)
        picked = classifier.distractors(records, i, image, 3, np.random.default_rng(5))
        assert picked == classifier.distractors(records, i, image, 3, np.random.default_rng(5))   # deterministic
        assert len(set(picked)) == 3 and record["prompt"] not in picked
        pool = {shapes.caption(s): s for s in shapes.all_specs(record["spec"]["category"])}
        for text in picked:                                   # same category, and false of the image
            spec = pool[text]
            strict = {**spec, "category": classifier.STRICT.get(spec["category"], spec["category"])}
            assert not checker.check(image, strict)
    # Real data: other records' prompts, never one of the image's own captions
    records = [{"image": "x.png", "prompt": p, "captions": [p, "a cat"]} for p in ["a cat", "a dog", "a bird", "a cow"]]
    records[1]["captions"] = ["a dog", "a bird"]
    for k in range(5):
        assert sorted(classifier.distractors(records, 1, None, 2, np.random.default_rng(k))) == ["a cat", "a cow"]
    with pytest.raises(ValueError, match="only 2 distractors"):
        classifier.distractors(records, 1, None, 3, np.random.default_rng(0))
    # "a and b" is the same picture as "b and a": never a distractor of it
    record = {"prompt": "a red circle and a blue square",
              "spec": {"category": "two_object", "objects": [{"shape": "circle", "color": "red"},
                                                             {"shape": "square", "color": "blue"}]}}
    image = shapes.render(record["spec"], 32, 0)
    assert "a blue square and a red circle" not in classifier.distractors([record], 0, image, 100, np.random.default_rng(0))


class OracleDenoiser(torch.nn.Module):
    """A perfect model of the shapes data it knows: for a caption that is the true caption of one of
    `records`, it returns the exact target of that record's ground-truth image (the one eval renders)
    under the forward process; for any other caption it returns zeros."""

    def __init__(self, bb, records, seed):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))      # Backbone.device reads the parameters
        self.bb = [bb]
        self.keys = models.encode_prompts(bb, [r["prompt"] for r in records])["encoder_hidden_states"].flatten(1)
        # the latents the classifier encodes (the posterior mean of the backbone's autoencoder)
        self.x0 = models.encode_images(bb, shapes.to_tensor(np.stack(classifier.ground_truth_images(records, seed, 32))), mode=True)

    def forward(self, x_t, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        bb, out = self.bb[0], torch.zeros_like(x_t)
        distance = (encoder_hidden_states.flatten(1)[:, None] - self.keys[None]).abs().amax(-1)  # (B, records)
        for b in range(len(x_t)):
            j = int(distance[b].argmin())
            if distance[b, j] > 1e-3:
                continue
            x0 = self.x0[j]
            if bb.facts["prediction"] == "flow":               # x_t = (1 - s) x0 + s eps, target eps - x0
                s = float(timestep[b]) / models.NUM_TRAIN_TIMESTEPS
                out[b] = (x_t[b] - (1 - s) * x0) / s - x0
            else:                                              # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
                abar = bb.alphas_cumprod[int(timestep[b])]
                out[b] = (x_t[b] - abar.sqrt() * x0) / (1 - abar).sqrt()
        return (out,)


@pytest.fixture(scope="module")
def tiny_sd3():
    return models.build_tiny("tiny-sd3")


def image_records(folder, n=8):
    """Real-data records as train.py passes them: an image file, its prompt and all its captions."""
    from PIL import Image
    rng, records = np.random.default_rng(0), []
    for i, item in enumerate(ev.classifier_records(2)[:n]):
        path = str(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(path)
        records.append({"image": path, "prompt": item["prompt"], "captions": [item["prompt"], "a photo"]})
    return records


@pytest.mark.parametrize("family,data", [("tiny-sd3", "shapes"), ("tiny-sd1.5", "shapes"), ("tiny-sd3", "files")])
def test_a_perfect_oracle_classifies_everything(family, data, tiny_sd3, tmp_path):
    bb = tiny_sd3 if family == "tiny-sd3" else models.Backbone(
        family, models.FAMILIES[family], tiny_sd3.denoiser, text_encoder=tiny_sd3.text_encoder,   # denoiser: replaced
        alphas_cumprod=models.ddpm_alphas_cumprod())
    records = ev.classifier_records(2) if data == "shapes" else image_records(tmp_path)
    assert len({r["prompt"] for r in records}) == len(records)
    real = bb.denoiser
    bb.denoiser = OracleDenoiser(bb, records, seed=3)
    try:
        errors, captions = classifier.classifier_errors(bb, records, n_candidates=4, seed=3)
        assert classifier.classifier_accuracy(bb, records, n_candidates=4, seed=3) == 1.0
    finally:
        bb.denoiser = real
    assert errors.shape == (len(records), 4) and torch.all(errors[:, 0] < 1e-8)
    assert torch.all(errors[:, 1:] > 1e-3)
    assert [c[0] for c in captions] == [r["prompt"] for r in records]


def test_random_weights_classifier_runs_and_sees_the_tokens(tiny_sd3):
    records = ev.classifier_records(1)
    acc = classifier.classifier_accuracy(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    errors, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    # by hand: a record counts when its true caption (column 0) has strictly the lowest error
    wins = sum(all(row[0] < e for e in row[1:]) for row in errors.tolist())
    assert errors.shape == (len(records), 3) and acc == pytest.approx(wins / len(records))
    assert acc == classifier.classifier_accuracy(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    plain, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, noise_levels=(0.5,))
    tokens = softtokens.make_tokens(tiny_sd3, "softrepa")
    with torch.no_grad():
        tokens.tokens.normal_(std=1.0)
    handle = hooks.attach(tiny_sd3.denoiser, tokens)
    try:
        with_tokens, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, noise_levels=(0.5,), handle=handle)
    finally:
        handle.remove()
    assert not torch.allclose(plain, with_tokens)
    again, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, noise_levels=(0.5,))
    assert torch.equal(plain, again)                          # removed: the plain model again


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
    monkeypatch.setattr(ev.models, "load", lambda name, **kw: tiny_sd3)
    groups = ev.main(["--runs", str(run), "--metrics", "classifier", "--classifier-n", "1", "--candidates", "3",
                      "--json", str(tmp_path / "c.json")])
    assert len(attached) == 1 and not attached[0]._handles               # tokens for one row, then removed
    # each column is the accuracy of its own tokens, computed here directly
    records = ev.classifier_records(1)
    handle = ev.token_handle(tiny_sd3, {"tokens": str(tmp_path / "tokens.safetensors"), "variant": "tokens"})
    try:
        with_tokens = classifier.classifier_accuracy(tiny_sd3, records, 3, handle=handle)
    finally:
        handle.remove()
    assert groups["run[plain]"]["metrics"]["classifier"]["mean"] == classifier.classifier_accuracy(tiny_sd3, records, 3)
    assert groups["run[tokens]"]["metrics"]["classifier"]["mean"] == with_tokens


def test_edit_run_through_the_command_line(tmp_path, tiny_clip_dir, capsys):
    """PIE-Bench layout -> eval.py --metrics edit clip, with the tiny CLIP standing in for ViT-L/14 in
    --weights and no DINO / LPIPS there (skipped with a message)."""
    import shutil
    from PIL import Image
    pie, run, weights = tmp_path / "pie", tmp_path / "pnp", tmp_path / "weights"
    shutil.copytree(tiny_clip_dir, weights / "clip-vit-large-patch14")
    source = np.zeros((64, 64, 3), np.uint8)
    source[..., 0] = 255                                                   # red; the edit makes it blue
    os.makedirs(pie / "annotation_images" / "1_change", exist_ok=True)
    Image.fromarray(source).save(pie / "annotation_images" / "1_change" / "a.png")
    os.makedirs(run / "annotation_images" / "1_change", exist_ok=True)
    Image.fromarray(BLUE.repeat(2, 0).repeat(2, 1)[:64, :64]).save(run / "annotation_images" / "1_change" / "a.png")
    (pie / "mapping_file.json").write_text(json.dumps({"a": dict(
        image_path="1_change/a.png", original_prompt="[red]", editing_prompt="[blue]", mask=[0, 512 * 512])}))
    groups = ev.main(["--runs", str(run), "--metrics", "edit", "clip", "--pie", str(pie), "--weights", str(weights),
                      "--json", str(tmp_path / "e.json")])
    metrics = groups["pnp"]["metrics"]
    assert metrics["clip"]["mean"] == pytest.approx(100, abs=1e-3)        # the edited image is "blue"
    assert metrics["clip_whole"]["mean"] == pytest.approx(100, abs=1e-3)
    assert "bg_psnr" not in metrics                                        # the whole image is the edit region
    out = capsys.readouterr().out
    assert "structure_distance: skipped" in out and "lpips: skipped" in out


class TextBlindDenoiser(torch.nn.Module):
    """Ignores the caption: a fixed function of x_t and t."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, timestep, return_dict=False, **text):
        return (self.scale * x_t * (timestep.view(-1, 1, 1, 1) / 1000),)


def test_a_text_blind_model_ties_and_scores_zero(tiny_sd3):
    """Every candidate of an image sees the same x_t and target (shared t and eps), so a model that
    ignores the text gives exactly equal errors; ties count as wrong."""
    records = ev.classifier_records(1)
    real = tiny_sd3.denoiser
    tiny_sd3.denoiser = TextBlindDenoiser()
    try:
        errors, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=4)
        accuracy = classifier.classifier_accuracy(tiny_sd3, records, n_candidates=4)
    finally:
        tiny_sd3.denoiser = real
    assert torch.all(errors == errors[:, :1]) and accuracy == 0.0
    assert len(set(errors[:, 0].tolist())) == len(records)                # but images differ
